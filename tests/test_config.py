"""EraseConfig validation: every bad input names its field and what to do."""

import pytest

from surgun_core.config import EraseConfig
from surgun_core.errors import ConfigError


def err(**kw) -> ConfigError:
    kw.setdefault("concepts", ["circle"])
    with pytest.raises(ConfigError) as e:
        EraseConfig(**kw)
    return e.value


def test_defaults_and_cleaning():
    cfg = EraseConfig(concepts=["  Van Gogh ", "Van Gogh"], kind="style")
    assert cfg.concepts == ["Van Gogh"]
    assert cfg.blocks == "auto" and cfg.calibrate and cfg.scorer == "diffusion"  # the full method by default
    with pytest.raises(ConfigError, match="resolved by localization"):
        _ = cfg.block_pattern
    assert EraseConfig(concepts=["x"], blocks="cross-attn-kv").block_pattern == r"attn2\.(to_k|to_v)$"
    assert cfg.checkpoint_interval == cfg.steps // 5
    assert EraseConfig(concepts=["x"], calibrate=False).checkpoint_interval == 0
    assert "Van Gogh" not in cfg.resolved_distractors() and len(cfg.resolved_distractors()) >= 8
    assert EraseConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("concepts", [[], [""], ["   "], ["dog", " "], ""])
def test_empty_or_blank_concept(concepts):
    e = err(concepts=concepts)
    assert e.field == "concepts" and ("empty" in str(e) or "blank" in str(e))


def test_concept_as_its_own_distractor():
    e = err(concepts=["Circle"], distractors=["square", "circle"])
    assert e.field == "distractors" and "own distractor" in str(e)


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("kind", "animal", "object, style"),
        ("steps", 0, ">= 1"),
        ("steps", 2.5, "whole number"),
        ("rank", -1, ">= 1"),
        ("lr", 0.0, "> 0"),
        ("lr", float("nan"), "finite"),
        ("w_distract", -1.0, ">= 0"),
        ("precision", "float8", "float32, bfloat16, float16"),
        ("blocks", "  ", "preset"),
        ("templates", ["a photo"], "{}"),
        ("retain_templates", ["a red {} and a {}"], "exactly one"),
        ("retain_templates", [], "empty"),
        ("distractor_same_template", "yes", "true or false"),
        ("checkpoint_every", -5, ">= 0"),
        ("extend_steps", -1, ">= 0"),
        ("extend_steps", 2.5, ">= 0"),
        ("stop_check_from", -1, ">= 0"),
        ("scorer", "dino", "diffusion, toy, clip"),
        ("localize_attention", "everything", "cross, self, all"),
        ("erase_threshold", 1.5, "(0, 1]"),
        ("localize_steps", 0, ">= 1"),
        ("probe_seeds", 0, ">= 1"),
        ("calibrate_signal", "clip", "self, probe"),
        ("self_judge_images", 0, ">= 1"),
        ("self_judge_timesteps", 1.5, "whole number"),
        ("retain_batch_size", 0, ">= 1 or None"),
        ("probe_sample_steps", 0, ">= 1 or None"),
        ("judge_prompts", 0, ">= 1"),
        ("localize_probe_seeds", 0, ">= 1"),
        ("retain_tolerance", 1.5, "[0, 1)"),
        ("localize_method", "saliency", "gradient, short-runs"),
        ("localize_mass", 0.0, "(0, 1]"),
        ("localize_batches", 0, ">= 1"),
        ("lr_schedule", "linear", "cosine, constant"),
        ("retain_anchor", "weights", "output, text"),
    ],
)
def test_bad_values_name_the_field(field, value, needle):
    e = err(**{field: value})
    assert e.field == field and needle in str(e)


def test_the_text_anchor_is_refused_where_localization_would_try_self_attention():
    e = err(retain_anchor="text", localize_attention="self")
    assert e.field == "retain_anchor" and "localize_attention='cross'" in str(e)
    EraseConfig(concepts=["cat"], retain_anchor="text", localize_attention="self", use_retain=False)  # no anchor


def test_all_terms_off_is_refused():
    e = err(use_ascent=False, use_distractors=False, use_contrast=False)
    assert e.field == "use_contrast"


def test_unknown_setting_lists_valid_ones():
    with pytest.raises(ConfigError) as e:
        EraseConfig.from_dict({"concepts": ["x"], "stepz": 3})
    assert e.value.field == "stepz" and "steps" in str(e.value)


def test_the_retain_anchor_never_holds_a_concept_being_erased():
    # the toy recipe anchors shapes beside each colour; erasing "red" as an object must not anchor "a photo of a red {}"
    cfg = EraseConfig(concepts=["Red"], retain_templates=["a photo of a red {}", "a {} in blue", "a redwood {}"])
    assert cfg.retain_templates == ["a {} in blue", "a redwood {}"]  # whole words only
    assert EraseConfig(concepts=["red"], retain_templates=["a red {}"]).retain_templates is None  # the plain anchor
