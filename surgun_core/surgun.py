"""The SurgUn method as one call (DESIGN.md section 2, the orchestrator): localize -> train -> calibrate -> delta.

Every front end calls erase(). The stages live below it: the loss, one step and the loop in engine/train.py
(L = -w_A L_T + w_D L_D + w_C L_C + w_R L_R, DESIGN.md section 1), localization and calibration beside it in
engine/, the judges in judges/. The cost meter (meter.py) counts the denoiser work of each phase.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import torch

from . import __version__
from .backends.base import Backend
from .cache import ImageCache, default_cache_dir
from .config import EraseConfig
from .engine.calibrate import CalibrationResult, calibrate
from .engine.localize import LocalizeResult, localize
from .engine.train import Cancel, Progress, train_delta
from .judges.probe import judge_templates, probe_set, reference_scores
from .judges.scorers import Scorer, make_scorer
from .lora import LoraDelta, LoRASet
from .meter import peak_memory_mb, total
from .registry import AUTO_BLOCKS

__all__ = ["Cancel", "EraseResult", "Progress", "erase"]


@dataclass
class EraseResult:
    lora: LoRASet  # still attached to the backend's denoiser: the model is erased until lora.detach()
    delta: LoraDelta | None = None  # the shipped delta with its metadata
    history: list[dict] = field(default_factory=list)
    checkpoints: list[tuple[int, dict]] = field(default_factory=list)  # (step, LoRA state)
    steps_done: int = 0
    stopped: str | None = None  # why training ended early, if it did
    seconds: float = 0.0  # the whole erase: localization, images, training, calibration
    peak_mem_mb: float = 0.0
    localization: LocalizeResult | None = None  # with blocks="auto"
    calibration: CalibrationResult | None = None  # with calibrate=True
    forwards_by_phase: dict[str, int] = field(default_factory=dict)  # the cost meter's count of this erase

    @property
    def forwards(self) -> int:
        """Denoiser sample-forwards of the whole erase (a backward counts as 2)."""
        return total(self.forwards_by_phase)


def erase(
    backend: Backend,
    cfg: EraseConfig,
    progress: Progress | None = None,
    cancel: Cancel | None = None,
    cache: ImageCache | None = None,
    scorer: Scorer | None = None,
) -> EraseResult:
    """Erase cfg.concepts from `backend`'s model: the whole SurgUn method. Leaves the LoRA attached.

    1. blocks="auto": localization picks the attention block groups (engine/localize.py);
    2. the SurgUn training loop on those blocks (engine/train.py), keeping checkpoints when calibrating;
    3. calibrate=True: the checkpoint to ship is chosen on the probe set (engine/calibrate.py).
    The scorer (cfg.scorer unless given) judges the probe images for steps 1 and 3.
    """
    t_start = time.time()
    metered = backend.meter.snapshot()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    cache = cache or ImageCache(default_cache_dir())
    auto = cfg.blocks.strip() == AUTO_BLOCKS
    probe = probe_set(cfg)
    if scorer is None and (auto or cfg.calibrate):
        scorer = make_scorer(cfg.scorer, backend, cfg.kind, clip_path=cfg.clip_path, templates=judge_templates(cfg))
    # the base model's scores on the probe set: "retain fell" is judged against them (before any LoRA is on)
    reference = reference_scores(backend, scorer, cfg.probe_steps, cfg.guidance) if scorer is not None else None
    base = reference(probe) if reference is not None else None
    loc = None
    if auto:
        loc = localize(backend, cfg, scorer, probe, progress=progress, cancel=cancel, cache=cache, reference=reference)
    pattern = loc.pattern if loc else cfg.block_pattern
    trained = train_delta(backend, cfg, pattern, progress, cancel, cache, cfg.checkpoint_interval)
    result = EraseResult(trained.lora, history=trained.history, checkpoints=trained.checkpoints,
                         steps_done=trained.steps_done, stopped=trained.stopped, localization=loc)  # fmt: skip
    if cfg.calibrate and result.checkpoints:
        try:
            result.calibration = calibrate(backend, result.lora, result.checkpoints, scorer, probe,
                                           cfg.erase_threshold, cfg.probe_steps, cfg.guidance, progress,
                                           cancel, cfg.retain_tolerance, base)  # fmt: skip
        except BaseException:
            result.lora.detach()  # cancelled or failed: the model is left as it was
            raise
    result.seconds = time.time() - t_start
    result.peak_mem_mb = peak_memory_mb(backend.device)
    result.forwards_by_phase = backend.meter.since(metered)
    result.delta = result.lora.to_delta(backend.lora_prefix, delta_metadata(backend, cfg, result))
    return result


def delta_metadata(backend: Backend, cfg: EraseConfig, result: EraseResult) -> dict:
    """Header metadata of the delta file (DESIGN.md section 4)."""
    cfg_json = {k: v for k, v in cfg.to_dict().items() if k != "extra"}
    cal, loc = result.calibration, result.localization
    return {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{backend.architecture}/lora",
        "modelspec.title": "SurgUn erase: " + ", ".join(cfg.concepts),
        "modelspec.description": "Concept erasure LoRA made by SurgUn (arXiv 2603.00975)",
        "surgun.version": __version__,
        "surgun.concepts": json.dumps(cfg.concepts),
        "surgun.kind": cfg.kind,
        "surgun.distractors": json.dumps(cfg.resolved_distractors()),
        "surgun.blocks": ", ".join(loc.chosen) if loc else cfg.blocks,
        "surgun.modules": json.dumps(sorted(result.lora.names)),
        "surgun.steps": str(result.steps_done),
        "surgun.step_chosen": str(cal.chosen_step if cal else result.steps_done),
        "surgun.calibration": json.dumps(cal.to_dict() if cal else {}),
        "surgun.localization": json.dumps(loc.to_dict() if loc else {}),
        "surgun.stopped": result.stopped or "",
        "surgun.base_fingerprint": backend.fingerprint(),
        "surgun.base_architecture": backend.architecture,
        "surgun.config": json.dumps(cfg_json),
        "surgun.final_loss": json.dumps(result.history[-1] if result.history else {}),
        "surgun.extra": json.dumps(cfg.extra),
        "surgun.seconds": f"{result.seconds:.1f}",
        "surgun.recipe": cfg.recipe,
        "surgun.forwards": str(result.forwards),
        "surgun.forwards_by_phase": json.dumps(result.forwards_by_phase),
    }
