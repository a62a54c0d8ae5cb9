"""Fair baselines: the recorded sweep (benchmark/sweep.py) and the -tuned rows that run its best setting."""

import json

import pytest

from surgun_core.benchmark import sweep
from surgun_core.benchmark.methods import method_signature
from surgun_core.benchmark.run import run_bench
from surgun_core.errors import ConfigError


def test_a_tuned_method_needs_the_sweep():
    with pytest.raises(ConfigError) as e:
        method_signature("esd-x-tuned", "circle")
    assert e.value.field == "methods" and "--sweep" in str(e.value)


def test_a_tuned_method_runs_the_best_setting():
    sig = method_signature("esd-x-tuned", "circle", overrides={"tuned": {"esd-x": {"lr": 3e-4, "iterations": 7}}})
    assert sig["arguments"]["lr"] == 3e-4 and sig["arguments"]["iterations"] == 7
    assert sig["code"] == method_signature("esd-x", "circle")["code"]  # the same baseline's code


@pytest.mark.slow
def test_sweep_records_the_grid_and_the_tuned_row_uses_its_best(tmp_path, monkeypatch):
    monkeypatch.setitem(sweep.GRIDS, "esd-x", {"lr": (1e-4,), "iterations": (1, 2)})  # a tiny grid: minutes, not hours
    data = sweep.run_sweep(tmp_path, ["esd-x"], seeds_per_pair=1)
    grid = data["esd-x"]["grid"]
    assert [(p["lr"], p["iterations"]) for p in grid] == [(1e-4, 1), (1e-4, 2)]
    assert data["esd-x"]["best"] == max(grid, key=lambda p: (p["h"], -p["forwards"]))
    assert all(p["forwards"] > 0 for p in grid)
    assert (
        json.loads((tmp_path / "sweep.json").read_text()) == data and "**best**" in (tmp_path / "sweep.md").read_text()
    )
    again = sweep.run_sweep(tmp_path, ["esd-x"], seeds_per_pair=1, collect=True)  # the records are reused
    assert again["esd-x"]["grid"] == grid
    rep = run_bench(["circle"], ["esd-x-tuned"], seeds_per_pair=1, out_dir=tmp_path)
    assert rep["settings"]["esd-x-tuned"]["iterations"] == data["esd-x"]["best"]["iterations"]
