"""The cost meter (DESIGN.md section 2): denoiser sample-forwards, by phase, independent of the machine.

One unit is one sample (one row of a batch) through the denoiser. A forward whose output takes part in a
backward (its output requires grad) counts 3: the forward and a backward of about twice its work. Classifier-
free guidance counts both halves. Recomputation under gradient checkpointing is not counted (it is a memory
choice, not work the method asks for). Phases nest: "localization/training", "calibration/judging".
Seconds only compare methods side by side in one run; this count compares them anywhere.
"""

from __future__ import annotations

import contextlib
import resource
from collections.abc import Iterator

import torch

BACKWARD_FACTOR = 2  # a backward costs about two forwards


class CostMeter:
    """Counts sample-forwards under the current phase; `phase()` contexts nest."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self._stack: list[str] = []

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self._stack.append(name)
        try:
            yield
        finally:
            self._stack.pop()

    @property
    def current(self) -> str:
        return "/".join(self._stack) or "other"

    def add(self, rows: int, backward: bool = False) -> None:
        """`rows` samples through the denoiser; `backward`: their output will be back-propagated."""
        self.counts[self.current] = self.counts.get(self.current, 0) + rows * (1 + BACKWARD_FACTOR * backward)

    def snapshot(self) -> dict[str, int]:
        return dict(self.counts)

    def since(self, snapshot: dict[str, int]) -> dict[str, int]:
        """The counts added after `snapshot` was taken, by phase (phases with none left out)."""
        out = {k: v - snapshot.get(k, 0) for k, v in self.counts.items()}
        return {k: v for k, v in sorted(out.items()) if v}


def total(by_phase: dict[str, int]) -> int:
    return sum(by_phase.values())


def top_level(by_phase: dict[str, int]) -> dict[str, int]:
    """Nested phases folded into their top phase: {"localization/training": 5, ...} -> {"localization": 5}."""
    out: dict[str, int] = {}
    for k, v in by_phase.items():
        top = k.split("/", 1)[0]
        out[top] = out.get(top, 0) + v
    return out


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated on CUDA; on CPU the process's peak resident set (a whole-process figure)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
