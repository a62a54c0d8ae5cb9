"""A tqdm bar per phase for the command line: progress(phase, done, total, stats)."""

from __future__ import annotations

from typing import ClassVar

from tqdm import tqdm

from . import interrupt


class TqdmProgress:
    """progress(phase, done, total, stats) -> a tqdm bar per phase, with its rate and ETA."""

    LABELS: ClassVar[dict[str, str]] = {
        "images": "generating training images",
        "train": "erasing",
        "evaluate": "sampling before/after",
        "localize": "localizing (which attention blocks)",
        "calibrate": "calibrating (scoring checkpoints)",
        "probe": "probing (drawing and judging images)",
    }

    def __init__(self) -> None:
        self.bar, self.phase = None, None

    def __call__(self, phase: str, done: int, total: int, stats: dict) -> None:
        interrupt.check()  # Ctrl-C that a library swallowed stops the run here
        # a new bar per phase, and when a phase starts over (training images: the concepts, then the distractors)
        if phase != self.phase or done < self.bar.n or total != self.bar.total:
            self.close()
            # initial=done: work before the first report is not counted as done in no time (no false rate)
            self.phase = phase
            self.bar = tqdm(total=total, initial=done, desc=self.LABELS.get(phase, phase), leave=False)
        # every phase reports its total, so tqdm shows the rate and the ETA; update() (not n=) feeds the
        # smoothed rate the ETA comes from
        self.bar.update(done - self.bar.n)
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
