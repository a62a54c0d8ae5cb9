"""Where the baselines' sweep keeps its result (OUT/sweep.json), and the best settings the -tuned methods run."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ConfigError


def sweep_file(out_dir: str | Path) -> Path:
    return Path(out_dir) / "sweep.json"


def load_sweep(out_dir: str | Path) -> dict:
    """OUT/sweep.json: {method: {"concept", "grid": [...], "best": {"lr", "iterations", ...}}}."""
    path = sweep_file(out_dir)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise ConfigError("sweep", f"{path} is damaged ({e}); run `surgun bench --sweep` again") from e


def best_settings(out_dir: str | Path) -> dict[str, dict]:
    """{baseline: {"lr", "iterations"}} of the sweep's best points (what the -tuned methods run)."""
    return {m: {"lr": v["best"]["lr"], "iterations": v["best"]["iterations"]}
            for m, v in load_sweep(out_dir).items() if v.get("best")}  # fmt: skip
