"""`surgun probe` and its core call (probe_report.probe_delta): the before/after grid and the judge's scores, on
the toy model with a delta trained once for this module, and on a tiny SD1 model folder."""

import json
import signal

import pytest
import torch
from PIL import Image

from surgun_core.backends.diffusers import load_diffusers_folder
from surgun_core.cli import main
from surgun_core.commands.progress import TqdmProgress
from surgun_core.demo import toy_config
from surgun_core.lora import LoraDelta, LoRASet
from surgun_core.probe_report import probe_delta
from surgun_core.surgun import erase
from surgun_core.testing import save_tiny_folder


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def files_in(folder):
    return sorted(p.name for p in folder.rglob("*"))


@pytest.fixture(scope="module")
def toy_delta(toy_backend, tmp_path_factory):
    """An erasure of "circle" that visibly acts in a few seconds (fixed blocks, few images, a high rate; 90 steps:
    at 60 "a yellow circle" still drew circles once the toy recipe anchored the other shapes beside each colour)."""
    cfg = toy_config("circle", steps=90, lr=2e-2, blocks="cross-attn-kv", calibrate=False, images_per_concept=4,
                     sample_steps=10)  # fmt: skip
    result = erase(toy_backend, cfg)
    result.lora.detach()
    return result.delta.save(tmp_path_factory.mktemp("delta") / "no-circle.safetensors")


@pytest.mark.slow
def test_probe_command_on_the_toy_model(tmp_path, capsys, toy_backend, toy_delta):
    out = tmp_path / "probe"
    code, stdout, err = run(capsys, "probe", "--delta", toy_delta, "--retain", "square", "--seeds", 1,
                            "--prompt", "a yellow circle", "--out", out)  # fmt: skip
    assert code == 0, err
    assert files_in(out) == ["no-circle-probe.json", "no-circle-probe.png"]
    assert f"wrote {out / 'no-circle-probe.png'}" in stdout
    s = json.loads((out / "no-circle-probe.json").read_text())
    # concepts and kind come from the delta's header; the model is the embedded toy model by default
    assert (s["model"], s["concepts"], s["kind"], s["retained"]) == ("toy", ["circle"], "object", ["square"])
    assert s["base_matches_delta"] is True and s["strength"] == 1.0
    assert set(s["before"]["per_concept"]) == set(s["after"]["per_concept"]) == {"circle", "square"}
    # the delta erases: the judge names circle-prompt images "circle" less often after it
    assert s["after"]["per_concept"]["circle"] > s["before"]["per_concept"]["circle"]
    assert set(s["prompts"]) == {"a yellow circle"} and s["forwards"] > 0
    # the command is a thin front end: the same numbers as the core call with the same inputs
    delta = LoraDelta.load(toy_delta, list(toy_backend.attention_linears()))
    core = probe_delta(toy_backend, delta, 1.0, retained=["square"], seeds=1, prompts=["a yellow circle"]).scores
    assert (core["before"], core["after"], core["prompts"]) == (s["before"], s["after"], s["prompts"])
    assert Image.open(out / "no-circle-probe.png").format == "PNG"


@pytest.mark.slow
def test_strength_zero_changes_nothing_and_the_model_is_left_as_it_was(toy_backend, toy_delta):
    delta = LoraDelta.load(toy_delta, list(toy_backend.attention_linears()))
    hooks = {n: len(m._forward_hooks) for n, m in toy_backend.attention_linears().items()}
    rep = probe_delta(toy_backend, delta, 0.0, retained=["square"], seeds=1)
    assert rep.scores["after"] == rep.scores["before"]
    assert {n: len(m._forward_hooks) for n, m in toy_backend.attention_linears().items()} == hooks  # detached


def test_probe_without_a_delta_shows_the_base_model(tmp_path, capsys):
    out = tmp_path / "probe"
    code, stdout, err = run(capsys, "probe", "--model", "toy", "--concept", "red", "--kind", "style",
                            "--retain", "blue", "--seeds", 1, "--out", out, "--json", tmp_path / "s.json")  # fmt: skip
    assert code == 0, err
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["after"] is None and s["strength"] is None and s["kind"] == "style"
    assert set(s["before"]["per_concept"]) == {"red", "blue"} and 0 <= s["before"]["retain"] <= 1
    assert files_in(out) == ["base-probe.png"]
    assert "  before " in stdout and "after x" not in stdout


def test_probe_on_a_tiny_model_folder(tmp_path, capsys):
    folder = save_tiny_folder("sd1", tmp_path / "sd1")
    backend = load_diffusers_folder(folder, device="cpu")
    lset = LoRASet(backend.lora_targets(r"attn2\.to_(k|v)$"), rank=2, alpha=2.0)
    with torch.no_grad():
        for layer in lset.layers.values():
            layer.up.normal_(std=0.3, generator=torch.Generator().manual_seed(1))
    meta = {"surgun.concepts": json.dumps(["cat"]), "surgun.kind": "object", "surgun.distractors": '["dog"]'}
    delta = lset.to_delta(backend.lora_prefix, meta).save(tmp_path / "no-cat.safetensors")
    code, _, err = run(capsys, "probe", "--model", folder, "--delta", delta, "--seeds", 1, "--strength", 2,
                       "--out", tmp_path / "out")  # fmt: skip
    assert code == 0, err
    s = json.loads((tmp_path / "out" / "no-cat-probe.json").read_text())
    assert (s["concepts"], s["retained"], s["recipe"], s["strength"]) == (["cat"], ["dog"], "sd1", 2.0)
    assert s["base_matches_delta"] is None  # this header names no base model
    assert s["forwards_by_phase"]["probe images"] > 0 and s["forwards_by_phase"]["judging"] > 0


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        (["--delta", "missing.safetensors"], 2, "delta: missing.safetensors does not exist"),
        (["--concept", "circle", "--retain", "circle"], 2, "retain: 'circle' is also a concept"),
        ([], 2, "concept: give the concept(s) to probe"),
        (["--concept", "circle", "--strength", "nan"], 2, "strength: must be a number"),
        (["--concept", "circle", "--seeds", "0"], 2, "seeds: must be a whole number >= 1"),
    ],
)
def test_probe_bad_inputs(tmp_path, capsys, args, code, needle):
    got, _, err = run(capsys, "probe", *args, "--out", tmp_path / "out")
    assert got == code and err.strip().splitlines() == [err.strip()] and needle in err
    assert files_in(tmp_path) == []


def test_probe_refuses_a_delta_of_another_model(tmp_path, capsys):
    folder = save_tiny_folder("sd1", tmp_path / "sd1")
    backend = load_diffusers_folder(folder, device="cpu")
    delta = LoRASet(backend.lora_targets(r"attn2\.to_k$"), rank=2).to_delta(backend.lora_prefix)
    path = delta.save(tmp_path / "sd1-delta.safetensors")
    code, _, err = run(capsys, "probe", "--delta", path, "--concept", "cat", "--out", tmp_path / "out")
    assert code == 1 and "architecture" in err and "Traceback" not in err and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_ctrl_c_while_probing_writes_nothing(tmp_path, capsys, monkeypatch, toy_delta):
    shown = TqdmProgress.__call__

    def call(self, phase, done, total, stats):  # a real SIGINT once the probe bar has moved
        shown(self, phase, done, total, stats)
        if phase == "probe" and done > 0:
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(TqdmProgress, "__call__", call)
    code, _, err = run(capsys, "probe", "--delta", toy_delta, "--retain", "square", "--seeds", 1, "--out", tmp_path)
    assert code == 130 and err.strip().splitlines()[-1].split("\r")[-1] == "surgun: interrupted; nothing was written"
    assert files_in(tmp_path) == []
