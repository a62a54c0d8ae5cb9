"""What calibration measures on one checkpoint: erase and retain, as EraseConfig.calibrate_signal says.

"probe": the probe images of every probe concept are drawn with the checkpoint and judged (scorers.py).
"self": erasure is measured without drawing. Held-out images of each erased concept, drawn once by the base model,
are classified by the erased model itself, as a diffusion classifier over the probe labels (Li et al., arXiv
2303.16203, with the checkpoint's LoRA on): an image whose own prompt no longer denoises it best under the concept's
word counts as erased. SurgUn trains the concept's word to lose the competition against the distractors; once the
erased model no longer explains the concept's own images by that word, it no longer draws them. Retain is still
judged on drawn images, the retained concepts' probe images (a neighbour drawn as the erased concept is a fall the
erased model's verdict on base images cannot see), by the base model as before.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..backends.base import Backend
from ..config import EraseConfig
from ..lora import LoRASet
from .probe import PROBE_SEED, ProbeScores, ProbeSet, Reference, probe_set, score_probe
from .scorers import DiffusionScorer, Scorer

Measure = Callable[[LoRASet], ProbeScores]  # scores the model as it is now (the checkpoint's LoRA on)


@dataclass
class ProbeMeasure:
    """Erase and retain from the probe images drawn with the checkpoint, judged by `scorer` on the base model."""

    backend: Backend
    scorer: Scorer
    probe: ProbeSet
    steps: int
    guidance: float | None
    batch_size: int
    reference: ProbeScores | None = None  # the base model's scores: unchanged images keep their judgement

    def __call__(self, lora: LoRASet) -> ProbeScores:
        return score_probe(self.backend, self.scorer, self.probe, self.steps, self.guidance, judge=lora.disabled,
                           batch_size=self.batch_size, reuse=self.reference)  # fmt: skip


@dataclass
class SelfMeasure:
    """Erase: the erased model's own verdict on held-out base images of the erased concepts; retain: `retain`."""

    retain: ProbeMeasure  # over the retained concepts' probe rows (ProbeSet.erased_rows False)
    images: torch.Tensor  # held-out base images of the erased concepts (sample space)
    owners: list[str]  # the erased concept of each image
    templates: list[str]  # each image's prompt template ("{}": the concept): every label is scored inside it
    judge: DiffusionScorer  # run on the erased model (LoRA on)

    seen: dict = field(default_factory=dict)  # verdicts by LoRA state: a checkpoint judged while training is not again

    def __call__(self, lora: LoRASet) -> ProbeScores:
        kept = self.retain(lora)
        erase, per = self.verdict(lora)
        return ProbeScores(erase, kept.retain, {**kept.per_concept, **per}, kept.x0, kept.judged, kept.reused)

    def verdict(self, lora: LoRASet) -> tuple[float, dict[str, float]]:
        """The erase score and each erased concept's share, as the model with `lora` on judges the held-out images."""
        digest = hashlib.sha256()
        for p in lora.parameters():
            digest.update(p.detach().float().cpu().numpy().tobytes())
        key = digest.hexdigest()  # the LoRA's state: its checkpoint
        if key not in self.seen:
            with self.retain.backend.meter.phase("self-judging"):  # the erased model judges: its LoRA stays on
                named = self.judge.predict(self.images, self.retain.probe.labels, self.templates)
            per = {}
            for c in dict.fromkeys(self.owners):
                mine = [n for n, o in zip(named, self.owners) if o == c]
                per[c] = sum(n != c for n in mine) / len(mine)
            self.seen[key] = (sum(per.values()) / len(per), per)
        return self.seen[key]


def calibration_probe(cfg: EraseConfig) -> ProbeSet:
    """The probe set calibration draws: "probe" every probe concept's rows, "self" the retained concepts' only."""
    return probe_set(cfg, erased_rows=cfg.calibrate_signal == "probe")


def checkpoint_measure(backend: Backend, cfg: EraseConfig, scorer: Scorer,
                       reference: Reference) -> tuple[Measure, ProbeScores]:  # fmt: skip
    """Calibration's measure for cfg.calibrate_signal and the base model's scores it is held to.

    Call it before the LoRA is attached: the reference and the held-out images are the base model's.
    """
    kwargs = dict(steps=cfg.probe_steps, guidance=cfg.guidance, batch_size=cfg.sample_batch_size)
    probe = calibration_probe(cfg)
    base = reference(probe)
    if cfg.calibrate_signal == "probe":
        return ProbeMeasure(backend, scorer, probe, reference=base, **kwargs), base
    templates = probe.templates
    rows = [(c, templates[i % len(templates)], PROBE_SEED + i // len(templates))
            for c in probe.erased for i in range(cfg.self_judge_images)]  # fmt: skip
    with backend.meter.phase("reference"), backend.meter.phase("probe images"):
        images = backend.sample([tpl.format(c) for c, tpl, _ in rows], [s for *_, s in rows], cfg.probe_steps,
                                cfg.guidance, batch_size=cfg.sample_batch_size)  # fmt: skip
    judge = DiffusionScorer(backend, cfg.kind, timesteps=cfg.self_judge_timesteps,
                            batch_size=2 * cfg.sample_batch_size)  # fmt: skip
    retain = ProbeMeasure(backend, scorer, probe, reference=base, **kwargs)
    return SelfMeasure(retain, images, [c for c, *_ in rows], [tpl for _, tpl, _ in rows], judge), base
