"""Toy-world metrics (DESIGN.md section 3, UnlearnCanvas definitions) judged by the ground-truth classifier.

UA   share of images from prompts with the erased concept NOT classified as it
IRA  same-kind accuracy on prompts of the other concepts of that kind
CRA  other-kind accuracy on prompts without the erased concept
drift  mean absolute pixel change (0..1 scale) against the base model on retain prompts, same seeds
H    harmonic mean of UA, IRA, CRA
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch

from ..backends.base import Backend
from ..errors import ConfigError
from .classifier import ToyClassifier
from .world import COLOURS, EVAL_TEMPLATE, HELDOUT_TEMPLATES, SHAPES


@dataclass
class ToyImages:
    shapes: list[str]
    colours: list[str]
    seeds: list[int]
    prompts: list[str]
    images: torch.Tensor  # (N, 3, 16, 16) in [0, 1]


def concept_kind(concept: str) -> str:
    if concept in SHAPES:
        return "object"
    if concept in COLOURS:
        return "style"
    raise ConfigError("concept", f"{concept!r} is not in the toy world; choose one of {', '.join(SHAPES + COLOURS)}")


def toy_prompts(seeds_per_pair: int, templates=(EVAL_TEMPLATE,), seed0: int = 10_000):
    """Every (shape, colour) pair x template x seed, in a fixed order."""
    rows = []
    for s in SHAPES:
        for c in COLOURS:
            for ti, t in enumerate(templates):
                for k in range(seeds_per_pair):
                    rows.append((s, c, seed0 + 97 * ti + k, t.format(s=s, c=c)))
    return rows


def generate_toy(backend: Backend, rows, steps: int = 20, guidance: float | None = None, on_batch=None) -> ToyImages:
    shapes, colours, seeds, prompts = (list(x) for x in zip(*rows))
    images = backend.generate(prompts, seeds, steps, guidance, on_batch=on_batch)
    return ToyImages(shapes, colours, seeds, prompts, images)


def accuracy_table(imgs: ToyImages, clf: ToyClassifier) -> dict[tuple[str, str], tuple[float, float]]:
    """Per (shape, colour): (shape accuracy, colour accuracy)."""
    ps, pc = clf.predict(imgs.images * 2 - 1)
    out = {}
    for s in SHAPES:
        for c in COLOURS:
            idx = [i for i, (a, b) in enumerate(zip(imgs.shapes, imgs.colours)) if a == s and b == c]
            out[(s, c)] = (float(np.mean([ps[i] == s for i in idx])), float(np.mean([pc[i] == c for i in idx])))
    return out


def erase_metrics(before: ToyImages, after: ToyImages, clf: ToyClassifier, concept: str) -> dict[str, float]:
    """UA, IRA, CRA, drift and H for erasing `concept`, from base and erased images of the same rows."""
    kind = concept_kind(concept)
    ps, pc = clf.predict(after.images * 2 - 1)
    same, other = (ps, pc) if kind == "object" else (pc, ps)
    same_true, other_true = (after.shapes, after.colours) if kind == "object" else (after.colours, after.shapes)
    has = np.array([v == concept for v in same_true])
    ua = float(np.mean([p != concept for p, h in zip(same, has) if h]))
    ira = float(np.mean([p == t for p, t, h in zip(same, same_true, has) if not h]))
    cra = float(np.mean([p == t for p, t, h in zip(other, other_true, has) if not h]))
    keep = torch.from_numpy(~has)
    drift = float((after.images[keep] - before.images[keep]).abs().mean())
    h = 3 / (1 / max(ua, 1e-9) + 1 / max(ira, 1e-9) + 1 / max(cra, 1e-9))
    pool = SHAPES if kind == "object" else COLOURS
    drawn_as = [p for p, hh in zip(same, has) if hh and p != concept]
    return {"ua": ua, "ira": ira, "cra": cra, "drift": drift, "h": h,
            "spread": spread(drawn_as, [c for c in pool if c != concept])}  # fmt: skip


def spread(drawn_as: list[str], others: list[str]) -> float:
    """Normalized entropy of what the erased concept's prompts are drawn as, over the other concepts of its kind.

    Args:
        drawn_as: the label of each erased image (one not judged as the concept).
        others: the other concepts of the kind (K of them).
    Returns:
        1.0 when the images spread evenly over the K others, 0.0 when they all became one proxy (or none
        was erased).
    """
    if not drawn_as or len(others) < 2:
        return 0.0
    p = np.array([drawn_as.count(o) for o in others], dtype=float) / len(drawn_as)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum() / np.log(len(others))) + 0.0  # + 0.0: one proxy gives 0.0, not -0.0


@contextlib.contextmanager
def lora_off(lora):
    with lora.disabled() if lora is not None else contextlib.nullcontext():
        yield


def evaluate_erasure(backend: Backend, lora, clf: ToyClassifier, concept: str, seeds_per_pair: int = 8,
                     steps: int = 20, guidance: float | None = None, heldout: bool = True,
                     on_batch=None):  # fmt: skip
    """Generate before (LoRA off) and after (LoRA on) for every pair; return (metrics, before, after).

    With heldout=True the rows also use the phrasings never seen in training, so a leak through new
    wording shows up in UA.
    """
    templates = (EVAL_TEMPLATE, *HELDOUT_TEMPLATES) if heldout else (EVAL_TEMPLATE,)
    rows = toy_prompts(seeds_per_pair, templates)
    n = len(rows)
    with lora_off(lora):
        before = generate_toy(backend, rows, steps, guidance, on_batch and (lambda d, _: on_batch(d, 2 * n)))
    after = generate_toy(backend, rows, steps, guidance, on_batch and (lambda d, _: on_batch(n + d, 2 * n)))
    return erase_metrics(before, after, clf, concept), before, after


def format_table(table: dict[tuple[str, str], tuple[float, float]]) -> str:
    """Markdown table: rows shapes, columns colours, cells 'shape acc / colour acc'."""
    lines = ["| shape \\ colour | " + " | ".join(COLOURS) + " |", "|---" * (len(COLOURS) + 1) + "|"]
    for s in SHAPES:
        cells = [f"{table[(s, c)][0]:.2f} / {table[(s, c)][1]:.2f}" for c in COLOURS]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
