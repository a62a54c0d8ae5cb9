"""The probe set and its scores: erase and retain as a judge sees them (localization, calibration, reports).

The probe set is prompts with the erased concepts and prompts with retained ones (same kind), at fixed
seeds. score_probe draws them with the model as it is now and asks a judge (scorers.py) which label each
image shows: erase = share of erased-prompt images NOT judged as their concept; retain = share of
retained-prompt images judged as theirs.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..backends.base import Backend
from ..concepts import templates_for
from ..config import EraseConfig
from .scorers import Scorer, make_scorer

PROBE_SEED = 7_000_000  # probe images use seeds far from the training images' seeds
Judge = Callable[[], contextlib.AbstractContextManager]  # a context in which the model is the base model


@dataclass
class ProbeSet:
    """Prompts with the erased concepts and with retained ones (same kind), fixed seeds."""

    erased: list[str]
    retained: list[str]
    templates: list[str]
    seeds: list[int] = field(default_factory=lambda: [1000, 1001])
    erased_rows: bool = True  # False: images of the retained concepts only (the erased ones stay among the labels)

    @property
    def drawn(self) -> list[str]:
        """The concepts whose prompts are drawn (erased first)."""
        return self.erased + self.retained if self.erased_rows else list(self.retained)

    def rows(self) -> list[tuple[str, str, int]]:
        """(prompt, label, seed) for every drawn concept x template x seed; erased concepts first."""
        return [(tpl.format(c), c, s) for c in self.drawn for tpl in self.templates for s in self.seeds]

    def row_templates(self) -> list[str]:
        """The template of each row (rows() order): the judge scores every label inside the row's own prompt."""
        return [tpl for _c in self.drawn for tpl in self.templates for _s in self.seeds]

    @property
    def labels(self) -> list[str]:
        return self.erased + self.retained


def probe_set(cfg: EraseConfig, erased_rows: bool = True) -> ProbeSet:
    """The probe prompts of an erasure: its concepts and the first few distractors (same kind), fixed seeds.

    erased_rows=False: only the retained concepts are drawn (calibration's "self" signal measures erasure
    without drawing); the erased concepts stay among the labels the judge chooses from."""
    templates = cfg.probe_templates or (cfg.templates or list(templates_for(cfg.kind)))[:2]
    retained = cfg.resolved_distractors()[: cfg.probe_retained]
    seeds = [PROBE_SEED + i for i in range(cfg.probe_seeds)]
    return ProbeSet(list(cfg.concepts), retained, templates, seeds, erased_rows)


def judge_for(cfg: EraseConfig, backend: Backend) -> Scorer:
    """The judge an erasure uses (cfg.scorer), batched like its sampler calls: the one place it is built."""
    return make_scorer(cfg.scorer, backend, cfg.kind, clip_path=cfg.clip_path, templates=judge_templates(cfg),
                       batch_size=2 * cfg.sample_batch_size)  # fmt: skip


def needs_judge(cfg: EraseConfig) -> bool:
    """Whether an erase judges probe images: calibration, or localization by short runs or first fit (gradient
    localization judges nothing)."""
    return cfg.scores_base or (cfg.localizes and cfg.localize_method == "short-runs")


def judge_templates(cfg: EraseConfig) -> list[str]:
    """The label prompts a judge scores: the concept alone, as in training (the first cfg.judge_prompts)."""
    return (cfg.templates or list(templates_for(cfg.kind)))[: cfg.judge_prompts]


@dataclass
class ProbeScores:
    erase: float  # share of erased-prompt images not judged as their concept
    retain: float  # share of retained-prompt images judged as their concept
    per_concept: dict[str, float]  # erased: share erased; retained: share kept
    x0: torch.Tensor | None = None  # the probe images (sample space), in ProbeSet.rows() order
    judged: list[str] | None = None  # the label the judge named for each image (rows() order)
    reused: int = 0  # images whose judgement was taken from `reuse` (unchanged images)

    @property
    def h(self) -> float:
        return 2 / (1 / max(self.erase, 1e-9) + 1 / max(self.retain, 1e-9))

    def to_dict(self) -> dict:
        return {"erase": self.erase, "retain": self.retain, "h": self.h, "per_concept": self.per_concept}


Reference = Callable[[ProbeSet], ProbeScores]  # the base model's scores on a probe set (reference_scores)


def score_probe(backend: Backend, scorer: Scorer, probe: ProbeSet, steps: int = 20, guidance: float | None = None,
                x0: torch.Tensor | None = None, judge: Judge | None = None, batch_size: int = 64,
                reuse: ProbeScores | None = None) -> ProbeScores:  # fmt: skip
    """Generate the probe images with the model as it is now (LoRA on, if attached) and score them.

    Args:
        judge: a context in which the model is the base model (e.g. LoRASet.disabled): the diffusion
            scorer must judge with the model from before the erasure, not with the erased one.
        x0: probe images already generated (ProbeSet.rows() order); then only the scoring runs.
        batch_size: images per sampler call (x2 rows with guidance): bounds GPU memory.
        reuse: scores of the same probe set by the same judge (the base model's): an image that is the same
            (same_image) keeps that judgement instead of being judged again.
    """
    rows = probe.rows()
    if x0 is None:
        with backend.meter.phase("probe images"):
            x0 = backend.sample([r[0] for r in rows], [r[2] for r in rows], steps, guidance, batch_size=batch_size)
    pred: list[str | None] = [None] * len(rows)
    if reuse is not None and reuse.judged is not None and reuse.x0 is not None and len(reuse.x0) == len(x0):
        for i in torch.nonzero(same_image(x0, reuse.x0)).flatten().tolist():
            pred[i] = reuse.judged[i]
    todo = [i for i, p in enumerate(pred) if p is None]
    if todo:
        with (judge or contextlib.nullcontext)(), backend.meter.phase("judging"):
            templates = probe.row_templates()
            for i, p in zip(todo, scorer.predict(x0[todo], probe.labels, [templates[i] for i in todo])):
                pred[i] = p
    per = {}
    for c in probe.drawn:
        hits = [p == c for p, r in zip(pred, rows) if r[1] == c]
        per[c] = sum(hits) / len(hits)
        if c in probe.erased:
            per[c] = 1 - per[c]
    # no erased rows drawn: erase is not measured here (0.0)
    erase = sum(per[c] for c in probe.erased) / len(probe.erased) if probe.erased_rows else 0.0
    retain = sum(per[c] for c in probe.retained) / len(probe.retained) if probe.retained else 1.0
    return ProbeScores(erase, retain, per, x0, list(pred), len(rows) - len(todo))


SAME_IMAGE = 0.02  # relative RMS difference under which a probe image counts as unchanged (its judgement reused)


def same_image(x0: torch.Tensor, ref: torch.Tensor, tol: float = SAME_IMAGE) -> torch.Tensor:
    """(N,) bool: images that differ from `ref` by less than `tol` of its RMS (a checkpoint left them as they
    were, so the judge would see the same image)."""
    diff = (x0.float() - ref.float()).flatten(1).norm(dim=1)
    return diff < tol * ref.float().flatten(1).norm(dim=1).clamp_min(1e-8)


def fits(erase: float, retain: float, threshold: float, base_retain: float, tolerance: float) -> bool:
    """An erasure that reaches the erase threshold with no retain fall against the base model's retain
    (within `tolerance`): the test widest-first localization and last-first calibration stop on."""
    return erase >= threshold and retain >= base_retain - tolerance - 1e-9


def reference_scores(backend: Backend, scorer: Scorer, steps: int = 20, guidance: float | None = None,
                     batch_size: int = 64) -> Reference:  # fmt: skip
    """The base model's own scores on a probe set, computed once per probe set (cost meter phase "reference").

    What "retain fell" is measured against: the judge misreads some base images too, so an erased model is
    held to the base model's retain score, not to 1.0. Call it the first time while no LoRA is attached (or
    with the LoRA disabled): it scores the model as it is.
    """
    memo: dict[str, ProbeScores] = {}

    def reference(probe: ProbeSet) -> ProbeScores:
        key = json.dumps(probe.rows())
        if key not in memo:
            with backend.meter.phase("reference"):
                memo[key] = score_probe(backend, scorer, probe, steps, guidance, batch_size=batch_size)
        return memo[key]

    return reference
