"""The SurgUn method as one call (DESIGN.md section 2, the orchestrator): localize -> train -> calibrate -> delta.

Every front end calls erase(). The stages live below it: the loss, one step and the loop in engine/train.py
(L = -w_A L_T + w_D L_D + w_C L_C + w_R L_R, DESIGN.md section 1), localization and calibration beside it in
engine/, the judges in judges/. The cost meter (meter.py) counts the denoiser work of each phase.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field, replace

import torch

from . import __version__
from .backends.base import Backend
from .cache import ImageCache, default_cache_dir
from .config import EraseConfig
from .engine.calibrate import CalibrationResult, calibrate
from .engine.localize import LocalizeResult, localize, widest_group
from .engine.train import Cancel, Progress, train_delta
from .judges.checkpoint import Measure, checkpoint_measure
from .judges.probe import ProbeScores, fits, judge_for, needs_judge, probe_set, reference_scores
from .judges.scorers import Scorer
from .lora import LoraDelta, LoRASet
from .meter import peak_memory_mb, total
from .registry import CALIBRATION_SIGNALS

__all__ = ["Cancel", "EraseResult", "Progress", "erase"]
log = logging.getLogger(__name__)


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
    extended_steps: int = 0  # steps trained beyond cfg.steps because no checkpoint erased (cfg.extend_steps)
    let_go_scored: int = 0  # checkpoints calibration scored on the widest group's full run before it was let go
    let_go_steps: int = 0  # steps the widest group's full run trained before it was let go
    erased_at: int | None = None  # stop_when_erased: the checkpoint at which training stopped, erased

    @property
    def forwards(self) -> int:
        """Denoiser sample-forwards of the whole erase (a backward counts as 2)."""
        return total(self.forwards_by_phase)

    def notes(self) -> list[str]:
        """What a report says about where training ended: stopped early, or stopped once erased."""
        if self.stopped:
            return [f"note: {self.stopped}"]
        if self.erased_at is not None:
            ship = self.delta.metadata.get("surgun.step_chosen") if self.delta else None
            return [f"note: training stopped at step {self.erased_at}, the first checkpoint the erased model read as "
                    f"erased (stop_when_erased)" + (f"; step {ship} ships" if ship is not None else "")]  # fmt: skip
        return []


def erase(
    backend: Backend,
    cfg: EraseConfig,
    progress: Progress | None = None,
    cancel: Cancel | None = None,
    cache: ImageCache | None = None,
    scorer: Scorer | None = None,
) -> EraseResult:
    """Erase cfg.concepts from `backend`'s model: the whole SurgUn method. Leaves the LoRA attached.

    0. the base model's scores on the probe set: the reference "retain fell" is judged against;
    1. blocks="auto": localization (engine/localize.py). With localize_first_fit the widest group (every
       level's cross-attention K/V) is tried first, with the full run: when its calibrated step erases with
       no retain fall, it is kept and nothing else is tried; otherwise short runs rank the other groups;
    2. the SurgUn training loop on those blocks (engine/train.py), keeping checkpoints when calibrating;
    3. calibrate=True: the checkpoint to ship is chosen by cfg.calibrate_signal's measure (engine/calibrate.py,
       judges/checkpoint.py): the last, unless it does not erase or the judge sees retain fall there; when no
       checkpoint erases, cfg.extend_steps more steps from the last one (once), calibrated in turn.
    The scorer (cfg.scorer unless given) judges the probe images for steps 0, 1 and 3; what calibration measures
    on a checkpoint is cfg.calibrate_signal's (judges/checkpoint.py).
    """
    t_start = time.time()
    metered = backend.meter.snapshot()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    cache = cache or ImageCache(default_cache_dir())
    auto = cfg.localizes
    probe = probe_set(cfg)
    if scorer is None and needs_judge(cfg):
        scorer = judge_for(cfg, backend)
    # 0. the base model's scores, before any LoRA is on: what calibration's measure is held to (and first fit's)
    reference, measure, base = None, None, None
    if scorer is not None and cfg.scores_base:
        reference = reference_scores(backend, scorer, cfg.probe_steps, cfg.guidance, cfg.sample_batch_size)
        measure, base = checkpoint_measure(backend, cfg, scorer, reference)
    run = _Runner(backend, cfg, measure, base, progress, cancel, cache)
    result, loc, skip, let_go, let_go_steps = None, None, (), 0, 0
    if cfg.fits_widest_first and base is not None:  # 1a. the widest group, with the full run
        wide = widest_group(backend, cfg.localize_attention)
        result = run(wide.pattern, score_last=True)
        row = next(r for r in result.calibration.curve if r["step"] == result.calibration.chosen_step)
        if fits(row["erase"], row["retain"], cfg.erase_threshold, base.retain, cfg.retain_tolerance):
            loc = LocalizeResult([wide.name], wide.pattern, [{"name": wide.name, "layers": len(wide.modules), **row}],
                                 reason="the widest group, run in full, erased with no retain fall against the "
                                 "base model; narrower groups not tried")  # fmt: skip
        else:
            log.info("localization: %s let retain fall or did not erase (%s); ranking the narrower groups",
                     wide.name, row)  # fmt: skip
            result.lora.detach()
            let_go_steps = result.steps_done
            result, skip, let_go = None, (wide.name,), len(result.calibration.curve)
    if result is None:
        if auto:  # 1b. short runs rank the (other) groups
            loc = localize(backend, cfg, scorer, probe, progress=progress, cancel=cancel, cache=cache,
                           reference=reference, skip=skip)  # fmt: skip
        result = run(loc.pattern if loc else cfg.block_pattern, score_last=False)
    result.localization, result.let_go_scored = loc, let_go
    result.let_go_steps = let_go_steps if let_go else 0
    if not cfg.calibrate:
        result.calibration = None  # scored only to check the widest group: the last step ships
    result.seconds = time.time() - t_start
    result.peak_mem_mb = peak_memory_mb(backend.device)
    result.forwards_by_phase = backend.meter.since(metered)
    result.delta = result.lora.to_delta(backend.lora_prefix, delta_metadata(backend, cfg, result))
    return result


@dataclass
class _Runner:
    """Steps 2 and 3 on one set of blocks: train, then calibrate (or, with score_last, score the last step)."""

    backend: Backend
    cfg: EraseConfig
    measure: Measure | None
    base: ProbeScores | None
    progress: Progress | None
    cancel: Cancel | None
    cache: ImageCache

    def __call__(self, pattern: str, score_last: bool) -> EraseResult:
        cfg = self.cfg
        t = train_delta(self.backend, cfg, pattern, self.progress, self.cancel, self.cache, cfg.checkpoint_interval,
                        stop_at=self._stop_at())  # fmt: skip
        result = EraseResult(t.lora, history=t.history, checkpoints=t.checkpoints, steps_done=t.steps_done,
                             stopped=t.stopped, erased_at=t.erased_at)  # fmt: skip
        checkpoints = result.checkpoints if cfg.calibrate else [(t.steps_done, t.lora.snapshot())]
        if (cfg.calibrate or score_last) and checkpoints:
            result.calibration = self._calibrate(result.lora, checkpoints)
            if cfg.calibrate and cfg.extend_steps and not t.stopped and _none_erased(result.calibration):
                result = self._extend(pattern, result, t.adversary)
        return result

    def _stop_at(self):
        """stop_when_erased: the erased model's own verdict at each checkpoint (kept: calibration reads it again)."""
        if not (self.cfg.stops_when_erased and self.measure is not None):  # "self": the measure is a SelfMeasure
            return None
        return lambda lora: self.measure.verdict(lora)[0] >= self.cfg.erase_threshold

    def _calibrate(self, lora: LoRASet, checkpoints: list[tuple[int, dict]]) -> CalibrationResult:
        cfg = self.cfg
        try:
            return calibrate(self.backend, lora, checkpoints, self.measure, cfg.erase_threshold, cfg.retain_tolerance,
                             self.base, self.progress, self.cancel, stop_unerased=cfg.scan_stops_unerased)  # fmt: skip
        except BaseException:
            lora.detach()  # cancelled or failed: the model is left as it was
            raise

    def _extend(self, pattern: str, first: EraseResult, adversary: dict | None) -> EraseResult:
        """No checkpoint erased: train cfg.extend_steps more from the last one (once) and calibrate those; robust
        mode's attacker goes on from its last tokens (restarted from the word, it let the extension settle where
        inversion still found the concept: toy yellow, recovery 0.275)."""
        cfg, best = self.cfg, max(r["erase"] for r in first.calibration.curve)
        signal = CALIBRATION_SIGNALS[cfg.calibrate_signal]
        log.info("no checkpoint of %d steps erased (best erase %.2f < %g, %s): training %d steps more",
                 first.steps_done, best, cfg.erase_threshold, signal, cfg.extend_steps)  # fmt: skip
        last = first.checkpoints[-1][1]
        first.lora.detach()
        more = replace(cfg, steps=cfg.extend_steps, extend_steps=0)
        t = train_delta(self.backend, more, pattern, self.progress, self.cancel, self.cache, cfg.checkpoint_interval,
                        init_state=last, first_step=first.steps_done, init_adversary=adversary,
                        stop_at=self._stop_at())  # fmt: skip
        cal = self._calibrate(t.lora, t.checkpoints)
        cal.reason = (f"trained {cfg.extend_steps} steps more (no checkpoint of the first {first.steps_done} erased: "
                      f"best erase {best:.2f}, {signal}); {cal.reason}")  # fmt: skip
        cal.curve = first.calibration.curve + cal.curve
        return EraseResult(t.lora, history=first.history + t.history, checkpoints=first.checkpoints + t.checkpoints,
                           steps_done=t.steps_done, stopped=t.stopped, calibration=cal, erased_at=t.erased_at,
                           extended_steps=t.steps_done - first.steps_done)  # fmt: skip


def _none_erased(cal: CalibrationResult) -> bool:
    return all(r["erase"] < cal.threshold for r in cal.curve)


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
