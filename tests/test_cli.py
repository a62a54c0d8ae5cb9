"""The `surgun` command: real runs on the toy model folder, and bad inputs with clear errors."""

import json
import re

import pytest

from surgun_core.cli import main
from surgun_core.lora import LoraDelta, read_safetensors
from surgun_core.toyworld import load_toy_backend
from surgun_core.toyworld.paths import MODEL_DIR

# the full method (localization + calibration) but tiny: 1 step per block group, 1 probe seed
FAST = {"images_per_concept": 2, "sample_steps": 2, "templates": ["a {}"], "localize_steps": 1, "probe_seeds": 1,
        "probe_retained": 1, "localize_batches": 1}  # fmt: skip


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def fast_config(tmp_path):
    p = tmp_path / "fast.json"
    p.write_text(json.dumps(FAST))
    return p


def test_erase_on_a_model_folder_writes_a_loadable_delta(tmp_path, capsys, fast_config):
    out = tmp_path / "no-circle.safetensors"
    code, stdout, err = run(capsys, "erase", "--model", MODEL_DIR, "--concept", "circle", "--distractor", "square",
                            "--distractor", "ring", "--steps", 2, "--config", fast_config, "--out", out)  # fmt: skip
    assert code == 0, err
    assert "wrote" in stdout
    names = list(load_toy_backend().attention_linears())
    delta = LoraDelta.load(out, names)
    assert json.loads(delta.metadata["surgun.concepts"]) == ["circle"]
    assert delta.metadata["modelspec.architecture"] == "surgun-toyworld-v1/lora"


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--concept", " "], "concepts"),
        (["--concept", "circle", "--distractor", "circle"], "own distractor"),
        (["--concept", "circle", "--blocks", "nothing_here"], "matches no attention layer"),
        (["--concept", "circle", "--kind", "animal"], "kind"),
    ],
)
def test_bad_inputs_fail_clearly_and_write_nothing(tmp_path, capsys, fast_config, args, needle):
    out = tmp_path / "d.safetensors"
    code, _, err = run(capsys, "erase", "--model", MODEL_DIR, *args, "--steps", 1, "--config", fast_config,
                       "--out", out)  # fmt: skip
    assert code == 2
    assert needle in err and err.startswith("surgun: error:")
    assert list(tmp_path.iterdir()) == [fast_config]


def test_model_folder_that_is_not_one(tmp_path, capsys):
    code, _, err = run(capsys, "erase", "--model", tmp_path, "--concept", "x", "--out", tmp_path / "d.safetensors")
    assert code == 2 and "model_index.json" in err


def test_out_must_be_safetensors(tmp_path, capsys, fast_config):
    code, _, err = run(capsys, "erase", "--model", MODEL_DIR, "--concept", "circle", "--out", tmp_path / "d.pt")
    assert code == 2 and "out:" in err and ".safetensors" in err


def test_demo_rejects_unknown_concept(tmp_path, capsys):
    code, _, err = run(capsys, "demo", "--concept", "zebra", "--out", tmp_path / "o")
    assert code == 2 and "circle" in err
    assert not (tmp_path / "o").exists()


def test_erase_says_where_training_stopped_once_erased(tmp_path, capsys):
    # the toy recipe (stop_when_erased, a checkpoint every 12 steps) on a colour it erases early (red: step 36)
    out = tmp_path / "red.safetensors"
    code, stdout, err = run(capsys, "erase", "--model", "toy", "--concept", "red", "--out", out)
    assert code == 0, err
    m = re.search(r"note: training stopped at step (\d+), the first checkpoint the erased model read as erased "
                  r"\(stop_when_erased\); step (\d+) ships", stdout)  # fmt: skip
    assert m, stdout
    stopped = int(m[1])
    assert stopped % 12 == 0 and stopped < 120 and int(m[2]) <= stopped
    meta = read_safetensors(out)[1]
    assert meta["surgun.steps"] == str(stopped) and meta["surgun.step_chosen"] == m[2]
