"""One recipe per model family: every front end starts from it (surgun_core/recipes.py)."""

import importlib
import importlib.util
from pathlib import Path

import pytest

from surgun_core.cli import build_parser
from surgun_core.commands.erase import erase_config, settings_from
from surgun_core.errors import ConfigError
from surgun_core.recipes import RECIPES, family_of, get_recipe, merge_settings, recipe_config
from surgun_core.testing import tiny_backend
from surgun_core.toyworld.paths import MODEL_DIR
from surgun_ui.hosts import StandaloneHost
from surgun_ui.session import EraseRequest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def parsing(pack):
    """nodes/parsing.py as ComfyUI loads it: through the repository root as a package (conftest.pack)."""
    return importlib.import_module(pack.__name__ + ".nodes.parsing")


def _settings(cfg) -> dict:
    return {k: v for k, v in cfg.to_dict().items() if k != "extra"}  # extra: which front end, nothing else


def test_three_front_ends_one_recipe(toy_backend, parsing):
    """The same concept and model from `surgun erase` without options, the tab's balanced preset and the
    ComfyUI Train node's defaults (every numeric widget at 0, "the recipe's"): the same EraseConfig."""
    args = build_parser().parse_args(
        ["erase", "--model", str(MODEL_DIR), "--concept", "circle", "--out", "x.safetensors"]
    )
    cli = erase_config(settings_from(args), toy_backend)
    tab = EraseRequest(concepts="circle", kind="object", preset="balanced").to_config(StandaloneHost())
    r = parsing.recipe_value
    node = parsing.build_config("circle", "", "", family=family_of(toy_backend), kind="object", steps=r(0), lr=r(0.0),
                                rank=r(0), alpha=None, blocks=parsing.resolve_blocks("auto", ""), calibrate=True,
                                guidance=r(0.0), seed=0, extra={"front_end": "comfyui"})  # fmt: skip
    assert cli.recipe == tab.recipe == node.recipe == "toy"
    assert _settings(cli) == _settings(tab) == _settings(node)
    assert (cli.steps, cli.lr, cli.guidance) == (120, 1e-2, 4.0)  # the toy recipe, not EraseConfig's defaults


def test_user_settings_override_only_what_was_set():
    cfg = recipe_config("toy", ["circle"], "object", steps=7, lr=None)
    assert cfg.steps == 7 and cfg.lr == RECIPES["toy"].settings["lr"]
    assert cfg.distractors == ["square", "triangle", "cross", "ring"]


@pytest.mark.parametrize(("kind", "family"), [("sd1", "sd1"), ("sdxl", "sdxl"), ("sana", "flow")])
def test_family_of_tiny_models(kind, family):
    assert family_of(tiny_backend(kind)) == family


def test_family_of_the_toy_model(toy_backend):
    assert family_of(toy_backend) == "toy"


def test_unknown_recipe_and_kind_are_refused():
    with pytest.raises(ConfigError) as e:
        get_recipe("sd4")
    assert e.value.field == "recipe" and "sd1" in str(e.value)
    with pytest.raises(ConfigError) as e:
        recipe_config("toy", ["circle"], "animal")
    assert e.value.field == "kind"


def test_the_recipe_is_named_in_the_config():
    assert recipe_config("sdxl", ["dog"]).recipe == "sdxl"
    assert recipe_config("sdxl", ["dog"]).sample_batch_size == 4


def test_robust_mode_widens_the_blocks_unless_the_user_chose_them():
    assert recipe_config("toy", ["circle"], "object", robust=True).blocks == "all-attn"
    assert recipe_config("flow", ["dog"], robust=True).blocks == "dit-attn"
    assert recipe_config("toy", ["circle"], "object", robust=True, blocks="cross-attn-kv").blocks == "cross-attn-kv"
    # robust mode calibrates on drawn probe images; plain erases on the erased model's own verdict (recipes.ROBUST)
    assert recipe_config("toy", ["circle"], "object", robust=True).calibrate_signal == "probe"
    assert recipe_config("sd1", ["dog"], robust=True).calibrate_signal == "probe"
    assert recipe_config("toy", ["circle"], "object").calibrate_signal == "self"
    tab = EraseRequest(concepts="circle", preset="balanced", robust=True).to_config(StandaloneHost())
    assert tab.robust and tab.blocks == "all-attn"


def test_robust_settings_can_depend_on_the_concept_kind():
    # the toy recipe anchors colour erasures (style) looser than shapes in robust mode; the user still wins
    assert recipe_config("toy", ["circle"], "object", robust=True).w_retain == 100.0
    assert recipe_config("toy", ["yellow"], "style", robust=True).w_retain == 30.0
    assert recipe_config("toy", ["yellow"], "style", robust=True, w_retain=50.0).w_retain == 50.0
    plain = recipe_config("toy", ["yellow"], "style")  # plain mode: the colours' text anchor (the next test)
    assert (plain.retain_anchor, plain.w_retain) == ("text", 4.0)


def test_the_toy_recipe_anchors_colours_on_their_tokens_where_the_layers_read_the_prompt_alone():
    # plain mode on a colour: the text anchor at its weight; shapes and robust mode: the output anchor at theirs
    assert recipe_config("toy", ["circle"], "object").retain_anchor == "output"
    assert recipe_config("toy", ["red"], "style", robust=True).retain_anchor == "output"
    colour = recipe_config("toy", ["red"], "style", blocks="cross-attn-kv")
    assert (colour.retain_anchor, colour.w_retain) == ("text", 4.0)
    # layers that read the image as well: the output anchor at the recipe's weight for it, not a refusal
    for other in ({"blocks": "all-attn"}, {"blocks": "attn2"}, {"localize_attention": "all"}):
        cfg = recipe_config("toy", ["red"], "style", **other)
        assert (cfg.retain_anchor, cfg.w_retain) == ("output", 300.0), other
    assert recipe_config("toy", ["red"], "style", blocks="all-attn", w_retain=50.0).w_retain == 50.0  # the user's
    # an anchor the user picks without a weight gets the recipe's weight for it; with one, the user's
    assert recipe_config("toy", ["red"], "style", retain_anchor="output").w_retain == 300.0
    assert recipe_config("toy", ["circle"], "object", retain_anchor="text").w_retain == 4.0
    assert recipe_config("toy", ["circle"], "object", retain_anchor="text", w_retain=2.0).w_retain == 2.0
    with pytest.raises(ConfigError, match="retain_anchor"):  # asked for by name: refused, not swapped
        recipe_config("toy", ["red"], "style", retain_anchor="text", localize_attention="self")
    # the cross-attention K/V layers by pattern, or as the Localize node lists them: the text anchor stays
    from surgun_core.engine.localize import BlockGroup

    prompt_only = BlockGroup("cross down", ["down.0.attn2.to_k", "down.0.attn2.to_v"]).pattern
    reads_image = BlockGroup("mixed", ["down.0.attn2.to_k", "down.0.attn1.to_v"]).pattern
    for blocks, anchor in ((r"attn2\.(to_k|to_v)$", "text"), (prompt_only, "text"), (reads_image, "output")):
        assert recipe_config("toy", ["red"], "style", blocks=blocks).retain_anchor == anchor, blocks
    # a family with no measured text-anchor weight asks for one rather than guess (the toy world's is 4)
    with pytest.raises(ConfigError, match="w_retain"):
        recipe_config("sd1", ["cat"], "object", retain_anchor="text")
    assert recipe_config("sd1", ["cat"], "object", retain_anchor="text", w_retain=2.0).w_retain == 2.0
    colour = {"retain_anchor": "text", "w_retain": 4.0}
    assert merge_settings("toy", colour, {"retain_anchor": None, "w_retain": None}) == colour  # None: not set
    # the tab's form goes through the same rule (its blocks field)
    tab = EraseRequest(concepts="red", preset="balanced", blocks="all-attn").to_config(StandaloneHost())
    assert (tab.retain_anchor, tab.w_retain) == ("output", 300.0)
    assert EraseRequest(concepts="red", preset="balanced").to_config(StandaloneHost()).retain_anchor == "text"


def test_the_toy_recipe_phrases_each_kind_beside_the_other_in_plain_mode_only():
    from surgun_core.toyworld.world import COLOURS, EVAL_TEMPLATE, HELDOUT_TEMPLATES, SHAPES

    held_out = {t.replace("{c}", c).replace("{s}", s) for t in (EVAL_TEMPLATE, *HELDOUT_TEMPLATES)
                for c in COLOURS for s in SHAPES}  # fmt: skip
    shape = recipe_config("toy", ["circle"], "object")
    anchored = [t.format("square") for t in shape.retain_templates]
    assert {f"a photo of a {c} square" for c in COLOURS} <= set(anchored) and "a square" in anchored
    assert shape.templates == ["a photo of a {}", "a {}", "a drawing of a {}", "a painting of a {}"]
    colour = recipe_config("toy", ["purple"], "style")
    trained = [t.format("purple") for t in colour.templates]
    assert len(trained) == colour.images_per_concept and colour.distractor_same_template
    assert {f"a photo of a purple {s}" for s in SHAPES} <= set(trained) and "purple artwork" in trained
    assert not held_out & (set(anchored) | set(trained))  # the evaluation's phrasings stay unseen
    for concept, kind in (("circle", "object"), ("purple", "style")):
        robust = recipe_config("toy", [concept], kind, robust=True)
        assert robust.retain_templates is None and not robust.distractor_same_template
        assert not any(s in t for t in robust.templates for s in SHAPES)
    assert recipe_config("toy", ["purple"], "style", templates=["{} paint"]).templates == ["{} paint"]  # the user's
