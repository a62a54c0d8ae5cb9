"""Concept Probe, SurgUn Localize and SurgUn Train as ComfyUI runs them (in-process, on the demo model).

Run with ComfyUI's Python: COMFYUI_SRC=/tmp/comfyui/src /tmp/comfyui/.venv/bin/python -m pytest -q tests/comfyui/
"""

from __future__ import annotations

import comfy_tiny  # noqa: F401  (skips this module without ComfyUI)
import pytest
import torch


def test_probe_of_the_base_model_erases_nothing(pack, demo):
    node = pack("nodes.probe_node").SurgUnConceptProbe
    model, clip, vae = demo
    with torch.inference_mode():
        grid, report, erase, retain = node.execute(model, clip, vae, "circle", "square\nring", "object", 2, 10, 4.0,
                                                   "toy", base_model=model).result  # fmt: skip
    assert erase == 0.0 and retain == 1.0  # the base model still draws every shape
    assert grid.shape[0] == 1 and grid.shape[-1] == 3 and grid.min() >= 0 and grid.max() <= 1
    assert "circle" in report and "erase  0.00" in report


def test_probe_needs_a_base_model_and_retained_concepts(pack, demo):
    node = pack("nodes.probe_node").SurgUnConceptProbe
    errors = pack("surgun_core.errors")
    model, clip, vae = demo
    with pytest.raises(errors.SurgUnError, match="base_model"):
        node.execute(model, clip, vae, "circle", "square", "object", 1, 2, 4.0, "toy")
    with pytest.raises(errors.ConfigError, match="retain_concepts"):
        node.execute(model, clip, vae, "circle", "", "object", 1, 2, 4.0, "toy", base_model=model)
    with pytest.raises(errors.ConfigError, match="concepts"):
        node.execute(model, clip, vae, " ", "square", "object", 1, 2, 4.0, "toy", base_model=model)


def test_train_then_probe_finds_the_base_by_itself(pack, demo):
    train = pack("nodes.train_node").SurgUnTrain
    probe = pack("nodes.probe_node").SurgUnConceptProbe
    model, clip, vae = demo
    with torch.inference_mode():
        erased, delta, report = train.execute(model, clip, "circle", "square\nring", "object", 3, 6e-3, 4,
                                              "cross-attn-kv", 4.0, 0, calibration=False).result  # fmt: skip
        assert erased.surgun_base is model and "3 steps" in report
        out = probe.execute(erased, clip, vae, "circle", "square", "object", 1, 4, 4.0, "toy").result
    assert len(out) == 4 and 0.0 <= out[2] <= 1.0
    assert delta.metadata["surgun.extra"] == '{"front_end": "comfyui"}'


def test_localize_node_ranks_groups(pack, demo):
    node = pack("nodes.localize_node").SurgUnLocalize
    model, clip, _ = demo
    for method, groups in (("short-runs", 6), ("gradient", 5)):  # gradient ranks the levels, not their union
        with torch.inference_mode():
            blocks, chart, report = node.execute(model, clip, "circle", "square\nring", "object", "cross", 1, 1,
                                                 6e-3, 4.0, "toy", 0, method).result  # fmt: skip
        targets = pack("nodes.train_node").comfy_backend(model, clip, 4.0).lora_targets(blocks)
        assert targets and all(".attn2.to_" in n for n in targets)  # the regex feeds Train's blocks_regex
        assert chart.shape[0] == 1 and chart.shape[-1] == 3
        assert report.startswith("chosen: ") and report.count("\ncross ") == groups, report
        assert ("gradient share" in report) == (method == "gradient")


def test_train_node_defaults_are_the_recipe_of_every_front_end(pack, demo):
    """SurgUn Train with its widgets as the schema sets them (numbers at 0: "the recipe's") builds the same
    EraseConfig as `surgun erase` without options and the tab's balanced preset (tests/test_recipes.py)."""
    tn = pack("nodes.train_node")
    recipes = pack("surgun_core.recipes")
    model, clip, _ = demo
    defaults = {i.id: i.default for i in tn.SurgUnTrain.define_schema().inputs if i.id not in ("model", "clip")}
    assert defaults["steps"] == defaults["rank"] == 0 and defaults["learning_rate"] == defaults["guidance"] == 0
    defaults["concepts"] = "circle"
    cfg = tn.train_config(tn.comfy_backend(model, clip), **defaults)
    want = recipes.recipe_config("toy", ["circle"], "object")
    assert cfg.recipe == "toy"
    assert {k: v for k, v in cfg.to_dict().items() if k != "extra"} == {
        k: v for k, v in want.to_dict().items() if k != "extra"
    }


def test_train_report_says_where_training_stopped_once_erased(pack):
    from surgun_core.cache import ImageCache
    from surgun_core.demo import toy_config
    from surgun_core.surgun import erase
    from surgun_core.toyworld import load_toy_backend

    result = erase(load_toy_backend(), toy_config("red"), cache=ImageCache(None))  # the toy recipe stops once erased
    result.lora.detach()
    assert result.erased_at is not None and result.erased_at < 120
    report = pack("nodes.train_node").train_report(result)
    assert f"note: training stopped at step {result.erased_at}, the first checkpoint the erased model read" in report
