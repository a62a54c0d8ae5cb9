"""`surgun bench`: every method on the toy world, one table."""

from __future__ import annotations

from pathlib import Path

from ..benchmark.run import format_markdown, run_bench
from ..benchmark.sweep import format_sweep, run_sweep
from .progress import TqdmProgress


def run(a) -> int:
    if a.sweep:
        with TqdmProgress() as bar:
            data = run_sweep(a.out, a.methods, seeds_per_pair=a.seeds or 2, progress=bar, collect=a.collect)
        print(format_sweep(data))
        print(f"written: {Path(a.out) / 'sweep.json'}, {Path(a.out) / 'sweep.md'}")
        return 0
    with TqdmProgress() as bar:
        report = run_bench(a.concepts, a.methods, quick=a.quick, seeds_per_pair=a.seeds, out_dir=a.out,
                           json_path=a.json, progress=bar, fresh=a.fresh, collect=a.collect,
                           attacks=tuple(a.attacks or ()))  # fmt: skip
    print(format_markdown(report))
    print(f"written: {Path(a.out) / 'bench.md'}, {a.json or Path(a.out) / 'bench.json'} and calibration plots")
    return 0
