"""The form session behind the A1111/Forge tab and `surgun ui` (no gradio): requests, erase, probe, Stop."""

import threading

import pytest

from surgun_core.config import parse_list
from surgun_core.errors import Cancelled, ConfigError
from surgun_ui.hosts import StandaloneHost
from surgun_ui.presets import PRESETS, preset_settings
from surgun_ui.session import EraseRequest, EraseSession

FAST = dict(preset="quick", steps=8, blocks="cross-attn-kv", calibrate=False)  # no localization: seconds, not minutes


@pytest.fixture
def host(tmp_path, toy_backend):
    h = StandaloneHost(lora_dir=tmp_path / "Lora")
    h._backend = toy_backend  # the session-wide toy model (loading it again costs seconds)
    return h


def test_presets_scale_the_host_recipe():
    base = {"steps": 200, "localize_steps": 40, "images_per_concept": 16, "lr": 6e-3}
    assert preset_settings("quick", base)["steps"] == 100
    assert preset_settings("balanced", base) == base
    thorough = preset_settings("thorough", base)
    assert thorough["steps"] == 400 and thorough["images_per_concept"] == 32 and thorough["lr"] == 6e-3
    assert preset_settings("quick", {})["steps"] == 75  # EraseConfig's default of 150, halved
    with pytest.raises(ConfigError, match=r"preset.*quick, balanced, thorough"):
        preset_settings("fast", base)
    assert set(PRESETS) == {"quick", "balanced", "thorough"}


def test_request_to_config_on_the_toy_host(host):
    cfg = EraseRequest("red", preset="balanced").to_config(host)
    assert cfg.kind == "style"  # the toy host knows red is a colour whatever the form's kind says
    assert "red" not in cfg.distractors and "blue" in cfg.distractors
    cfg = EraseRequest("circle, ring", steps=12, lr=0.01, rank=2).to_config(host)
    assert cfg.concepts == ["circle", "ring"] and set(cfg.distractors) == {"square", "triangle", "cross"}
    assert (cfg.steps, cfg.lr, cfg.rank) == (12, 0.01, 2)
    assert EraseRequest("circle", distractors="square\nring").to_config(host).distractors == ["square", "ring"]
    assert parse_list("a, b\n# note\n\nb, c") == ["a", "b", "c"]


@pytest.mark.parametrize(
    "request_kwargs, field, words",
    [
        (dict(concepts="  "), "concepts", "name at least one concept"),
        (dict(concepts="dog"), "concept", "circle, square"),  # the toy world lists what it knows
        (dict(concepts="circle", preset="fast"), "preset", "quick, balanced, thorough"),
        (dict(concepts="circle", steps=-5), "steps", r"0 .the preset's value. or positive"),
        (dict(concepts="circle", distractors="circle"), "distractors", "cannot be its own distractor"),
    ],
)
def test_bad_requests_name_the_field(host, request_kwargs, field, words):
    with pytest.raises(ConfigError, match=words) as e:
        EraseRequest(**request_kwargs).to_config(host)
    assert e.value.field == field


def test_lora_file_name(host):
    assert EraseRequest("circle").file_name() == "surgun-circle"
    assert EraseRequest("circle", lora_name="my erase/v2.safetensors").file_name() == "my_erase_v2"
    with pytest.raises(ConfigError, match="lora_name"):
        EraseRequest("circle", lora_name="///").file_name()


def test_standalone_host_refuses_a_folder_that_is_no_model(tmp_path):
    with pytest.raises(ConfigError, match=r"model_index\.json"):
        StandaloneHost(str(tmp_path))


def test_erase_saves_the_lora_and_probe_shows_before_and_after(host, tmp_path):
    session = EraseSession(host)
    phases = []
    out = session.erase(EraseRequest("circle", **FAST), lambda p, d, t, s: phases.append(p))
    assert out.lora_path == tmp_path / "Lora" / "surgun-circle.safetensors" and out.lora_path.is_file()
    assert out.snippet == "<lora:surgun-circle:1>"
    assert {"before", "images", "train", "after"} <= set(phases)
    assert set(out.scores) >= {"erase", "retain", "h", "steps", "seconds", "erased_at", "notes"}
    assert out.scores["steps"] == 8
    assert out.scores["erased_at"] is None  # without calibration training never stops once erased
    assert out.scores["notes"] == []  # nor stops early: the tab's status has nothing to say about it
    assert 0.0 <= out.scores["erase"] <= 1.0 and 0.0 <= out.scores["retain"] <= 1.0
    # before/after pairs, erased concept first; images scaled up for display
    assert len(out.gallery) == 2 * 5 and out.gallery[0][1].startswith("before: ") and "circle" in out.gallery[0][1]
    assert out.gallery[0][0].width >= 192
    assert out.curve is None  # no calibration asked for
    # the LoRA is detached afterwards: the host's model draws the gallery's first "before" image again
    from surgun_ui.session import gallery_prompts, to_pil

    prompts, seeds = gallery_prompts(out.config)  # the same batch: batch shape changes float rounding
    again = host.backend().generate(prompts, seeds, out.config.sample_steps, out.config.guidance)
    assert to_pil(again[0]).tobytes() == out.gallery[0][0].tobytes()

    p = session.probe("a red circle", seed=3)
    assert p["before"].size == p["after"].size and p["before"].tobytes() != p["after"].tobytes()
    assert p["scores"]["before"] in ("circle", "square", "triangle", "cross", "ring")
    again = session.probe("a red circle", seed=3, strength=0.0)  # strength 0: the base model exactly
    assert again["before"].tobytes() == again["after"].tobytes()
    from_file = session.probe("a red circle", seed=3, lora_path=str(out.lora_path))
    assert from_file["after"].tobytes() == p["after"].tobytes()  # the saved file is the delta that was probed


def test_probe_bad_inputs(host):
    session = EraseSession(host)
    with pytest.raises(ConfigError, match="prompt"):
        session.probe("  ")
    with pytest.raises(ConfigError, match="Train first"):
        session.probe("a red circle")
    with pytest.raises(ConfigError, match="no file at"):
        session.probe("a red circle", lora_path="/nonexistent/x.safetensors")


def test_stop_ends_training_and_writes_nothing(host, tmp_path):
    session = EraseSession(host)

    def progress(phase, done, total, stats):
        if phase == "train" and done == 2:
            threading.Thread(target=session.stop).start()

    with pytest.raises(Cancelled):
        session.erase(EraseRequest("circle", **dict(FAST, steps=200)), progress)
    assert not list((tmp_path / "Lora").glob("*")) if (tmp_path / "Lora").exists() else True
    # the model is left as it was: a later erase runs (and is not refused as busy)
    out = session.erase(EraseRequest("square", **FAST))
    assert out.lora_path.name == "surgun-square.safetensors"


def test_the_tabs_status_words_where_training_ended_as_the_cli_does(tmp_path):
    from surgun_core.config import EraseConfig
    from surgun_core.surgun import EraseResult
    from surgun_ui.app import _done
    from surgun_ui.session import EraseOutcome

    result = EraseResult(lora=None, steps_done=24, erased_at=24)  # no LoRA needed: notes() reads where it ended
    scores = {"seconds": 3.0, "erase": 1.0, "retain": 0.94, "chosen_step": 24, "steps": 24, "notes": result.notes()}
    status = _done(EraseOutcome(scores, tmp_path / "x.safetensors", "", [], None, EraseConfig(concepts=["cat"])))
    line = "training stopped at step 24, the first checkpoint the erased model read as erased (stop_when_erased)"
    assert result.notes() == [f"note: {line}"] and f"**Done** in 3 s ({line}): erase 1.00" in status  # the CLI's line
    scores["notes"] = []
    plain = _done(EraseOutcome(scores, tmp_path / "x.safetensors", "", [], None, EraseConfig(["cat"])))
    assert plain.startswith("**Done** in 3 s: erase 1.00, retain 0.94 (step 24 of 24)")  # nothing to say: no note
