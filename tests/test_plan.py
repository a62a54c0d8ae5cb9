"""plan_erase: the forwards it predicts are the forwards erase() does, phase for phase; memory and the CLI."""

import importlib.util
import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from surgun_core.cache import ImageCache
from surgun_core.cli import main
from surgun_core.demo import toy_config
from surgun_core.engine.localize import candidate_groups, clear_memory_cache
from surgun_core.plan import (
    count_forwards,
    format_plan,
    largest_no_grad_batch,
    n_checkpoints,
    outcome_of,
    plan_erase,
    step_forwards,
)
from surgun_core.plan_memory import CPU_RUNTIME_MB, estimate_memory
from surgun_core.surgun import erase
from surgun_core.toyworld.paths import MODEL_DIR

ROOT = Path(__file__).resolve().parents[1]
# small but complete: every phase of the method runs, with a probe set of 2 images per seed
SMALL = dict(
    steps=6,
    localize_steps=2,
    images_per_concept=2,
    probe_seeds=1,
    sample_steps=3,
    probe_sample_steps=2,
    batch_size=2,
    distractors=["square", "ring"],
    probe_retained=1,
    probe_templates=["a {}"],
    localize_first_fit=True,  # the widest group first; the "ranked" cases turn it off
    localize_method="short-runs",  # pixel-grounded short runs; the "gradient" cases use the default
    extend_steps=0,  # no extension unless a case asks for it
    stop_when_erased=False,  # every step trained unless a case asks (the toy recipe stops at the first erasing one)
    checkpoint_every=0,  # steps / 5
)
CASES = {
    "fixed blocks": dict(blocks="cross-attn-kv", calibrate=False),
    "localization + calibration": dict(),
    "localization, no calibration": dict(calibrate=False),  # the widest group's run still scores its last step
    "ranked localization + calibration": dict(localize_first_fit=False),
    "gradient localization (the default) + calibration": dict(localize_first_fit=False, localize_method="gradient",
                                                              localize_batches=2),
    "gradient localization, erased": dict(localize_first_fit=False, localize_method="gradient", steps=10, lr=3e-2,
                                          batch_size=4, images_per_concept=4, sample_steps=6, probe_sample_steps=6),
    # strong enough to erase: first fit stops at the widest group, calibration at the last checkpoint
    "localization + calibration, erased": dict(steps=10, localize_steps=10, lr=3e-2, batch_size=4,
                                               images_per_concept=4, sample_steps=6, probe_sample_steps=6),
    "calibration, retain prompts, no guidance, checkpoint every 4": dict(
        blocks="cross-attn-kv", retain_prompts=["a red square", "a blue ring"], guidance=1.0, checkpoint_every=4
    ),
    # the "text" retain anchor: no denoiser forward a step, one per retain prompt (and 2) once a run
    "text retain anchor, gradient localization": dict(retain_anchor="text", w_retain=1.0, localize_first_fit=False,
                                                      localize_method="gradient", localize_batches=2),
    "text retain anchor, retain prompts (no image drawn for them)": dict(
        blocks="cross-attn-kv", retain_prompts=["a red square", "a blue ring"], retain_anchor="text", w_retain=1.0
    ),
    # too weak to erase: no checkpoint reaches the threshold, so 4 steps more are trained and calibrated
    "not erased: extended": dict(blocks="cross-attn-kv", lr=1e-7, extend_steps=4),
    # training stops at the first checkpoint the erased model's own verdict reads as erased (judged from step 4 on)
    "stop when erased": dict(steps=10, localize_steps=10, lr=3e-2, batch_size=4, images_per_concept=4,
                             sample_steps=6, probe_sample_steps=6, stop_when_erased=True, checkpoint_every=2,
                             stop_check_from=4),
    "stop when erased, ranked, not erased: extended": dict(localize_first_fit=False, localize_method="gradient",
                                                          localize_batches=2, lr=1e-7, extend_steps=4,
                                                          stop_when_erased=True, checkpoint_every=2,
                                                          stop_check_from=3),
    "ascent only, toy judge, every group of all attention kinds": dict(
        use_ascent=True, use_distractors=False, use_contrast=False, use_retain=False, scorer="toy",
        localize_attention="all", localize_first_fit=False, calibrate=False,
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_plan_counts_equal_what_erase_meters(toy_backend, case):
    cfg = toy_config("circle", **{**SMALL, **CASES[case]})
    plan = plan_erase(toy_backend, cfg, memory=False)
    clear_memory_cache()  # the plan assumes empty caches: no localization and no image cached yet
    result = erase(toy_backend, cfg, cache=ImageCache(None))
    result.lora.detach()
    # what the judge saw decides part of the work (whether the widest group was kept, how many checkpoints
    # were scored): the plan's arithmetic with the run's decisions is the meter's count exactly, and the run
    # lies between the plan's fewest and most
    outcome = outcome_of(toy_backend, cfg, result)
    assert count_forwards(toy_backend, cfg, **outcome) == result.forwards_by_phase
    for phase, n in result.forwards_by_phase.items():
        assert plan.fewest_by_phase.get(phase, 0) <= n <= plan.forwards_by_phase[phase]
    runs = 1 if cfg.localize_method == "gradient" else plan.candidate_groups
    ext = cfg.extend_steps
    most = {"full_runs": [plan.checkpoints + (n_checkpoints(replace(cfg, steps=ext)) if ext else 0)],
            "groups_run": runs if cfg.blocks == "auto" else 0, "reused": 0, "extended": ext,
            "trained": [cfg.steps]}  # fmt: skip
    if outcome == most:  # all the work: the most
        assert result.forwards_by_phase == plan.forwards_by_phase
    if ext:
        assert result.extended_steps == ext and result.steps_done == cfg.steps + ext
        assert result.calibration.reason.startswith(f"trained {ext} steps more")
        assert [r["step"] for r in result.calibration.curve][-1] == cfg.steps + ext
    unchanged = cfg.probe_retained  # retained probe images (1 template, 1 seed: one per concept)
    widest = {"full_runs": [1], "groups_run": 0, "reused": unchanged, "extended": 0, "trained": [cfg.steps]}
    if result.localization and outcome == widest:  # widest kept
        assert result.forwards_by_phase == plan.fewest_by_phase
    if cfg.stop_when_erased:  # every checkpoint judged while training, up to the first the model reads as erased
        if result.erased_at is not None:
            assert result.erased_at == result.steps_done and result.steps_done % cfg.checkpoint_every == 0
            assert result.erased_at >= cfg.stop_check_from
        assert "training/self-judging" in result.forwards_by_phase
        assert "calibration/self-judging" not in result.forwards_by_phase  # the verdicts are read again
    if not cfg.calibrate and not (result.localization and cfg.localize_first_fit):  # nothing left to the judge
        assert plan.forwards_by_phase == result.forwards_by_phase == plan.fewest_by_phase


def test_plan_phases_follow_the_config(toy_backend):
    cfg = toy_config("circle", **SMALL)
    plan = plan_erase(toy_backend, cfg, memory=False)
    assert plan.candidate_groups == len(candidate_groups(toy_backend, "cross"))
    assert plan.forwards_by_phase["training"] == 2 * cfg.steps * step_forwards(cfg)  # at most two full runs
    assert plan.fewest_by_phase["training"] == cfg.steps * step_forwards(cfg)
    # first fit: the widest group's full run draws the training images; the other runs find them cached
    assert "localization/training images" not in plan.forwards_by_phase
    ranked = plan_erase(toy_backend, toy_config("circle", **{**SMALL, "localize_first_fit": False}), memory=False)
    assert ranked.forwards_by_phase["localization/training"] == plan.candidate_groups * 2 * step_forwards(cfg)
    assert ranked.forwards_by_phase["localization/training images"] == plan.forwards_by_phase["training images"]
    grad = plan_erase(toy_backend, toy_config("circle", **{**SMALL, "localize_first_fit": False,
                                                           "localize_method": "gradient"}), memory=False)  # fmt: skip
    assert grad.forwards_by_phase["localization/training"] == cfg.localize_batches * step_forwards(cfg)
    assert not any(k.startswith(("localization/probe", "localization/judging")) for k in grad.forwards_by_phase)
    fixed = plan_erase(toy_backend, toy_config("circle", **SMALL, blocks="cross-attn-kv"), memory=False)
    assert fixed.candidate_groups == 0 and not any(k.startswith("localization") for k in fixed.forwards_by_phase)
    assert fixed.forwards_by_phase["training images"] == plan.forwards_by_phase["training images"]
    doubled = plan_erase(toy_backend, toy_config("circle", **{**SMALL, "steps": 12}), memory=False)
    assert doubled.checkpoints == plan.checkpoints  # every steps/5
    assert doubled.forwards_by_phase["training"] == 2 * plan.forwards_by_phase["training"]


def test_plan_memory_time_table_and_dict(toy_backend):
    cfg = toy_config("circle", **SMALL, blocks="cross-attn-kv")
    before = toy_backend.meter.snapshot()
    plan = plan_erase(toy_backend, cfg, time_it=True)
    assert set(toy_backend.meter.since(before)) == {"plan timing"}  # the timing's real work, metered apart
    assert set(plan.seconds_by_phase) == set(plan.forwards_by_phase) and plan.seconds > 0
    m = plan.memory
    weights = sum(t.numel() * t.element_size() for t in toy_backend.denoiser.state_dict().values()) / 2**20
    assert m.weights_mb == pytest.approx(weights)
    assert m.peak_mb >= max(m.training_peak_mb, m.inference_peak_mb) > m.weights_mb + m.runtime_mb
    assert m.inference_rows == largest_no_grad_batch(toy_backend, cfg)
    more = estimate_memory(toy_backend, toy_config("circle", **{**SMALL, "batch_size": 4}, blocks="cross-attn-kv"),
                           inference_rows=m.inference_rows)  # fmt: skip
    assert more.train_activations_mb == pytest.approx(2 * m.train_activations_mb)
    assert more.inference_activations_mb == pytest.approx(m.inference_activations_mb)
    cfg_ckpt = toy_config("circle", **SMALL, blocks="cross-attn-kv", gradient_checkpointing=True)
    ckpt = estimate_memory(toy_backend, cfg_ckpt, inference_rows=m.inference_rows)
    assert ckpt.checkpointing and ckpt.train_activations_mb < m.train_activations_mb
    text = format_plan(plan)
    for phase, n in plan.forwards_by_phase.items():
        few = plan.fewest_by_phase.get(phase, 0)  # the fewest column, shown where the judge can stop a stage
        assert re.search(rf"^{re.escape(phase)}\s+{n:,}\s+({few:,}\s+)?\d+\.\d%", text, re.M), text
    data = json.loads(json.dumps(plan.to_dict()))
    assert data["forwards"] == plan.forwards and data["memory"]["peak_mb"] == pytest.approx(m.peak_mb)


def test_erase_plan_prints_forwards_per_phase_and_writes_nothing(toy_backend, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = {k: v for k, v in SMALL.items() if k != "distractors"}
    (tmp_path / "fast.json").write_text(json.dumps(settings))
    argv = ["erase", "--model", str(MODEL_DIR), "--concept", "circle", "--distractor", "square", "--distractor",
            "ring", "--config", "fast.json", "--plan"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    plan = plan_erase(toy_backend, toy_config("circle", **SMALL), memory=False)
    for phase, n in plan.forwards_by_phase.items():
        assert re.search(rf"^{re.escape(phase)}\s+{n:,}\s", out, re.M), out
    assert "estimated peak memory" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fast.json"]
    assert main(argv[:-1]) == 2  # without --plan an erase needs --out
    assert "out" in capsys.readouterr().err


def _readme_memory_rows() -> dict[str, tuple[float, float]]:
    """README's "Memory" table: model -> (inference peak MB, training-step peak MB), as bench/memory.py measured."""
    rows = {}
    for line in (ROOT / "README.md").read_text().splitlines():
        if m := re.match(r"\| (SD1\.5|SDXL) \([\d.,]+M\) \| \d+x\d+ \| ([\d,]+) \| ([\d,]+) \|", line):
            rows[m.group(1)] = tuple(float(v.replace(",", "")) for v in m.group(2, 3))
    return rows


def test_memory_estimate_is_within_5_percent_of_the_readme_measurements():
    """The formula on bench/memory.py's full-size UNets, built on the meta device (shapes only, nothing allocated),
    in the setting README's table measured: float32 on a CPU, batch 1, LoRA on cross-attention K/V,
    gradient checkpointing on, and the inference step's 2 rows (one image with guidance)."""
    spec = importlib.util.spec_from_file_location("bench_memory", ROOT / "bench" / "memory.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    readme = _readme_memory_rows()
    assert set(readme) == {"SD1.5", "SDXL"}
    for name, model in (("SD1.5", "sd15"), ("SDXL", "sdxl")):
        config = bench.MODELS[model]
        backend = bench.build_backend(config, torch.device("meta"), torch.float32)
        cond = bench.random_cond(backend, 1, config["sample_size"], torch.Generator())
        cfg = toy_config("circle", batch_size=1, blocks=bench.PATTERN, gradient_checkpointing=True, calibrate=False)
        est = estimate_memory(backend, cfg, inference_rows=2, cond=cond)
        # the meta device stands in for the CPU, whose runtime (the process before any model) it leaves out
        assert est.training_peak_mb + CPU_RUNTIME_MB == pytest.approx(readme[name][1], rel=0.05)
        assert est.inference_peak_mb + CPU_RUNTIME_MB == pytest.approx(readme[name][0], rel=0.05)


def test_the_fewest_stops_at_the_first_checkpoint_judged(toy_backend):
    # the toy recipe judges from step 24 on (stop_check_from), a checkpoint every 12 steps: the fewest trains 24 steps
    # and takes one verdict, and the plan says so
    cfg = toy_config("circle")
    assert cfg.stops_when_erased and (cfg.stop_check_from, cfg.checkpoint_interval) == (24, 12)
    plan = plan_erase(toy_backend, cfg, memory=False)
    assert plan.fewest_by_phase["training"] == 24 * step_forwards(cfg)
    labels = 5  # the toy world's shapes: the concept and its four distractors
    assert plan.fewest_by_phase["training/self-judging"] == cfg.self_judge_images * labels * cfg.self_judge_timesteps
    assert "the first checkpoint judged while training (step 24) erases" in plan.extremes
