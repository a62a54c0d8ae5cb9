"""The command line on tiny single-file checkpoints in the A1111/ComfyUI key layout: SD1.x and SDXL."""

import json

import pytest

from surgun_core.backends.diffusers import save_diffusers_folder
from surgun_core.backends.single_file import save_single_file
from surgun_core.cli import main
from surgun_core.testing import tiny_sd1_backend, tiny_sdxl_backend

BUILD = {"sd1": tiny_sd1_backend, "sdxl": tiny_sdxl_backend}


@pytest.fixture(scope="module", params=["sd1", "sdxl"])
def checkpoint(request, tmp_path_factory):
    """(single .safetensors in the original key layout, a diffusers folder with the tiny model's configs)."""
    root = tmp_path_factory.mktemp(request.param)
    backend = BUILD[request.param]()
    return save_single_file(backend, root / "model.safetensors"), save_diffusers_folder(backend, root / "config")


def test_erase_plan_on_a_single_file(checkpoint, capsys, tmp_path):
    ckpt, config = checkpoint
    rc = main(["erase", "--model", str(ckpt), "--model-config", str(config), "--concept", "cat", "--plan"])
    out = capsys.readouterr().out
    assert rc == 0, out
    for phase in ("training images", "training", "reference/probe images", "reference/judging"):
        assert phase in out
    assert not list(tmp_path.iterdir())  # nothing written


def test_probe_on_a_single_file(checkpoint, capsys, tmp_path):
    ckpt, config = checkpoint
    rc = main(["probe", "--model", str(ckpt), "--model-config", str(config), "--concept", "cat", "--retain", "dog",
               "--seeds", "1", "--out", str(tmp_path), "--json", str(tmp_path / "scores.json")])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    before = json.loads((tmp_path / "scores.json").read_text())["before"]  # no --delta: the base model alone
    assert 0 <= before["erase"] <= 1 and 0 <= before["retain"] <= 1
    assert list(tmp_path.glob("*.png"))
