"""What a delta changed, shown and scored: the before/after grid and the judge's erase/retain scores.

One core call (probe_delta) for `surgun probe`, the UI and ComfyUI. It draws the probe set that erase()
scored (judges/probe.py: the concepts and retained ones of the kind, fixed seeds, the family's recipe) with
the base model and with the delta attached, and asks the judge (by default the base model itself, with
the delta switched off) which concept each image shows. Your own prompts can be drawn beside them; for
those it reports the share of images judged as an erased concept.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from .backends.base import Backend
from .config import EraseConfig
from .engine.train import Cancel, Progress
from .errors import Cancelled, ConfigError
from .grid import before_after_grid
from .judges.probe import ProbeScores, judge_for, probe_set, score_probe
from .lora import LoraDelta
from .meter import total
from .recipes import family_of, recipe_config

log = logging.getLogger(__name__)

GRID_SEEDS = 4  # seeds per prompt shown in the grid (all are scored)


@dataclass
class ProbeReport:
    grid: Image.Image  # rows: probe prompts (erased concepts first), then your prompts; before | after
    scores: dict  # JSON-ready: before/after erase, retain, h, per concept; your prompts; the cost


def probe_config(backend: Backend, delta: LoraDelta | None = None, concepts: Sequence[str] | None = None,
                 kind: str | None = None, seeds: int = 2, retained: Sequence[str] | None = None,
                 scorer: str = "diffusion", clip_path: str | None = None) -> EraseConfig:  # fmt: skip
    """The probe's settings: the model family's recipe (so the probe set is the one erase scored); concepts,
    kind and retained concepts from the delta's header unless given."""
    meta = delta.metadata if delta is not None else {}
    concepts = list(concepts or _header_list(meta, "surgun.concepts"))
    if not concepts:
        why = "the delta's header names none" if delta is not None else "without a delta nothing names them"
        raise ConfigError("concept", f"give the concept(s) to probe; {why}")
    kind = kind or meta.get("surgun.kind") or "object"
    same = sorted({r.lower() for r in retained or ()} & {c.lower() for c in concepts})
    if same:
        raise ConfigError("retain", f"{same[0]!r} is also a concept to probe as erased; retain other concepts")
    if not retained:  # the delta's distractors, less any concept probed now
        lower = {c.lower() for c in concepts}
        retained = [d for d in _header_list(meta, "surgun.distractors") if d.lower() not in lower]
    retained = list(retained) or None  # None: the recipe's
    return recipe_config(family_of(backend), concepts, kind, distractors=retained, probe_seeds=seeds,
                         scorer=scorer, clip_path=clip_path)  # fmt: skip


def _header_list(meta: dict, key: str) -> list[str]:
    try:
        v = json.loads(meta.get(key) or "[]")
    except json.JSONDecodeError:
        return []
    return [x for x in v if isinstance(x, str)] if isinstance(v, list) else []


def probe_delta(backend: Backend, delta: LoraDelta | None, strength: float = 1.0,
                concepts: Sequence[str] | None = None, kind: str | None = None, prompts: Sequence[str] = (),
                seeds: int = 2, *, retained: Sequence[str] | None = None, scorer: str = "diffusion",
                clip_path: str | None = None, progress: Progress | None = None,
                cancel: Cancel | None = None) -> ProbeReport:  # fmt: skip
    """Probe `delta` at `strength` on `backend` (delta None: the base model alone, which shows how well the
    judge sees the concepts before any erasure).

    Args:
        concepts, kind, retained: default to the delta header's concepts, kind and distractors.
        prompts: your own prompts, drawn before and after at the probe seeds.
        seeds: seeds per probe prompt.
        progress: progress("probe", done, total, stats) in images drawn and judged (drawing one image and
            judging one cost about the same: 2 x sampler steps vs labels x templates x timesteps forwards).
    Returns:
        The grid image and the scores (ProbeReport). The backend is left as it was (the delta detached).
    """
    t0 = time.time()
    if not isinstance(strength, (int, float)) or isinstance(strength, bool) or not math.isfinite(strength):
        raise ConfigError("strength", f"must be a number (1: the delta as trained, 0.5: half way), got {strength!r}")
    cfg = probe_config(backend, delta, concepts, kind, seeds, retained, scorer, clip_path)
    prompts = [p.strip() for p in prompts if p and p.strip()]
    lset = delta.to_lora_set(backend.attention_linears(), strength) if delta is not None else None  # checks shapes
    probe = probe_set(cfg)
    judge = judge_for(cfg, backend)
    rows = probe.rows() + [(p, None, s) for p in prompts for s in probe.seeds]
    n = len(probe.rows())
    units = (2 if lset is not None else 1) * 2 * len(rows)  # draw and judge every row, once or twice
    progress = progress or (lambda *a: None)
    metered = backend.meter.snapshot()

    def draw(k: int):
        def tick(done: int, count: int) -> None:
            if cancel is not None and cancel():
                raise Cancelled("probe cancelled by the user; nothing was written")
            progress("probe", 2 * k * len(rows) + done, units, {})

        with backend.meter.phase("probe images"):
            return backend.sample([r[0] for r in rows], [r[2] for r in rows], cfg.probe_steps, cfg.guidance,
                                  on_batch=tick)  # fmt: skip

    def score(x0: torch.Tensor, k: int, off) -> tuple[ProbeScores, dict[str, float]]:
        sc = score_probe(backend, judge, probe, x0=x0[:n], judge=off)
        mine = _judged_erased(backend, judge, probe.labels, probe.erased, rows[n:], x0[n:], off)
        progress("probe", 2 * (k + 1) * len(rows), units, {"erase": sc.erase, "retain": sc.retain})
        return sc, mine

    progress("probe", 0, units, {})
    x_before = draw(0)
    before, mine_before = score(x_before, 0, None)
    after, mine_after, x_after = None, {}, None
    if lset is not None:
        lset.attach()
        try:
            x_after = draw(1)
            after, mine_after = score(x_after, 1, lset.disabled)  # the judge is the base model: delta off
        finally:
            lset.detach()
    scores = {
        "concepts": list(cfg.concepts), "kind": cfg.kind, "retained": list(probe.retained),
        "templates": list(probe.templates), "seeds": list(probe.seeds), "scorer": cfg.scorer,
        "sample_steps": cfg.probe_steps, "guidance": cfg.guidance, "recipe": cfg.recipe,
        "strength": strength if lset is not None else None,
        "before": _scores(before), "after": _scores(after) if after is not None else None,
        "prompts": {p: {"before": mine_before[p], "after": mine_after.get(p)} for p in prompts},
        "base_matches_delta": _base_matches(backend, delta),
        "forwards": 0, "forwards_by_phase": {}, "seconds": 0.0,
    }  # fmt: skip
    grid = _grid(backend, cfg, rows, n, probe.erased, x_before, x_after, before, after)
    by_phase = backend.meter.since(metered)
    scores.update(forwards=total(by_phase), forwards_by_phase=by_phase, seconds=round(time.time() - t0, 2))
    return ProbeReport(grid, scores)


def _scores(sc: ProbeScores) -> dict:
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in sc.to_dict().items()}


def _judged_erased(backend, judge, labels, erased, rows, x0, off) -> dict[str, float]:
    """Per own prompt: the share of its images the judge names as one of the erased concepts."""
    if not rows:
        return {}
    with (off or contextlib.nullcontext)(), backend.meter.phase("judging"):
        pred = judge.predict(x0, labels)
    out: dict[str, list[bool]] = {}
    for (prompt, _, _), p in zip(rows, pred):
        out.setdefault(prompt, []).append(p in erased)
    return {k: round(sum(v) / len(v), 4) for k, v in out.items()}


def _base_matches(backend: Backend, delta: LoraDelta | None) -> bool | None:
    """Whether the delta was trained on this very model (its header's fingerprint); None: it does not say.
    A delta can act on a fine-tune of its base too; the report only says which case this is."""
    want = delta.metadata.get("surgun.base_fingerprint") if delta is not None else None
    return None if not want else want == backend.fingerprint()


def _grid(backend, cfg, rows, n, erased, x_before, x_after, before, after) -> Image.Image:
    """One row per prompt (GRID_SEEDS seeds), the erased concepts' prompts marked."""
    img_before = _decode(backend, x_before)
    img_after = _decode(backend, x_after) if x_after is not None else img_before[:0]
    by_prompt: dict[tuple[str, str], list[int]] = {}  # (prompt, mark): a prompt of yours may equal a probe one
    for i, (prompt, label, _) in enumerate(rows):
        mark = "  (yours)" if i >= n else "  (erased)" if label in erased else ""
        by_prompt.setdefault((prompt, mark), []).append(i)
    grid_rows = []
    for (prompt, mark), idx in by_prompt.items():
        idx = idx[:GRID_SEEDS]
        after_imgs = img_after[idx] if x_after is not None else img_after
        grid_rows.append((f"{prompt!r}{mark}", img_before[idx], after_imgs))
    head = f"probe {', '.join(cfg.concepts)}: erase {before.erase:.2f}"
    head += f" -> {after.erase:.2f}, retain {before.retain:.2f} -> {after.retain:.2f}" if after else " (no delta)"
    return before_after_grid(grid_rows, title=head)


def _decode(backend: Backend, x0: torch.Tensor) -> torch.Tensor:
    return torch.cat([backend.decode(x0[i : i + 16].to(backend.device)).float().cpu() for i in range(0, len(x0), 16)])
