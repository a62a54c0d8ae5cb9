"""`surgun demo`: erase one toy-world concept, then show and measure what changed."""

from __future__ import annotations

import logging
from pathlib import Path

from .audit import audit_metadata, run_audit
from .config import EraseConfig
from .grid import before_after_grid, save_png
from .io import check_writable, write_json
from .recipes import recipe_config
from .surgun import Cancel, Progress, erase
from .toyworld import load_toy_backend, load_toy_classifier
from .toyworld.evaluate import concept_kind, evaluate_erasure

log = logging.getLogger(__name__)


def toy_config(concept: str, **overrides) -> EraseConfig:
    """EraseConfig for a toy concept: the toy recipe (recipes.py), the other concepts of its kind as distractors."""
    return recipe_config("toy", [concept], concept_kind(concept), **overrides)


def run_demo(
    concept: str = "circle",
    out_dir: str | Path = "surgun-out",
    json_path: str | Path | None = None,
    seeds_per_pair: int = 8,
    progress: Progress | None = None,
    cancel: Cancel | None = None,
    audit: bool = False,
    **overrides,
) -> dict:
    """Erase `concept` from the shipped toy model; write the delta, a before/after grid and metrics JSON.

    audit: also attack the erasure (audit.py: every attack, the base model as the control, judged by the
    ground-truth classifier); the figures go into the JSON, the delta's header (`surgun.audit`) and a grid PNG.
    """
    cfg = toy_config(concept, **overrides)  # validates before any work
    check_writable(out_dir, "out", folder=True)  # so does a folder that cannot be written
    if json_path:
        check_writable(json_path, "json")
    backend = load_toy_backend()
    clf = load_toy_classifier()
    result = erase(backend, cfg, progress=progress, cancel=cancel)
    on_batch = progress and (lambda d, n: progress("evaluate", d, n, {}))
    metrics, before, after = evaluate_erasure(backend, result.lora, clf, concept, seeds_per_pair, on_batch=on_batch)
    out_dir = Path(out_dir)
    audited = {}
    if audit:
        rep = run_audit(backend, result.lora, concept, cfg.kind, progress=progress, cancel=cancel)
        result.delta.metadata.update(audit_metadata(rep))
        save_png(rep.grid(), out_dir / f"surgun-toy-{concept}-audit.png")
        data = rep.to_dict(prompts=False)
        audited = {"audit": {n: {"recovery": e["recovery"], "control": e["control"], "forwards": e["forwards"]}
                             for n, e in data["attacks"].items()},
                   "max_recovery": data["max_recovery"]}  # fmt: skip
    delta_path = result.delta.save(out_dir / f"surgun-toy-{concept}.safetensors")
    grid_path = out_dir / f"surgun-toy-{concept}-grid.png"
    save_png(_demo_grid(before, after, concept), grid_path)
    report = {"concept": concept, **metrics, "seconds": round(result.seconds, 2),
              "peak_mem_mb": round(result.peak_mem_mb, 1), "steps": result.steps_done,
              "step_chosen": int(result.delta.metadata["surgun.step_chosen"]), "recipe": cfg.recipe,
              "forwards": result.forwards, "forwards_by_phase": result.forwards_by_phase,
              "delta": str(delta_path), "grid": str(grid_path), **audited}  # fmt: skip
    write_json(Path(json_path) if json_path else out_dir / f"surgun-toy-{concept}.json", report)
    result.lora.detach()
    return report


def _demo_grid(before, after, concept: str):
    """Rows: three prompts with the concept, then three without it; four seeds each."""
    kind = concept_kind(concept)
    uniq = list(dict.fromkeys(before.prompts[i] for i in range(len(before.prompts))))
    with_c = [p for p in uniq if concept in p.split() and p.count(" ") == 2][:3]
    without = [p for p in uniq if concept not in p.split() and p.count(" ") == 2]
    without = without[:: max(1, len(without) // 3)][:3]
    rows = []
    for p in with_c + without:
        idx = [i for i, q in enumerate(before.prompts) if q == p][:4]
        rows.append((f"{p!r}" + ("  (erased)" if p in with_c else ""), before.images[idx], after.images[idx]))
    return before_after_grid(rows, title=f"SurgUn: erase {concept!r} ({kind}) from the toy model")
