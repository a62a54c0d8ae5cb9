"""The toy world: shapes (objects) x colours (styles), rendered at 16x16 (DESIGN.md section 3).

Everything here is pure numpy/torch and deterministic given a generator, so the shipped weights can be
reproduced from a fixed seed.
"""

from __future__ import annotations

import numpy as np
import torch

IMAGE_SIZE = 16
SHAPES = ("circle", "square", "triangle", "cross", "ring")
COLOURS = ("red", "green", "blue", "yellow", "purple")
RGB = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 215, 40),
    "purple": (165, 60, 210),
}
BACKGROUND = (16, 16, 16)

# Templates the base model is trained on. {s} is a shape, {c} a colour. The "object" and "style" lists are
# the same phrasings the engine uses by default for a concept of that kind (surgun_core.prompts), so the
# toy model understands the prompts the engine builds.
FULL_TEMPLATES = (
    "a {c} {s}",
    "a photo of a {c} {s}",
    "a drawing of a {c} {s}",
    "a painting of a {c} {s}",
    "a {s} in {c}",
    "a {c} {s}, painting",
)
OBJECT_TEMPLATES = ("a photo of a {s}", "a {s}", "a drawing of a {s}", "a painting of a {s}")
STYLE_TEMPLATES = (
    "a painting in the style of {c}",
    "an image in {c} style",
    "{c} artwork",
    "a {c} shape",
)
# Never seen in training: used by evaluation to test that an erasure does not leak through new phrasing.
HELDOUT_TEMPLATES = ("an image of a {c} {s}", "a {c} {s} in the style of {c}")
EVAL_TEMPLATE = "a {c} {s}"

SUPERSAMPLE = 4


def _mask(shape: str, cx: float, cy: float, r: float, size: int = IMAGE_SIZE) -> np.ndarray:
    """Anti-aliased coverage mask (size, size) in [0, 1] of one shape centred at (cx, cy), radius r."""
    n = size * SUPERSAMPLE
    coords = (np.arange(n) + 0.5) / SUPERSAMPLE
    y, x = np.meshgrid(coords, coords, indexing="ij")
    dx, dy = x - cx, y - cy
    if shape == "circle":
        m = dx**2 + dy**2 <= r**2
    elif shape == "ring":
        d = np.sqrt(dx**2 + dy**2)
        m = (d <= r) & (d >= r - max(1.8, 0.38 * r))
    elif shape == "square":
        h = 0.82 * r
        m = (np.abs(dx) <= h) & (np.abs(dy) <= h)
    elif shape == "triangle":
        # upward triangle: apex at top, base at bottom
        top, bottom = cy - r, cy + 0.8 * r
        frac = (y - top) / (bottom - top)
        m = (y >= top) & (y <= bottom) & (np.abs(dx) <= frac * r)
    elif shape == "cross":
        w = 0.36 * r
        m = ((np.abs(dx) <= w) & (np.abs(dy) <= r)) | ((np.abs(dy) <= w) & (np.abs(dx) <= r))
    else:
        raise ValueError(f"unknown shape {shape!r}; known shapes: {', '.join(SHAPES)}")
    return m.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).mean(axis=(1, 3))


def render(shape: str, colour: str, rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
    """One image (3, size, size) float32 in [-1, 1]: a shape of a colour at a random place and size."""
    r = rng.uniform(0.27, 0.42) * size
    margin = r + 0.5
    cx, cy = rng.uniform(margin, size - margin, size=2)
    m = _mask(shape, cx, cy, r, size)[None]
    fg = np.array(RGB[colour], dtype=np.float32)[:, None, None] / 255.0
    fg = np.clip(fg + rng.normal(0, 0.03, size=(3, 1, 1)), 0, 1)  # slight tint jitter
    bg = np.array(BACKGROUND, dtype=np.float32)[:, None, None] / 255.0
    img = m * fg + (1 - m) * bg
    return (img * 2 - 1).astype(np.float32)


def render_batch(shapes, colours, rng: np.random.Generator) -> torch.Tensor:
    """(B, 3, 16, 16) in [-1, 1] for parallel lists of shape and colour names."""
    return torch.from_numpy(np.stack([render(s, c, rng) for s, c in zip(shapes, colours, strict=True)]))


def photos(concept: str, n: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """`n` of the world's own images of a shape or colour (the other attribute cycling) and, for each, the
    other attribute's word: what a real photo of the concept is to a real model (attacks invert against them).
    """
    if concept in SHAPES:
        others = [COLOURS[i % len(COLOURS)] for i in range(n)]
        shapes, colours = [concept] * n, others
    elif concept in COLOURS:
        others = [SHAPES[i % len(SHAPES)] for i in range(n)]
        shapes, colours = others, [concept] * n
    else:
        raise ValueError(f"unknown concept {concept!r}; the toy world has {', '.join(SHAPES + COLOURS)}")
    return render_batch(shapes, colours, np.random.default_rng(seed)), others


def training_prompt(shape: str, colour: str, rng: np.random.Generator) -> str:
    """A prompt that describes an image of (shape, colour): mostly both, sometimes one of them only."""
    u = rng.uniform()
    if u < 0.7:
        t = FULL_TEMPLATES[rng.integers(len(FULL_TEMPLATES))]
    elif u < 0.85:
        t = OBJECT_TEMPLATES[rng.integers(len(OBJECT_TEMPLATES))]
    else:
        t = STYLE_TEMPLATES[rng.integers(len(STYLE_TEMPLATES))]
    return t.format(s=shape, c=colour)


def vocabulary() -> list[str]:
    """Every word in every template and concept, in a fixed order."""
    words: list[str] = []
    all_t = FULL_TEMPLATES + OBJECT_TEMPLATES + STYLE_TEMPLATES + HELDOUT_TEMPLATES
    for text in [t.format(s="", c="") for t in all_t] + list(SHAPES) + list(COLOURS):
        for w in text.replace(",", " , ").split():
            if w not in words:
                words.append(w)
    for extra in ("shape", "thing", "object", "style", "picture"):
        if extra not in words:
            words.append(extra)
    return words
