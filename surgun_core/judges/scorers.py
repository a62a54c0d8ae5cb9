"""Scorers: who judges whether a generated image shows a concept (DESIGN.md section 2).

Every scorer answers one question: for each image, which of these labels does it show? The probe set
(prompts with the erased concepts and prompts with retained ones, fixed seeds) turns those answers into
an erase score (share of erased-prompt images NOT judged as the erased concept) and a retain score (share
of retained-prompt images judged as their own concept). Localization and calibration use them.

Scorers (registry SCORERS):
  toy        the toy world's ground-truth classifier (toy shapes and colours only)
  diffusion  the base model itself as a zero-shot judge (Li et al., "Your Diffusion Model is Secretly a
             Zero-Shot Classifier", ICCV 2023, arXiv 2303.16203): the label whose prompt best denoises the
             image, over fixed timesteps and noise. Needs no extra weights: what real-checkpoint users get.
  clip       a CLIP model from a local folder (transformers format), zero-shot over the label prompts
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from pathlib import Path

import torch

from ..backends.base import Backend, cond_select
from ..concepts import templates_for
from ..errors import ConfigError
from ..registry import SCORER_NAMES
from ..toyworld.classifier import load_classifier
from ..toyworld.paths import CLASSIFIER_FILE
from ..toyworld.world import COLOURS, SHAPES

log = logging.getLogger(__name__)


class Scorer(ABC):
    name: str

    @abstractmethod
    def predict(self, x0: torch.Tensor, labels: list[str], prompts: list[str] | None = None) -> list[str]:
        """The label each sample (backend sample space, (N, C, H, W)) shows, one of `labels`.

        prompts: per sample, the prompt it was drawn from with its label replaced by "{}" (e.g. "a {} in
        purple"): a judge that reads text scores each label inside that prompt (None: its own templates).
        """


class ToyScorer(Scorer):
    """Ground truth for the toy world: its shipped shape/colour classifier."""

    name = "toy"

    def __init__(self, backend: Backend, classifier=None) -> None:
        self.backend = backend
        self.clf = classifier or load_classifier(CLASSIFIER_FILE)

    def predict(self, x0: torch.Tensor, labels: list[str], prompts: list[str] | None = None) -> list[str]:
        images = torch.cat([self.backend.decode(x0[i : i + 64].to(self.backend.device)).float().cpu()
                            for i in range(0, len(x0), 64)])  # fmt: skip
        shapes, colours = self.clf.predict(images * 2 - 1)
        if set(labels) <= set(SHAPES):
            return shapes
        if set(labels) <= set(COLOURS):
            return colours
        raise ConfigError("scorer", f"the toy scorer judges toy shapes ({', '.join(SHAPES)}) or colours "
                          f"({', '.join(COLOURS)}), not {sorted(set(labels) - set(SHAPES) - set(COLOURS))}; "
                          "use the diffusion scorer for other concepts")  # fmt: skip


class DiffusionScorer(Scorer):
    """The base model as a zero-shot classifier: argmin over labels of its denoising error.

    Each image is noised at `timesteps` fixed timesteps with fixed noise; every label is scored on the
    same noisy inputs (paired comparison: the noise cancels out), averaged over the label's prompt
    templates, or, given each image's own prompt, inside that prompt (Li et al. score the class inside the
    image's caption). Run it on the BASE model (score_probe's `judge` context, e.g. LoRASet.disabled).

    Why 8 timesteps and the image's own prompt: on the toy world's 80 probe images of a circle erasure, the
    judge disagreed with the ground-truth classifier on 5 images with 4 timesteps and "a {}", on 3 with the
    own prompt, on 2 with 8 timesteps, on none with both (rings drawn by the erased model read as circles).
    """

    name = "diffusion"

    def __init__(self, backend: Backend, kind: str = "object", templates: list[str] | None = None,
                 timesteps: int = 8, batch_size: int = 128, seed: int = 0) -> None:  # fmt: skip
        self.backend = backend
        self.templates = list(templates or templates_for(kind)[:2])
        self.timesteps = timesteps
        self.batch_size = batch_size
        self.seed = seed

    @torch.no_grad()
    def errors(self, x0: torch.Tensor, labels: list[str], prompts: list[str] | None = None) -> torch.Tensor:
        """(N, L) mean denoising error of each sample under each label's prompts (or inside its own prompt)."""
        if prompts is not None:
            if len(prompts) != len(x0):
                raise ValueError(f"one prompt per image: {len(prompts)} prompts for {len(x0)} images")
            out = torch.zeros(len(x0), len(labels))
            for tpl in dict.fromkeys(prompts):  # a prompt with no "{}" for the label: the judge's own templates
                idx = [i for i, p in enumerate(prompts) if p == tpl]
                out[idx] = self._errors(x0[idx], labels, [tpl] if "{}" in tpl else self.templates)
            return out
        return self._errors(x0, labels, self.templates)

    def _errors(self, x0: torch.Tensor, labels: list[str], templates: list[str]) -> torch.Tensor:
        b, obj = self.backend, self.backend.objective
        n, k = len(x0), self.timesteps
        t = obj.t_grid(k).repeat(n)  # (N*k,) image-major
        g = torch.Generator().manual_seed(self.seed)
        noise = torch.randn((k, *x0.shape[1:]), generator=g).repeat(n, 1, 1, 1)  # same noise for every image
        x = x0.repeat_interleave(k, 0)
        prompts = [tpl.format(lab) for lab in labels for tpl in templates]
        cond = b.encode(prompts)
        err = torch.zeros(n * k, len(prompts))
        for i in range(0, n * k, self.batch_size):
            xs, ts, es = x[i : i + self.batch_size], t[i : i + self.batch_size], noise[i : i + self.batch_size]
            xs, es = xs.to(b.device, b.dtype), es.to(b.device, b.dtype)
            x_t = obj.noisy(xs, es, ts.to(b.device))
            target = obj.target(xs, es, ts.to(b.device)).float()
            tm = obj.model_time(ts).to(b.device)
            for j in range(len(prompts)):
                pred = b.predict(x_t, tm, cond_select(cond, [j] * len(xs))).float()
                err[i : i + len(xs), j] = ((pred - target) ** 2).flatten(1).mean(1).cpu()
        per_prompt = err.view(n, k, len(labels), len(templates))
        return per_prompt.mean(dim=(1, 3))

    def predict(self, x0: torch.Tensor, labels: list[str], prompts: list[str] | None = None) -> list[str]:
        best = self.errors(x0, labels, prompts).argmin(1)
        return [labels[i] for i in best]


class ClipScorer(Scorer):
    """CLIP zero-shot from a local folder (transformers CLIPModel + CLIPProcessor); nothing is downloaded."""

    name = "clip"

    def __init__(self, backend: Backend, path: str | Path | None, kind: str = "object",
                 templates: list[str] | None = None) -> None:  # fmt: skip
        if not path or not Path(path).is_dir():
            raise ConfigError("clip_path", f"the clip scorer needs a local CLIP folder (transformers format), got "
                              f"{path!r}; give its path or use the diffusion scorer")  # fmt: skip
        from transformers import CLIPModel, CLIPProcessor

        self.backend = backend
        self.model = CLIPModel.from_pretrained(path, local_files_only=True).eval()
        self.proc = CLIPProcessor.from_pretrained(path, local_files_only=True)
        self.templates = list(templates or templates_for(kind)[:1])

    @torch.no_grad()
    def predict(self, x0: torch.Tensor, labels: list[str], prompts: list[str] | None = None) -> list[str]:
        images = [self.backend.decode(x0[i : i + 1].to(self.backend.device)).float().cpu()[0] for i in range(len(x0))]
        texts = [tpl.format(lab) for lab in labels for tpl in self.templates]
        inp = self.proc(text=texts, images=[im.permute(1, 2, 0).numpy() for im in images], return_tensors="pt",
                        padding=True, do_rescale=False)  # fmt: skip
        logits = self.model(**inp).logits_per_image.view(len(images), len(labels), len(self.templates)).mean(2)
        return [labels[i] for i in logits.argmax(1)]


SCORERS: dict[str, type[Scorer]] = {"diffusion": DiffusionScorer, "toy": ToyScorer, "clip": ClipScorer}
assert tuple(SCORERS) == SCORER_NAMES  # registry.py names them for config validation


def make_scorer(name: str, backend: Backend, kind: str = "object", *, clip_path: str | None = None,
                templates: list[str] | None = None, classifier=None, batch_size: int = 128) -> Scorer:  # fmt: skip
    """A scorer by registry name; an unknown name lists the valid ones. batch_size: rows per denoiser call of
    the diffusion judge (GPU memory)."""
    if name == "toy":
        return ToyScorer(backend, classifier)
    if name == "diffusion":
        return DiffusionScorer(backend, kind, templates, batch_size=batch_size)
    if name == "clip":
        return ClipScorer(backend, clip_path, kind, templates)
    raise ConfigError("scorer", f"unknown scorer {name!r}; choose one of {', '.join(SCORERS)}")
