"""What every attack shares: its settings, its result, how attacked images are judged, and the control run.

An attack tries to make the erased model draw the concept again. Its recovery rate is the share of attacked
images the judge names as the concept. The same attack, with the same settings and seeds, is also run on the
base model (the delta switched off): that control says whether the attack can find the concept at all, so a
low recovery means the erasure held, not that the attack was too weak (DESIGN.md section 2, Attacks).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..backends.base import Backend, Cond
from ..cache import ImageCache, default_cache_dir
from ..engine.data import generate_concept_images
from ..errors import ConfigError, SurgUnError
from ..judges.probe import Judge
from ..judges.scorers import Scorer
from ..meter import total
from ..toyworld.world import photos
from .prompts import attack_templates, is_toy, judge_labels, training_templates

log = logging.getLogger(__name__)

ATTACK_SEED = 8_000_000  # attack images and noise use seeds far from training and probe images
# settings of every attack: the sampler's (guidance None: the model's default) and where images of the concept come
# from ("auto": the toy world's own images on the toy model, the base model's elsewhere; "model": the base model's)
COMMON = {"sample_steps": 20, "guidance": None, "images_from": "auto"}
IMAGE_SOURCES = ("auto", "model")


@dataclass
class AttackResult:
    """One attack on one model: the erased one, or the base one for the control."""

    name: str
    model: str  # "erased" (the model as given) or "base" (the control: the delta switched off)
    concept: str
    recovery: float  # share of attacked images judged as the concept
    prompts: list[str]  # one per image; learned tokens appear as their placeholder
    seeds: list[int]
    judged: list[str]  # the judge's label for each image
    settings: dict
    seconds: float = 0.0
    forwards_by_phase: dict[str, int] = field(default_factory=dict)
    details: dict = field(default_factory=dict)  # per-attack extras: rate per strength, per phrasing, losses
    groups: list[str] | None = None  # each image's group (strength, phrasing) when the attack reports rates by group
    images: torch.Tensor | None = field(default=None, repr=False)  # (N, 3, H, W) in [0, 1]

    @property
    def forwards(self) -> int:
        """Denoiser sample-forwards of this run (a backward counts as 2), base images of the concept included."""
        return total(self.forwards_by_phase)

    def to_dict(self) -> dict:
        return {"model": self.model, "recovery": self.recovery, "images": len(self.prompts),
                "seconds": round(self.seconds, 2), "forwards": self.forwards,
                "forwards_by_phase": self.forwards_by_phase, "details": self.details,
                "prompts": sorted(set(self.prompts))}  # fmt: skip


@dataclass
class Attacked:
    """What an attack's run() hands back: the images it made, their prompts and seeds, and extras.

    `groups` splits the images into sets whose rates are reported apart (strengths, phrasings); recovery is
    the best group's rate when `best_of_groups`, else the rate over all images.
    """

    x0: torch.Tensor  # (N, C, H, W) sample space
    prompts: list[str]
    seeds: list[int]
    details: dict = field(default_factory=dict)
    groups: list[str] | None = None
    best_of_groups: bool = False


class Attack(ABC):
    """One attack. Subclasses set `name`, `defaults` (published settings) and `toy` (scaled to the toy world).

    Args:
        backend: the model under attack (with the erased LoRA attached, or the base model itself).
        judge: a context in which the model is the base model (e.g. LoRASet.disabled). The diffusion judge
            scores inside it; base images of the concept are drawn inside it; the control runs inside it.
            None: the backend is the base model already, so the control is the attack itself.
        settings: overrides of the attack's defaults; an unknown key is refused with the valid ones.
    """

    name: ClassVar[str]
    defaults: ClassVar[dict]
    toy: ClassVar[dict] = {}

    def __init__(self, backend: Backend, concept: str, kind: str, scorer: Scorer, judge: Judge | None = None,
                 seed: int = 0, settings: dict | None = None, cache: ImageCache | None = None) -> None:  # fmt: skip
        self.backend, self.concept, self.kind, self.scorer = backend, concept, kind, scorer
        self.judge = judge or contextlib.nullcontext
        self.delta = judge is not None  # without a judge context the backend is the base model itself
        self.seed = seed
        self.settings = self.settings_for(backend, settings or {})
        self.cache = cache or ImageCache(default_cache_dir())
        self.labels = judge_labels(backend, concept, kind)
        self._shared: dict = {}  # made once on the base model, used by both runs (e.g. the concept's images)

    @classmethod
    def settings_for(cls, backend: Backend, user: dict) -> dict:
        """The published defaults, scaled to the toy world when the backend is the toy model, then `user`'s."""
        base = {**COMMON, **cls.defaults, **(cls.toy if is_toy(backend) else {})}
        unknown = sorted(set(user) - set(base))
        if unknown:
            raise ConfigError("attack_settings", f"the {cls.name} attack has no setting {', '.join(unknown)}; "
                              f"its settings are {', '.join(sorted(base))}")  # fmt: skip
        if user.get("images_from", "auto") not in IMAGE_SOURCES:
            raise ConfigError("attack_settings", f"images_from must be one of {', '.join(IMAGE_SOURCES)}, "
                              f"not {user['images_from']!r}")  # fmt: skip
        return {**base, **user}

    # ---- what a subclass writes ------------------------------------------------------------------------

    @abstractmethod
    def run(self) -> Attacked:
        """Attack the model as it is now (erased, or base inside the judge context) and draw the images."""

    # ---- shared steps ---------------------------------------------------------------------------------

    def attack(self, control: bool = False) -> AttackResult:
        """Run the attack on the erased model, or (control=True) on the base model, and judge its images."""
        b, t0 = self.backend, time.time()
        phase = f"attacks/{self.name}" + ("/control" if control else "")
        before = b.meter.snapshot()
        with b.meter.phase(phase):
            with self.judge() if control else contextlib.nullcontext():
                out = self.run()
            with self.judge(), b.meter.phase("judging"):
                judged = self.scorer.predict(out.x0, self.labels)
        hits = [j == self.concept for j in judged]
        details = dict(out.details)
        if out.groups is not None:
            rates = {g: _mean([h for h, gg in zip(hits, out.groups) if gg == g]) for g in dict.fromkeys(out.groups)}
            details["rates"] = rates
            if out.best_of_groups:
                details["best"] = max(rates, key=rates.get)
            recovery = rates[details["best"]] if out.best_of_groups else _mean(hits)
        else:
            recovery = _mean(hits)
        images = torch.cat([b.decode(out.x0[i : i + 16].to(b.device)).float().cpu() for i in range(0, len(out.x0), 16)])
        model = "erased" if self.delta and not control else "base"
        res = AttackResult(self.name, model, self.concept, recovery, out.prompts, out.seeds, judged,
                           dict(self.settings), time.time() - t0, b.meter.since(before), details, out.groups,
                           images)  # fmt: skip
        log.info("%s attack on the %s model: recovery %.2f (%d images, %d forwards, %.1f s)", self.name, res.model,
                 recovery, len(judged), res.forwards, res.seconds)  # fmt: skip
        return res

    def concept_images(self, n: int) -> tuple[torch.Tensor, list[str]]:
        """`n` images of the concept (x0, sample space) and the phrasing ("{}" = the concept) of each.

        Textual inversion inverts photos of the concept. The toy world has them: its own images, each phrased
        "a <colour> {}" ("a {} <shape>" for a colour). A real model's photos are not at hand, so its images are
        the base model's, drawn with the delta switched off from the concept's training phrasings and cached
        per (model, prompt, seed) like an erasure's training images. The model's own guided images are a poor
        stand-in on the toy world: its denoising loss on them is no lower under "triangle" than under "square",
        and inverting them found triangle in 12% of the base model's images; the world's images: 100%.
        """
        if n not in self._shared:
            if is_toy(self.backend) and self.settings["images_from"] == "auto":
                x0, others = photos(self.concept, n, ATTACK_SEED + self.seed)
                per_image = [f"a {o} {{}}" if self.kind == "object" else f"a {{}} {o}" for o in others]
                self._shared[n] = (x0.to(self.backend.dtype), per_image)
            else:
                self._shared[n] = self._model_images(n)
        return self._shared[n]

    def _model_images(self, n: int) -> tuple[torch.Tensor, list[str]]:
        templates = self.templates()
        with self.judge(), self.backend.meter.phase("base images"):
            imgs = generate_concept_images(self.backend, [self.concept], templates, n, ATTACK_SEED + self.seed,
                                           self.settings["sample_steps"], self.guidance(), self.cache)  # fmt: skip
        per_image = [templates[j % len(templates)] for j in range(n)]  # generate_concept_images cycles them
        assert [t.format(self.concept) for t in per_image] == imgs.prompts
        return imgs.x0, per_image

    def templates(self) -> list[str]:
        """The concept's training phrasings ("{}"): the `templates` setting, else the model family's own."""
        return list(self.settings.get("templates") or training_templates(self.backend, self.concept, self.kind))

    def prompt_templates(self) -> list[str]:
        """The attacker's prompts ("{}" = the concept): the `prompts` setting, else the family's (prompts.py)."""
        return list(self.settings.get("prompts") or attack_templates(self.backend, self.kind))

    def guidance(self) -> float:
        g = self.settings["guidance"]
        return float(self.backend.default_guidance if g is None else g)

    def seeds(self, n: int) -> list[int]:
        """`n` seeds of this attack's images; the same for the erased and the base model."""
        return [ATTACK_SEED + 1_000 * self.seed + i for i in range(n)]

    def sample(self, prompts: list[str], seeds: list[int], cond: Cond | None = None) -> torch.Tensor:
        """Sampled x0 for (prompt, seed) pairs, from prepared conditioning when given, under phase "images"."""
        b = self.backend
        if cond is not None and "cond" not in inspect.signature(b.sample).parameters:
            raise SurgUnError(f"the {type(b).__name__} backend samples with its own sampler, which takes no "
                              f"prepared conditioning; the {self.name} attack needs a diffusers model")  # fmt: skip
        with b.meter.phase("images"):
            return b.sample(prompts, seeds, self.settings["sample_steps"], self.guidance(), cond=cond)


def _mean(xs: list[bool]) -> float:
    return sum(xs) / len(xs) if xs else 0.0
