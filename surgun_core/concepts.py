"""Built-in prompt templates and distractor lists per concept kind (DESIGN.md section 1).

A distractor is a concept of the same kind as the target; SurgUn teaches the model to draw distractors
under the target prompt, so the target prompt spreads over several non-target modes.
"""

from __future__ import annotations

from .errors import ConfigError

TEMPLATES: dict[str, tuple[str, ...]] = {
    "object": ("a photo of a {}", "a {}", "a drawing of a {}", "a painting of a {}"),
    "style": ("a painting in the style of {}", "an image in {} style", "{} artwork"),
}

DISTRACTORS: dict[str, tuple[str, ...]] = {
    "object": (
        "dog", "cat", "car", "tree", "house", "bicycle", "chair", "apple", "bird", "boat",
        "flower", "horse", "airplane", "clock", "mountain", "guitar",
    ),
    "style": (
        "Claude Monet", "Pablo Picasso", "Rembrandt", "Katsushika Hokusai", "Salvador Dali",
        "Frida Kahlo", "Gustav Klimt", "Edward Hopper", "Wassily Kandinsky", "J. M. W. Turner",
        "Henri Matisse", "Georgia O'Keeffe",
    ),
}  # fmt: skip

KINDS = tuple(TEMPLATES)


def templates_for(kind: str) -> tuple[str, ...]:
    if kind not in TEMPLATES:
        raise ConfigError("kind", f"unknown kind {kind!r}; choose one of {', '.join(KINDS)}")
    return TEMPLATES[kind]


def builtin_distractors(kind: str, exclude: list[str]) -> list[str]:
    """The built-in distractors of a kind, minus the targets (case-insensitive)."""
    templates_for(kind)
    skip = {c.strip().lower() for c in exclude}
    return [d for d in DISTRACTORS[kind] if d.lower() not in skip]


def expand(templates: tuple[str, ...] | list[str], concept: str) -> list[str]:
    return [t.format(concept) for t in templates]
