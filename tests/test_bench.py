"""`surgun bench`: the JSON has every method and key; bad method and concept names are refused."""

import json
import platform

import pytest
import torch

from surgun_core import engine
from surgun_core.benchmark import methods
from surgun_core.benchmark.methods import METHODS, method_signature
from surgun_core.benchmark.run import KEYS, PeakMemory, format_markdown, run_bench
from surgun_core.cli import main
from surgun_core.errors import ConfigError

# tiny runs: the real recipe and the papers' iterations take minutes per method
TINY = dict(steps=2, images_per_concept=2, sample_steps=2, batch_size=2, localize_steps=1, probe_seeds=1,
            probe_retained=1, localize_batches=1, baseline_iterations=2, baseline_lr=1e-4,
            baseline_options={"esd-x": {"ddim_steps": 4}, "esd-u": {"ddim_steps": 4},
                              "ca": {"n_images": 4, "sample_steps": 4, "batch_size": 2}})  # fmt: skip


@pytest.mark.slow
def test_bench_json_has_every_method_and_key(tmp_path):
    best = {"lr": 1e-4, "iterations": 2}  # a sweep's result, so the -tuned rows run too
    sweep = {b: {"concept": "circle", "grid": [best], "best": best} for b in ("esd-x", "esd-u", "ca")}
    (tmp_path / "sweep.json").write_text(json.dumps(sweep))
    report = run_bench(["circle"], METHODS, seeds_per_pair=1, out_dir=tmp_path, overrides=TINY, sample_steps=4)
    data = json.loads((tmp_path / "bench.json").read_text())
    assert set(data["methods"]) == set(METHODS) and data == json.loads(json.dumps(report))
    for m, row in data["methods"].items():
        assert set(row) == set(KEYS), m
        assert 0 <= row["ua"] <= 1 and 0 <= row["h"] <= 1 and row["seconds"] > 0
    assert "| surgun |" in (tmp_path / "bench.md").read_text()
    assert list(tmp_path.glob("calibration-surgun-circle.png"))
    assert 0 <= data["diffusion_classifier_agreement"] <= 1 and data["diffusion_classifier_images"] > 0


@pytest.mark.slow
def test_bench_reuses_finished_runs_and_redoes_stale_ones(tmp_path):
    methods = ["surgun-no-calibration", "uce"]
    first = run_bench(["circle"], methods, seeds_per_pair=1, out_dir=tmp_path, overrides=TINY, sample_steps=4)
    assert not any(r["reused"] for m in methods for r in first["per_concept"][m].values())
    record = tmp_path / "runs" / "circle" / "uce.json"
    # each record says where it ran: the same code gave another robust LoRA in another session (benchmark/run.machine)
    assert json.loads(record.read_text())["machine"].startswith(f"{platform.machine()} (")
    again = run_bench(["circle"], methods, seeds_per_pair=1, out_dir=tmp_path, overrides=TINY, sample_steps=4)
    assert all(r["reused"] for m in methods for r in again["per_concept"][m].values())
    assert again["methods"] == first["methods"]  # the same figures, nothing rerun
    # collect runs nothing: the table from the records there are, the rest listed as missing
    part = run_bench(["circle", "red"], [*methods, "esd-x"], seeds_per_pair=1, out_dir=tmp_path, overrides=TINY,
                     sample_steps=4, collect=True)  # fmt: skip
    assert part["methods"] == first["methods"] and not list((tmp_path / "runs").glob("red"))
    assert part["missing"] == ["esd-x on circle", "surgun-no-calibration on red", "uce on red", "esd-x on red"]
    assert "Partial: no record yet for 4 run(s)" in (tmp_path / "bench.md").read_text()
    # SurgUn's settings change: its run is redone, UCE's (unchanged) is reused; a damaged record is redone
    record.write_text("{not json")
    changed = run_bench(["circle"], methods, seeds_per_pair=1, out_dir=tmp_path, sample_steps=4,
                        overrides={**TINY, "steps": 3})  # fmt: skip
    assert not changed["per_concept"]["surgun-no-calibration"]["circle"]["reused"]
    assert not changed["per_concept"]["uce"]["circle"]["reused"] and json.loads(record.read_text())["key"]
    assert changed["settings"]["surgun-no-calibration"]["steps"] == 3
    fresh = run_bench(["circle"], ["uce"], seeds_per_pair=1, out_dir=tmp_path, overrides=TINY, sample_steps=4,
                      fresh=True)  # fmt: skip
    assert not fresh["per_concept"]["uce"]["circle"]["reused"]


def test_markdown_has_the_averages_and_h_per_concept():
    def row(h):
        return {"ua": 1.0, "ira": h, "cra": 1.0, "h": h, "spread": 0.5, "drift": 0.01, "forwards": 1234.0,
                "seconds": 10.0, "peak_mem_mb": 5.0}  # fmt: skip

    per = {"surgun": {"circle": row(0.98), "red": row(1.0)}, "uce": {"circle": row(0.5)}}
    report = {"methods": {"surgun": row(0.99), "uce": row(0.5)}, "per_concept": per,
              "concepts": ["circle", "red"], "missing": ["uce on red"], "quick": False, "seeds_per_pair": 2,
              "images_per_method_and_concept": 100, "machine": "x86_64",
              "diffusion_classifier_agreement": 0.9, "diffusion_classifier_images": 10}  # fmt: skip
    md = format_markdown(report)
    assert "| surgun | 1.000 | 0.990 | 1.000 | 0.990 |" in md
    assert "| concept | surgun | uce |" in md and "| circle | 0.980 | 0.500 |" in md and "| red | 1.000 | - |" in md
    assert "Partial: no record yet for 1 run(s) (uce on red)" in md
    one = {**report, "concepts": ["circle"], "per_concept": {"surgun": {"circle": row(0.98)}}, "missing": []}
    assert "H per concept" not in format_markdown(one)


def test_unknown_method_lists_the_valid_ones(tmp_path):
    with pytest.raises(ConfigError, match="esd-x") as e:
        run_bench(["circle"], ["surgun", "sdd"], out_dir=tmp_path)
    assert e.value.field == "methods" and "surgun-no-calibration" in str(e.value)


def test_unknown_concept_is_refused_with_the_known_list(tmp_path, capsys):
    with pytest.raises(ConfigError, match="circle, square") as e:
        run_bench(["dog"], out_dir=tmp_path)
    assert e.value.field == "concept"
    assert main(["bench", "--concepts", "dog", "--out", str(tmp_path)]) == 2
    assert "not in the toy world" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # refused before anything was written


def test_peak_memory_sees_a_cpu_allocation():
    with PeakMemory(torch.device("cpu")) as mem:
        x = torch.ones(64, 2**20)  # 256 MB
        del x
    assert mem.peak_mb > 150


@pytest.mark.slow
def test_bench_attacks_every_method_and_records_the_control(tmp_path):
    """--attacks: a recovery column per attack for every method, the base model's recovery as the control."""
    rep = run_bench(["circle"], ["uce"], seeds_per_pair=1, out_dir=tmp_path, overrides=TINY, sample_steps=4,
                    attacks=("phrasings",))  # fmt: skip
    row = rep["methods"]["uce"]
    assert 0 <= row["recovery_phrasings"] <= 1
    assert 0 <= rep["controls"]["circle"]["recovery_phrasings"] <= 1
    assert (
        json.loads((tmp_path / "runs" / "circle" / "control.json").read_text())["control"] == rep["controls"]["circle"]
    )
    md = (tmp_path / "bench.md").read_text()
    assert "recovery phrasings" in md and "base model (control)" in md
    again = run_bench(["circle"], ["uce"], seeds_per_pair=1, out_dir=tmp_path, overrides=TINY, sample_steps=4,
                      attacks=("phrasings",))  # fmt: skip
    assert again["per_concept"]["uce"]["circle"]["reused"] and again["controls"] == rep["controls"]


def test_robust_row_runs_the_recipes_robust_mode():
    """surgun-robust is SurgUn with the toy recipe's robust settings (every attention layer, the adversary), and
    the adversary's code is part of every SurgUn record's key (a change to it makes the records stale)."""
    robust, plain = (method_signature(m, "circle") for m in ("surgun-robust", "surgun"))
    assert robust["erase_config"]["robust"] and robust["erase_config"]["blocks"] == "all-attn"
    assert not plain["erase_config"]["robust"] and plain["erase_config"]["blocks"] == "auto"
    assert robust["code"] == plain["code"]  # one digest over the SurgUn code, the adversary's among it
    assert {engine.robust, engine.learn_tokens} <= set(methods._SURGUN_CODE)


@pytest.mark.slow
def test_the_agreement_judge_is_the_base_model(tmp_path, monkeypatch):
    # the tool's judge scores drawn images with the base model (judges/probe.py's Judge context): the bench's
    # agreement must judge the erased model's images the same way, not with its LoRA still attached
    from surgun_core.benchmark import run as bench_run

    real, seen = bench_run._agreement, []

    def spy(judges, imgs, clf):  # the real judgement; records what the judge's model predicts on a fixed input
        b = judges[0].backend
        x = torch.randn((2, *b.latent_shape()), generator=torch.Generator().manual_seed(0))
        seen.append(b.predict(x, b.objective.model_time(torch.tensor([100, 500])), b.encode(["a circle", "a red"])))
        return real(judges, imgs, clf)

    monkeypatch.setattr(bench_run, "_agreement", spy)
    report = run_bench(["circle"], ["surgun"], seeds_per_pair=1, out_dir=tmp_path, overrides=TINY, sample_steps=4)
    assert len(seen) == 2  # the base images, then the erased model's
    torch.testing.assert_close(seen[1], seen[0], rtol=0, atol=0)
    assert report["diffusion_classifier_images"] == 2 * 2 * 25 * 2  # two image sets, 50 images, two attributes
