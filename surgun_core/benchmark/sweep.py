"""Fair baselines: a small recorded sweep per baseline (learning rate x iterations) on one concept.

At the papers' settings ESD-x (UA 0.04) and CA (UA 0.00) barely move the 1.1M-parameter toy model within
their iterations, so "SurgUn's H is above ESD's" says little. The sweep runs each baseline over a small grid
on SWEEP_CONCEPT, every point recorded like any bench run (so it resumes), and keeps the setting with the best
H (ties: fewer denoiser forwards). The `<baseline>-tuned` methods run that setting on every concept, beside
the paper's. The grid and every point's scores are in OUT/sweep.json and OUT/sweep.md.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..errors import ConfigError
from ..io import atomic_path, write_json
from .run import run_bench
from .tuned import load_sweep, sweep_file

log = logging.getLogger(__name__)

SWEEP_CONCEPT = "circle"
POINT_KEYS = ("ua", "ira", "cra", "h", "forwards", "seconds")
# the papers' settings (ESD: Adam 1e-5, 1000 iterations; CA: 2e-6 x batch 8 = 1.6e-5, 100 steps) and 10x/100x
GRIDS: dict[str, dict[str, tuple]] = {
    "esd-x": {"lr": (1e-5, 1e-4, 1e-3), "iterations": (200, 1000)},
    "esd-u": {"lr": (1e-5, 1e-4, 1e-3), "iterations": (200, 1000)},
    "ca": {"lr": (1.6e-5, 1.6e-4, 1.6e-3), "iterations": (100, 400)},
}


def run_sweep(out_dir: str | Path, methods: list[str] | None = None, concept: str = SWEEP_CONCEPT,
              seeds_per_pair: int = 2, progress=None, collect: bool = False) -> dict:  # fmt: skip
    """Every grid point of every baseline on `concept`; writes OUT/sweep.json (grid and best) and OUT/sweep.md.

    Each point is a bench run of its own in OUT/sweep/<method>/lr<lr>-it<its>/ (resumable; collect: run
    nothing, use the records there are).
    """
    methods = list(methods or GRIDS)
    bad = [m for m in methods if m not in GRIDS]
    if bad:
        raise ConfigError("methods", f"no sweep for {bad[0]!r}; sweeps exist for {', '.join(GRIDS)}")
    out = Path(out_dir)
    result: dict[str, dict] = {}
    for m in methods:
        points = []
        for lr in GRIDS[m]["lr"]:
            for its in GRIDS[m]["iterations"]:
                where = out / "sweep" / m / f"lr{lr:g}-it{its}"
                rep = run_bench([concept], [m], seeds_per_pair=seeds_per_pair, out_dir=where, progress=progress,
                                overrides={"baseline_iterations": its, "baseline_lr": lr}, collect=collect)  # fmt: skip
                row = rep["methods"].get(m)
                if row is not None:
                    points.append({"lr": lr, "iterations": its, **{k: row[k] for k in POINT_KEYS}})
                log.info("sweep: %s lr %g, %d iterations: %s", m, lr, its, row and f"H {row['h']:.3f}")
        best = max(points, key=lambda p: (p["h"], -p["forwards"])) if points else None
        result[m] = {"concept": concept, "grid": points, "best": best}
    old = load_sweep(out) if sweep_file(out).is_file() else {}
    data = {**old, **result}
    write_json(sweep_file(out), data)
    with atomic_path(out / "sweep.md") as tmp:
        tmp.write_text(format_sweep(data))
    return data


def format_sweep(data: dict) -> str:
    lines = ["| method | lr | iterations | UA | IRA | CRA | H | forwards | seconds |", "|---" * 9 + "|"]
    for m, v in data.items():
        for p in v["grid"]:
            star = " **best**" if p == v["best"] else ""
            lines.append(f"| {m}{star} | {p['lr']:g} | {p['iterations']} | {p['ua']:.3f} | {p['ira']:.3f} | "
                         f"{p['cra']:.3f} | {p['h']:.3f} | {p['forwards']:,.0f} | {p['seconds']:.0f} |")  # fmt: skip
    concepts = sorted({v["concept"] for v in data.values()})
    return "\n".join(lines) + f"\n\nSwept on {', '.join(concepts)}; the best H (ties: fewer forwards) is kept.\n"
