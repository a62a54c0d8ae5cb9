"""Concept-erasure baselines for the benchmark (DESIGN.md section 2): ESD-x, ESD-u, UCE, Concept Ablation.

Each is written from its paper and official code (see each module's docstring) and edits the backend's
denoiser weights IN PLACE; the returned BaselineResult.restore() puts the original tensors back exactly.
"""

from __future__ import annotations

from collections.abc import Callable

from ...backends.base import Backend
from ...errors import ConfigError
from ._common import BaselineResult, Cancel, Progress
from .ca import erase_ca
from .esd import esd_u, esd_x
from .uce import erase_uce

BASELINES: dict[str, Callable[..., BaselineResult]] = {
    "esd-x": esd_x,
    "esd-u": esd_u,
    "uce": erase_uce,
    "ca": erase_ca,
}

__all__ = ["BASELINES", "BaselineResult", "run_baseline"]


def run_baseline(
    name: str,
    backend: Backend,
    concept: str,
    *,
    templates: list[str],
    preserve: list[str],
    anchor: str | None = None,
    seed: int = 0,
    iterations: int | None = None,
    lr: float | None = None,
    progress: Progress | None = None,
    cancel: Cancel | None = None,
    **options,
) -> BaselineResult:
    """Erase `concept` from `backend`'s denoiser with the baseline `name`, in place.

    Args:
        name: one of BASELINES ("esd-x", "esd-u", "uce", "ca").
        backend: the model; its denoiser's weights are changed until result.restore().
        concept: what to erase.
        templates: prompt templates with one "{}" each, e.g. ["a {}", "a photo of a {}"].
        preserve: other concepts to keep (UCE's preserve set; ignored by the others).
        anchor: the anchor concept of Concept Ablation (required for "ca"; ignored by the others).
        seed: seeds every random draw of the method.
        iterations, lr: None for the paper defaults; overrides for a quick run (UCE takes neither).
        progress: progress(phase, done, total, stats); phases "images", "train" or "edit" (UCE).
        cancel: polled between steps; when it returns True, Cancelled is raised and the weights restored.
        options: method-specific settings (each module's DEFAULTS), e.g. ddim_steps for ESD, n_images for CA.

    Returns:
        BaselineResult with seconds, peak memory, the settings used and restore().
    """
    if name not in BASELINES:
        raise ConfigError("methods", f"unknown baseline {name!r}; choose one of {', '.join(BASELINES)}")
    return BASELINES[name](
        backend, concept, templates=list(templates), preserve=list(preserve), anchor=anchor, seed=seed,
        iterations=iterations, lr=lr, progress=progress, cancel=cancel, **options,
    )  # fmt: skip
