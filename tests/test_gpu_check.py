"""bench/gpu_check.py --tiny: the GPU check's own code, on the CPU with the tiny SD1 and SDXL models."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from surgun_core.plan import plan_erase, step_forwards
from surgun_core.recipes import family_of, recipe_config
from surgun_core.testing import tiny_sd1_backend, tiny_sdxl_backend

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"
TINY = {"sd15": tiny_sd1_backend, "sdxl": tiny_sdxl_backend}
KINDS = ("train", "sample", "judge")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--json", str(out / "r.json"), "--md",
                           str(out / "r.md")], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "r.json").read_text()), (out / "r.md").read_text()


def test_every_model_dtype_and_checkpointing_setting_is_measured(report):
    data, md = report
    assert data["meta"]["tiny"] and data["meta"]["device"] == "cpu"
    runs = [r for r in data["runs"] if "skipped" not in r]
    assert {(r["model"], r["dtype"]) for r in runs} == {(m, d) for m in TINY for d in ("float32", "bfloat16")}
    for r in runs:
        assert r["sampling"]["s_per_image"] > 0 and r["sampling"]["s_per_forward"] > 0
        assert r["judging"]["s_per_image"] > 0 and r["judging"]["s_per_forward"] > 0
        assert [t["checkpointing"] for t in r["training"]] == [True, False]
        for t in r["training"]:
            assert t["error"] is None and t["s_per_step"] > 0 and t["s_per_forward"] > 0
            assert t["peak_mb"] is None  # a CPU has no per-block peak; the GPU run fills it in
            assert t["estimated_training_peak_mb"] > 0
            assert t["forwards_per_step"] == step_forwards(recipe_config(r["recipe"], ["cat"]))
            assert f"| {r['model']} | {r['dtype']} | {'on' if t['checkpointing'] else 'off'} | " in md
    (flux,) = [r for r in data["runs"] if r["model"] == "flux"]
    assert "skipped" not in flux or "FluxTransformer2DModel" in flux["skipped"]


@pytest.mark.parametrize("model", list(TINY))
def test_projection_is_the_plans_forwards_times_the_measured_rates(report, model):
    data, _ = report
    backend = TINY[model]()
    for r in [r for r in data["runs"] if r.get("model") == model]:
        cfg = recipe_config(family_of(backend), ["cat"], "object", precision=r["dtype"])
        plan = plan_erase(backend, cfg, memory=False)
        assert r["plan"]["forwards_by_phase"] == plan.forwards_by_phase
        assert r["plan"]["fewest_by_phase"] == plan.fewest_by_phase
        for t in r["training"]:
            rates = dict(
                zip(KINDS, (t["s_per_forward"], r["sampling"]["s_per_forward"], r["judging"]["s_per_forward"]))
            )
            kind = lambda p: "judge" if p.endswith("judging") else "train" if p.endswith("training") else "sample"  # noqa: E731
            most = sum(n * rates[kind(p)] for p, n in plan.forwards_by_phase.items())
            proj = r["projected_s"]["checkpointing on" if t["checkpointing"] else "checkpointing off"]
            assert proj["most"] == pytest.approx(most)
            assert 0 < proj["fewest"] <= proj["most"]
        goals = r["goals"]
        assert goals["training_peak_mb"]["met"] is None  # not measured on a CPU
        if "erase_s" in goals:
            assert goals["erase_s"]["projected"] == pytest.approx(r["projected_s"]["checkpointing on"]["most"])
            assert goals["erase_s"]["met"] == (goals["erase_s"]["projected"] <= goals["erase_s"]["goal"])
