"""GPU check: full-size random-weight SD1.5 and SDXL through the real erase path, fp16 and bf16, checkpointing on/off.

For a task that is lent a GPU: one prepared run (under 8 minutes on one H100/H200-class card) that answers
how fast and how big SurgUn's erase is on a card, before real checkpoints are in reach. Each model is whole
(UNet, text encoders, VAE: bench/full_models.py) with random weights, on the recipe of its family
(surgun_core.recipes), and goes through the engine's own calls:
  training step   surgun_core.plan_timing.training_step: the loop's surgun_backward at the recipe's batch (targets +
                  distractors in one forward and backward, the retain anchor's two forwards), clip, AdamW
  sampled image   backend.sample, the recipe's guidance, a batch of sample_batch_size images
  judged image    surgun_core.judges.scorers.DiffusionScorer.predict over the probe set's labels
It reports seconds per training step, per sampled image (at the recipe's sample_steps) and per judged image,
peak memory (torch.cuda.max_memory_allocated) next to plan_memory's estimate, and the projected seconds of a
default erase: plan_erase's forwards per phase (the most, and the fewest when the judge ends localization
and calibration early) times the measured seconds per forward of the matching kind. Goals it checks: SD1.5
training peak <= 6 GiB, SDXL <= 12 GiB, a default SD1.5 erase <= 10 minutes projected.

    python bench/gpu_check.py [--json F] [--md F] [--models sd15,sdxl] [--dtypes float16,bfloat16]
    python bench/gpu_check.py --tiny --json F     # the same code on a CPU with the tiny models, in seconds

A Flux-shaped DiT is tried too: it is reported as skipped, with the reason, while no backend drives it.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import sys
import time
from pathlib import Path

import torch
from full_models import full_backend  # bench/, beside this file

from surgun_core.backends.base import resolve_device
from surgun_core.backends.diffusers import DiffusersBackend
from surgun_core.backends.diffusers import family_of as denoiser_family
from surgun_core.errors import ConfigError
from surgun_core.judges.probe import judge_templates, probe_set
from surgun_core.judges.scorers import DiffusionScorer
from surgun_core.lora import LoRASet
from surgun_core.meter import total
from surgun_core.plan import largest_no_grad_batch, n_checkpoints, plan_erase, regime, step_forwards
from surgun_core.plan_memory import estimate_memory, lora_targets, trace_activations
from surgun_core.plan_timing import training_step
from surgun_core.recipes import family_of, recipe_config
from surgun_core.testing import tiny_sd1_backend, tiny_sdxl_backend

log = logging.getLogger("bench.gpu_check")
CONCEPT = "cat"
GIB = 1024  # MB
GOALS = {"sd15": {"training_peak_mb": 6 * GIB, "erase_s": 600.0}, "sdxl": {"training_peak_mb": 12 * GIB}}
TINY = {"sd15": tiny_sd1_backend, "sdxl": tiny_sdxl_backend}
STEPS = {"train": 2, "sample": 4}  # timed training steps and sampler steps per block (each after one warm-up)


def build(model: str, device: torch.device, precision: str, tiny: bool) -> DiffusersBackend:
    if not tiny:
        return full_backend(model, device, precision)
    b = TINY[model]()
    return DiffusersBackend(b.denoiser, b.text, b.scheduler_config, vae=b.vae, device=device, precision=precision)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _reset_peak(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)


def _peak_mb(dev: torch.device) -> float | None:
    """Peak allocated on CUDA since the last reset; None on a CPU (its resident set is the whole process's)."""
    return torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else None


def timed(backend, fn, repeats: int = 1, warmup=None) -> tuple[float, int]:
    """(seconds, sample-forwards) of `repeats` calls of fn, after one untimed warm-up call (of `warmup`: a
    cheaper call through the same kernels, else of fn)."""
    (warmup or fn)()
    _sync(backend.device)
    before = total(backend.meter.counts)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync(backend.device)
    return time.perf_counter() - t0, total(backend.meter.counts) - before


def measure_training(backend, cfg, checkpointing: bool, trace) -> dict:
    """Seconds per step and peak memory of the loop's step, with the plan's memory estimate beside it."""
    dev = backend.device
    est = estimate_memory(backend, cfg, inference_rows=largest_no_grad_batch(backend, cfg),
                          checkpoints=n_checkpoints(cfg), trace=trace)  # fmt: skip
    row = {"checkpointing": checkpointing, "batch_size": cfg.batch_size, "forwards_per_step": step_forwards(cfg),
           "estimated_training_peak_mb": est.training_peak_mb, "error": None}  # fmt: skip
    _reset_peak(dev)
    lset = LoRASet(lora_targets(backend, cfg), cfg.rank, cfg.alpha).attach()
    try:
        opt = torch.optim.AdamW(list(lset.parameters()), lr=cfg.lr)
        with backend.gradient_checkpointing(checkpointing):
            sec, fwd = timed(backend, lambda: training_step(backend, cfg, lset, opt), STEPS["train"])
    except torch.OutOfMemoryError as e:  # a measured answer too: this setting does not fit the card
        return {**row, "error": f"out of memory: {str(e).splitlines()[0]}", "peak_mb": _peak_mb(dev)}
    finally:
        lset.detach()
    return {**row, "s_per_step": sec / STEPS["train"], "s_per_forward": sec / fwd, "peak_mb": _peak_mb(dev)}


def measure_inference(backend, cfg, trace) -> tuple[dict, dict]:
    """Sampling (the recipe's batch and guidance) and judging (DiffusionScorer over the probe labels), each
    with the plan's memory estimate for its batch."""
    dev = backend.device
    n = cfg.sample_batch_size
    prompts, seeds = [f"a photo of a {CONCEPT}"] * n, list(range(n))
    out = {}

    def sample(steps: int = STEPS["sample"]):
        out["x0"] = backend.sample(prompts, seeds, steps, cfg.guidance, batch_size=n)

    def estimate(rows: int) -> float:
        return estimate_memory(backend, cfg, inference_rows=rows, trace=trace).inference_peak_mb

    _reset_peak(dev)
    sec, fwd = timed(backend, sample, warmup=lambda: sample(1))
    rows = n * (1 if cfg.guidance == 1.0 else 2)
    sampling = {"images": n, "rows": rows, "steps_timed": STEPS["sample"], "sample_steps": cfg.sample_steps,
                "s_per_image": sec / STEPS["sample"] * cfg.sample_steps / n,  # at the recipe's sampler steps
                "s_per_forward": sec / fwd, "peak_mb": _peak_mb(dev), "estimated_peak_mb": estimate(rows)}  # fmt: skip
    labels = probe_set(cfg).labels
    judge = DiffusionScorer(backend, cfg.kind, judge_templates(cfg))
    rows = min(judge.batch_size, n * judge.timesteps)
    _reset_peak(dev)
    sec, fwd = timed(
        backend, lambda: judge.predict(out["x0"], labels), warmup=lambda: judge.predict(out["x0"], labels[:1])
    )
    judging = {"images": n, "labels": len(labels), "rows": rows, "s_per_image": sec / n, "s_per_forward": sec / fwd,
               "peak_mb": _peak_mb(dev), "estimated_peak_mb": estimate(rows)}  # fmt: skip
    return sampling, judging


def project(plan, rates: dict[str, float]) -> dict[str, float]:
    """Seconds of an erase: each phase's forwards x the seconds per forward of its kind (train, sample, judge)."""

    def kind(phase: str) -> str:
        return "judge" if phase.endswith("judging") else "train" if regime(phase) == "training" else "sample"

    most = sum(n * rates[kind(p)] for p, n in plan.forwards_by_phase.items())
    fewest = sum(n * rates[kind(p)] for p, n in plan.fewest_by_phase.items())
    return {"most": most, "fewest": fewest}


def check_model(model: str, dev: torch.device, precision: str, tiny: bool) -> dict:
    t0 = time.time()
    backend = build(model, dev, precision, tiny)
    base = recipe_config(family_of(backend), [CONCEPT], "object", precision=precision, device=str(dev))
    parts = {"denoiser": backend.denoiser, "text": backend.text, "vae": backend.vae}
    run = {
        "model": model,
        "dtype": precision,
        "device": str(dev),
        "recipe": base.recipe,
        "build_s": time.time() - t0,
        "params_m": {k: sum(p.numel() for p in m.parameters()) / 1e6 for k, m in parts.items() if m is not None},
    }
    log.info("%s %s: built in %.1f s", model, precision, run["build_s"])
    t1 = time.time()
    trace = trace_activations(backend)  # shapes only: the plan's memory estimates
    run["sampling"], run["judging"] = measure_inference(backend, base, trace)
    log.info("  sampling %.3f s/image, judging %.3f s/image (%.1f s)", run["sampling"]["s_per_image"],
             run["judging"]["s_per_image"], time.time() - t1)  # fmt: skip
    run["training"], run["projected_s"] = [], {}
    for ckpt in (True, False):
        t1 = time.time()
        cfg = recipe_config(family_of(backend), [CONCEPT], "object", precision=precision, device=str(dev),
                            gradient_checkpointing=ckpt)  # fmt: skip
        row = measure_training(backend, cfg, ckpt, trace)
        run["training"].append(row)
        what = row["error"] or f"{row['s_per_step']:.3f} s/step, peak {row['peak_mb'] or '-'} MB"
        log.info("  training, checkpointing %s: %s (%.1f s)", "on" if ckpt else "off", what, time.time() - t1)
        if row["error"] is None:
            plan = plan_erase(backend, cfg, memory=False, time_it=False)
            rates = {"train": row["s_per_forward"], "sample": run["sampling"]["s_per_forward"],
                     "judge": run["judging"]["s_per_forward"]}  # fmt: skip
            run["projected_s"]["checkpointing on" if ckpt else "checkpointing off"] = project(plan, rates)
            run["plan"] = {"forwards_by_phase": plan.forwards_by_phase, "fewest_by_phase": plan.fewest_by_phase,
                           "forwards": plan.forwards, "fewest": plan.fewest}  # fmt: skip
    run["goals"] = goals(model, run)
    run["elapsed_s"] = time.time() - t0
    del backend
    gc.collect()  # the next model gets the whole card
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return run


def goals(model: str, run: dict) -> dict:
    """Each goal of the issue with the measured figure and whether it is met (None: not measured here)."""
    out = {}
    ckpt = run["training"][0]  # checkpointing on: the default on CUDA
    if "training_peak_mb" in GOALS.get(model, {}):
        peak, goal = ckpt.get("peak_mb"), GOALS[model]["training_peak_mb"]
        out["training_peak_mb"] = {"goal": goal, "measured": peak, "met": None if peak is None else peak <= goal}
    if "erase_s" in GOALS.get(model, {}):
        proj = run["projected_s"].get("checkpointing on", {}).get("most")
        out["erase_s"] = {"goal": GOALS[model]["erase_s"], "projected": proj,
                          "met": None if proj is None else proj <= GOALS[model]["erase_s"]}  # fmt: skip
    return out


def flux_entry() -> dict:
    """A Flux-shaped DiT at reduced depth, built from its config offline; skipped while no backend drives it."""
    try:
        from diffusers import FluxTransformer2DModel
    except ImportError as e:
        return {"model": "flux", "skipped": f"diffusers has no FluxTransformer2DModel ({e})"}
    with torch.device("meta"):  # shapes only: enough to ask the backend whether it takes this denoiser
        dit = FluxTransformer2DModel(num_layers=2, num_single_layers=4)
    try:
        denoiser_family(dit)  # what DiffusersBackend asks of a denoiser first
    except ConfigError as e:
        return {"model": "flux", "skipped": "FluxTransformer2DModel builds offline from a config (2 double + 4 "
                f"single blocks here), but no SurgUn backend drives it: DiffusersBackend says: {e}. Flux erases "
                "run through the ComfyUI backend only, which needs a ComfyUI install"}  # fmt: skip
    return {"model": "flux", "skipped": "DiffusersBackend now takes FluxTransformer2DModel: add it to this check"}


def markdown(report: dict) -> str:
    m = report["meta"]
    lines = [f"# GPU check ({m['device_name']}, torch {m['torch']}, {'tiny models' if m['tiny'] else 'full size'})",
             "", "| model | dtype | ckpt | s/step | peak MB | est. MB | s/sampled | s/judged | erase s (most/fewest) |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in report["runs"]:
        if "skipped" in r:
            lines.append(f"| {r['model']} | skipped: {r['skipped']} |")
            continue
        for t in r["training"]:
            key = "checkpointing on" if t["checkpointing"] else "checkpointing off"
            p = r["projected_s"].get(key)
            peak = "-" if t.get("peak_mb") is None else f"{t['peak_mb']:,.0f}"
            step = t["error"] or f"{t['s_per_step']:.3f}"
            lines.append(f"| {r['model']} | {r['dtype']} | {'on' if t['checkpointing'] else 'off'} | {step} | {peak} "
                         f"| {t['estimated_training_peak_mb']:,.0f} | {r['sampling']['s_per_image']:.3f} | "
                         f"{r['judging']['s_per_image']:.3f} | "
                         + (f"{p['most']:,.0f} / {p['fewest']:,.0f} |" if p else "- |"))  # fmt: skip
    lines += ["", "Goals (checkpointing on):"]
    for r in report["runs"]:
        for name, g in r.get("goals", {}).items():
            fig = g.get("measured", g.get("projected"))
            verdict = "not measured here" if g["met"] is None else "met" if g["met"] else "NOT met"
            lines.append(f"- {r['model']} {r['dtype']} {name} <= {g['goal']:,.0f}: "
                         f"{'-' if fig is None else f'{fig:,.0f}'} ({verdict})")  # fmt: skip
    lines.append(f"\nElapsed {m['elapsed_s']:.0f} s.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny models on the CPU (float32, bfloat16): the test run")
    ap.add_argument("--models", default="sd15,sdxl", help="comma list of sd15, sdxl")
    ap.add_argument("--dtypes", help="comma list (default: float16,bfloat16 on a GPU; float32,bfloat16 with --tiny)")
    ap.add_argument("--device", default="auto", help="auto, cuda, cuda:N or cpu (--tiny: cpu)")
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--md", help="write a Markdown table here")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from diffusers.utils import logging as dl
    from transformers.utils import logging as tl

    for lib in (dl, tl):  # their notices (dtype casts of random models) are not ours to show
        lib.set_verbosity_error()
        lib.disable_progress_bar()
    if a.tiny:  # seconds on a CPU: one timed repeat each
        STEPS.update(train=1, sample=2)
    dev = torch.device("cpu") if a.tiny else resolve_device(a.device)
    if dev.type != "cuda" and not a.tiny:
        ap.error("no CUDA device: the full-size check needs a GPU (use --tiny on a CPU)")
    dtypes = a.dtypes.split(",") if a.dtypes else (["float32", "bfloat16"] if a.tiny else ["float16", "bfloat16"])
    t0 = time.time()
    runs = [check_model(m, dev, d, a.tiny) for m in a.models.split(",") for d in dtypes]
    runs.append(flux_entry())
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    meta = {"device": str(dev), "device_name": name, "torch": torch.__version__, "tiny": a.tiny,
            "concept": CONCEPT, "steps_timed": STEPS, "elapsed_s": time.time() - t0,
            "peak_meter": "torch.cuda.max_memory_allocated" if dev.type == "cuda" else None}  # fmt: skip
    report = {"meta": meta, "runs": runs}
    text = markdown(report)
    print(text)
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=2))
    if a.md:
        Path(a.md).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
