"""Plumbing shared by the benchmark baselines: the result record, the weights a baseline edits, options.

Every baseline edits `backend.denoiser` in place. `EditedWeights` keeps the original tensors of exactly the
parameters it edits, so the model can run as the frozen original (ESD's teacher) without a second copy of the
network, and `restore()` puts the originals back bit for bit.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from ...backends.base import Backend
from ...errors import Cancelled, ConfigError, SurgUnError
from ...meter import peak_memory_mb

log = logging.getLogger(__name__)

# progress(phase, done, total, stats) and cancel() -> bool, as surgun_core.surgun.erase takes them
Progress = Callable[[str, int, int, dict], None]
Cancel = Callable[[], bool]


@dataclass
class BaselineResult:
    """What one baseline erase did. The erase is live in the backend's denoiser until `restore()`."""

    name: str
    seconds: float  # wall time of the erase, image generation included
    peak_mem_mb: float  # surgun_core.surgun.peak_memory_mb(backend.device)
    settings: dict  # iterations, lr, eta / lambdas / anchor ... as actually used
    restore: Callable[[], None]  # puts the denoiser's original weights back, in place and exactly


class EditedWeights:
    """The denoiser parameters a baseline changes, with their original values.

    While training, only these parameters require grad; `release()` puts every parameter's requires_grad
    flag back as it was found.
    """

    def __init__(self, denoiser: nn.Module, names: list[str], what: str) -> None:
        if not names:
            raise SurgUnError(f"{what}: no parameter of this {type(denoiser).__name__} matches; it needs {what}")
        every = dict(denoiser.named_parameters())
        self.params = {n: every[n] for n in names}
        self.saved = {n: p.detach().clone() for n, p in self.params.items()}
        self._every = every
        self._flags = {n: p.requires_grad for n, p in every.items()}

    def trainable(self) -> list[nn.Parameter]:
        """Make these parameters (and no other of the denoiser) require grad; returns them."""
        for p in self._every.values():
            p.requires_grad_(False)
        for p in self.params.values():
            p.requires_grad_(True)
        return list(self.params.values())

    def release(self) -> None:
        """Put every requires_grad flag back as found."""
        for n, p in self._every.items():
            p.requires_grad_(self._flags[n])

    @contextlib.contextmanager
    def original(self) -> Iterator[None]:
        """Run the frozen original model inside: the saved tensors stand in for the edited ones (no copy).

        Forward passes only (under no_grad): an in-place write here would change the saved originals.
        """
        current = {n: p.data for n, p in self.params.items()}
        try:
            for n, p in self.params.items():
                p.data = self.saved[n]
            yield
        finally:
            for n, p in self.params.items():
                p.data = current[n]

    def restore(self) -> None:
        """Copy the original values back into the same parameter tensors (exact; safe to call twice)."""
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(self.saved[n])

    def numel(self) -> int:
        return sum(p.numel() for p in self.params.values())


@contextlib.contextmanager
def editing(weights: EditedWeights) -> Iterator[None]:
    """Wrap an erase: on any failure or cancel the model is restored; requires_grad is always put back."""
    try:
        yield
    except BaseException:
        weights.restore()
        raise
    finally:
        weights.release()


def start_clock(backend: Backend) -> float:
    """Start timing an erase (and reset the CUDA peak-memory counter)."""
    if backend.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(backend.device)
    return time.time()


def finish(name: str, t0: float, backend: Backend, settings: dict, weights: EditedWeights) -> BaselineResult:
    seconds = time.time() - t0
    log.info("%s: done in %.1f s (%d parameters edited)", name, seconds, weights.numel())
    settings = {**settings, "edited_parameters": weights.numel()}
    return BaselineResult(name, seconds, peak_memory_mb(backend.device), settings, weights.restore)


def check_cancel(cancel: Cancel | None) -> None:
    if cancel is not None and cancel():
        raise Cancelled("baseline cancelled by the user; the model's weights were restored")


def resolve(name: str, defaults: dict, options: dict, iterations: int | None, lr: float | None) -> dict:
    """Method settings: its defaults, then the caller's options, iterations and lr (None keeps the default)."""
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise ConfigError(
            "options", f"{name} has no option {', '.join(unknown)}; its options are {', '.join(sorted(defaults))}"
        )
    out = {**defaults, **options}
    if iterations is not None:
        if "iterations" not in out:
            raise ConfigError("iterations", f"{name} is a closed-form edit and takes no iterations")
        if int(iterations) < 1:
            raise ConfigError("iterations", f"must be at least 1, got {iterations}")
        out["iterations"] = int(iterations)
    if lr is not None:
        if "lr" not in out:
            raise ConfigError("lr", f"{name} is a closed-form edit and takes no learning rate")
        if not float(lr) > 0:
            raise ConfigError("lr", f"must be positive, got {lr}")
        out["lr"] = float(lr)
    return out


def prompts_for(templates: list[str], concept: str) -> list[str]:
    """The concept in each template ('{}' marks its place); the bare concept when there are no templates."""
    return [t.format(concept) for t in templates] if templates else [concept]
