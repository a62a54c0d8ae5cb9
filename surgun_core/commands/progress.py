"""A tqdm bar per phase for the command line: progress(phase, done, total, stats)."""

from __future__ import annotations

from typing import ClassVar

from tqdm import tqdm


class TqdmProgress:
    """progress(phase, done, total, stats) -> a tqdm bar per phase, with its rate and ETA."""

    LABELS: ClassVar[dict[str, str]] = {
        "images": "generating training images",
        "train": "erasing",
        "evaluate": "sampling before/after",
        "localize": "localizing (short run per block group)",
        "calibrate": "calibrating (scoring checkpoints)",
    }

    def __init__(self) -> None:
        self.bar, self.phase = None, None

    def __call__(self, phase: str, done: int, total: int, stats: dict) -> None:
        if phase != self.phase:
            self.close()
            self.phase, self.bar = phase, tqdm(total=total, desc=self.LABELS.get(phase, phase), leave=False)
        self.bar.total = total
        self.bar.n = done
        if stats:
            keys = ("loss", "L_T", "L_D", "erase", "retain")
            self.bar.set_postfix({k: f"{v:.3f}" for k, v in stats.items() if k in keys})
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> TqdmProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
