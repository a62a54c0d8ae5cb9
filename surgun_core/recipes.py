"""One recipe per model family (DESIGN.md section 2): where every front end's defaults come from.

A front end finds its model's family (`family_of`), starts from that family's recipe and overrides only
what its user set (`recipe_config`). So the same concept on the same model gets the same erase from the
ComfyUI node's defaults, the tab's "balanced" preset and `surgun erase` without options; the delta's header
and every report name the recipe that ran (EraseConfig.recipe).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from .backends.base import Backend
from .concepts import templates_for
from .config import EraseConfig
from .errors import ConfigError
from .objectives import FlowObjective
from .registry import AUTO_BLOCKS, BLOCK_PRESETS
from .toyworld.paths import ARCHITECTURE as TOY_ARCHITECTURE
from .toyworld.world import COLOURS, FULL_TEMPLATES, OBJECT_TEMPLATES, SHAPES, STYLE_TEMPLATES

# Probe prompts of the toy world: the concept alone and with the other attribute, as users write them
# (training prompts name the concept alone).
TOY_PROBE_TEMPLATES = {
    "object": ("a {}", "a yellow {}", "a photo of a green {}", "a {} in purple"),
    "style": ("{} artwork", "a {} square", "a photo of a {} ring", "a triangle in {}"),
}


def toy_templates(kind: str) -> list[str]:
    """The toy world's training phrasings of a kind, with "{}" for the concept (the engine's template form)."""
    templates = OBJECT_TEMPLATES if kind == "object" else STYLE_TEMPLATES
    return [t.replace("{s}", "{}").replace("{c}", "{}") for t in templates]


# The toy world's phrasings that name a shape and a colour, but for the evaluation's own ("a {c} {s}"):
# "a photo of a {c} {s}", "a drawing of a {c} {s}", "a {s} in {c}"
_COMPOSED = ("a photo of a {c} {s}", "a drawing of a {c} {s}", "a {s} in {c}")
assert set(_COMPOSED) <= set(FULL_TEMPLATES)  # the base model's own training phrasings


def _composed(kind: str, others: tuple[str, ...]) -> list[str]:
    """A kind's phrasings with "{}" for its concept beside each concept of the other kind (`others`)."""
    mine, theirs = ("{s}", "{c}") if kind == "object" else ("{c}", "{s}")
    return [t.replace(theirs, o).replace(mine, "{}") for t in _COMPOSED for o in others]


# plain mode on the toy world, by kind (robust mode's settings were measured without them). Objects: every
# retain miss of the previous recipe was a shape beside a colour (erasing circle drew "a yellow triangle" as a
# circle, erasing square "a purple cross" as a triangle), and the anchor only saw shapes alone; anchoring the
# distractors' images under their names beside each colour (no image drawn) kept every retained shape (IRA 1.00 on
# the five shapes, was 0.96 on circle, square and ring). The same anchor on colours cost erasure (green UA 0.75,
# blue 120 steps against 48). Colours: their training phrasings never named a shape, and "a purple circle" stayed
# purple (UA 0.90 at 168 steps); trained beside each shape too, purple erased (UA 1.00) at 132. With such phrasings a
# distractor row's image is drawn in its target row's phrasing (distractor_same_template): a red square under
# "a photo of a purple circle" had purple circles lose their shape (0.65 kept it, 1.00 with the same phrasing).
# Colours' retain anchor is on the prompts' tokens (engine/anchor.py; no denoiser forward a step): one run per colour
# (ground truth, the benchmark's 100 images) at weight 4, every colour H 1.00 at step 24 (6,796-8,196 forwards;
# 9,040-19,600 with the output anchor), at 8 the four tried too; at 1 and 2 purple shipped step 12 (UA 0.95, 0.65).
# On shapes it missed "a <colour> square" (UA 0.35): shapes keep the output anchor (README, "The retain anchor on
# the prompts' tokens"). The weight is measured on the toy world only
TOY_TEXT_ANCHOR = {"retain_anchor": "text", "w_retain": 4.0}
TOY_PLAIN_BY_KIND = {
    "object": {"retain_templates": toy_templates("object") + _composed("object", COLOURS)},
    # one image a phrasing (16 a concept): beside every shape in two phrasings, circle and square in the third
    "style": {
        "templates": (toy_templates("style") + _composed("style", SHAPES))[:16],
        "distractor_same_template": True,
        **TOY_TEXT_ANCHOR,
    },
}


def _toy_concepts(kind: str, concepts: list[str]) -> dict:
    """The toy world's own phrasings; the other concepts of the kind are the distractors."""
    pool = SHAPES if kind == "object" else COLOURS
    lower = {c.lower() for c in concepts}
    return {"distractors": [c for c in pool if c not in lower], "templates": toy_templates(kind),
            "probe_templates": list(TOY_PROBE_TEMPLATES[kind])}  # fmt: skip


# robust mode calibrates on drawn probe images ("probe"): with every attention layer trained, the erased model's own
# verdict on base images of the concept read it as still there where its drawn images were not (toy world, step 200:
# circle 0.81, square 0.00, ground truth UA 1.00), so every robust run trained 60 steps more
ROBUST = {"blocks": "all-attn", "lr_schedule": "constant", "calibrate_signal": "probe", "checkpoint_every": 0}


@dataclass(frozen=True)
class Recipe:
    """EraseConfig settings for one model family; `per_concepts` adds those that depend on kind and concepts."""

    name: str
    description: str
    settings: dict = field(default_factory=dict)
    per_concepts: Callable[[str, list[str]], dict] | None = None
    # robust mode's own settings: every attention layer (self and cross, q/k/v/out) and a constant learning rate.
    # On the toy world, with the adversary, cross-attention K/V alone still let concept inversion bring circles
    # back in 80% of images, every attention layer in 15-22%; a cosine schedule (the model stops answering the
    # adversary as the rate decays) 0.43-0.53 against 0.23 constant (README, "Robustness")
    robust: dict = field(default_factory=lambda: dict(ROBUST))
    robust_by_kind: dict = field(default_factory=dict)  # robust settings of one concept kind ("object", "style")
    plain_by_kind: dict = field(default_factory=dict)  # settings of one concept kind in plain mode only
    # w_retain of the text anchor (|dW u|^2 / |W u|^2, a relative measure) where the user picks it without a weight;
    # None: not measured for this family, the user gives one (merge_settings says so)
    text_anchor_weight: float | None = None

    def settings_for(self, kind: str, concepts: list[str], robust: bool = False) -> dict:
        extra = self.per_concepts(kind, concepts) if self.per_concepts else {}
        if robust:
            more = {**self.robust, **self.robust_by_kind.get(kind, {}), "robust": True}
        else:
            more = self.plain_by_kind.get(kind, {})
        return {**self.settings, **extra, **more, "recipe": self.name}


# sized for 2 CPU cores; probe images at 10 sampler steps and one label prompt per concept for the judge:
# half the cost of localization and calibration, and the judge named the shape of base images as often
# (0.99 vs 0.98, 80 images). 120 steps at lr 1e-2 (cosine) with the retain anchor at 300: on circle, square,
# ring and triangle every run erased (ground truth UA 1.00 at the last step) where 6e-3 / 100 left retain
# swinging (IRA 0.79-0.99 between checkpoints) and a 1000 anchor kept square from erasing (UA 0.05 at 100
# steps); ring still lets retain fall late (IRA 1.00 at step 40, 0.74 at 120): calibration's latest-first
# scan ships the latest checkpoint with no retain fall. Purple was still erasing at step 120 (ground truth UA
# 0.60): a run that no checkpoint of which erases trains 60 steps more (extend_steps). Calibration's retained
# probe: one seed per template (4 retained concepts x 4 templates = 16 images a checkpoint) and a tolerance of one
# image (0.07): 4 seeds drew 64 retained images a checkpoint, 4,800 of the 22,600 forwards of circle's erase. Tried
# and not kept (one run each, ground truth): training images at 10 sampler steps (-1,600 forwards) shipped square
# at UA 0.90 (1.00 at 20 steps); 4 retain rows a step (-1,920) purple at IRA 0.79 (0.95 with 8). Training stops at
# the first checkpoint (every 12 steps) that the erased model's own verdict reads as erased (stop_when_erased): on
# the toy world the concept was gone by step 24-60 (ground truth), and the steps after it cost retain more often
# than they bought erasure (square IRA 0.96 at 60, 0.94 at 120; ring 0.96 at 48, 0.85 at 60). Its price: a shallower
# erasure that a prefix attack undoes more often (plain-mode recovery 0.120 against 0.015 at 120 steps; blue 0.80
# stopped at 48, 0.00 at 72): robust mode is the answer to attacks, and it does not stop early. No concept's verdict
# read erased at step 12, so the first is taken at 24 (stop_check_from: -320 forwards an erase); 12 held-out images
# a verdict rather than 16 (-80 a checkpoint). Tried and not kept (surgun-only bench over the 10 concepts, one
# run): 12 training images a concept (-800 forwards) brought the average to 12,660 forwards (0.236x ESD-x) but H
# to 0.980 (0.991), purple to UA 0.75 / IRA 0.94 and the average spread to 0.18 (0.39)
TOY_SETTINGS = dict(steps=120, lr=1e-2, w_retain=300.0, rank=4, alpha=4.0, batch_size=8, images_per_concept=16,
                    guidance=4.0, sample_batch_size=64, probe_sample_steps=10, judge_prompts=1, probe_seeds=1,
                    retain_tolerance=0.07, extend_steps=60, stop_when_erased=True, checkpoint_every=12,
                    stop_check_from=24, self_judge_images=12)  # fmt: skip

# robust mode on the toy world: 200 steps at a constant 6e-3 with the retain anchor at 100 (circle, with the
# adversary's rows a loss group of their own: inversion recovery 0.025, IRA 0.975; the anchor at 300 held the
# model where the adversary found circles: 0.525). Its calibration judges 4 seeds a prompt at a tolerance of 0.05: with
# the plain recipe's one seed (16 retained images) the judge's misreadings made purple's retain "fall" after step 40,
# and step 40 shipped (inversion brought purple back in 0.75 of images)
TOY_ROBUST = {**ROBUST, "steps": 200, "lr": 6e-3, "w_retain": 100.0, "probe_seeds": 4, "retain_tolerance": 0.05}
# colours with the anchor at 30: at 100 the adversary kept two of five colour erasures swinging between checkpoints
# (yellow's probe erase 0.50-0.88 over 260 steps, ground truth UA 0.65, inversion recovery 0.25; red 1.00 at step
# 40, 0.56 at 120); at 30 four of five colours erased and held, yellow still reads 0.65 UA in the bench (the judge
# counts its yellow-greens as erased; README, "Robustness")
TOY_ROBUST_BY_KIND = {"style": {"w_retain": 30.0}}

RECIPES: dict[str, Recipe] = {
    "toy": Recipe(
        "toy",
        "the embedded toy world (16x16 pixels, 1.1M parameters)",
        TOY_SETTINGS,
        _toy_concepts,
        robust=TOY_ROBUST,
        robust_by_kind=TOY_ROBUST_BY_KIND,
        plain_by_kind=TOY_PLAIN_BY_KIND,
        text_anchor_weight=TOY_TEXT_ANCHOR["w_retain"],
    ),
    # EraseConfig's defaults are the SD recipe
    "sd1": Recipe("sd1", "Stable Diffusion 1.x / 2.x UNets (512-768 px)"),
    # 1024 px latents: 4 images per sampler call and per training batch, so an erase fits a 12 GB card (the plan's
    # estimate for a training step in fp16 with checkpointing: 15.9 GB at batch 8, 11.4 GB at batch 4)
    "sdxl": Recipe("sdxl", "Stable Diffusion XL UNets (1024 px)", dict(sample_batch_size=4, batch_size=4)),
    "flow": Recipe(
        "flow",
        "flow-matching DiTs (SD3, Flux, SANA)",
        dict(sample_batch_size=4),
        robust={**ROBUST, "blocks": "dit-attn"},
    ),
}

_PREFIXES = (
    (TOY_ARCHITECTURE, "toy"),
    ("stable-diffusion-xl", "sdxl"),
    ("stable-diffusion-v1", "sd1"),
    ("stable-diffusion-v2", "sd1"),
    ("stable-diffusion-3", "flow"),
    ("flux", "flow"),
    ("sana", "flow"),
)


def family_of(backend: Backend) -> str:
    """The recipe family of a backend's model, from its architecture (else its objective)."""
    for prefix, family in _PREFIXES:
        if backend.architecture.startswith(prefix):
            return family
    return "flow" if isinstance(backend.objective, FlowObjective) else "sd1"


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ConfigError("recipe", f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}")
    return RECIPES[name]


def recipe_settings(family: str, concepts: list[str], kind: str = "object", robust: bool = False) -> dict:
    """The recipe's EraseConfig keyword arguments for these concepts (before the user's overrides); robust:
    robust mode with the recipe's robust settings (its wider blocks)."""
    templates_for(kind)  # an unknown kind is refused with the valid ones
    return {**get_recipe(family).settings_for(kind, concepts, robust), "concepts": list(concepts), "kind": kind}


# the Localize node's chosen layers as EraseConfig.blocks: "^(?:name|name...)$" (engine/localize.BlockGroup.pattern)
_LAYER_LIST = re.compile(r"\^\(\?:(.*)\)\$")
_PROMPT_ONLY_LAYERS = ("attn2.to_k", "attn2.to_v")  # what the cross-attn-kv preset matches


def _reads_prompt_alone(settings: dict) -> bool:
    """Whether the layers these settings train read the prompt alone (the text anchor's condition): localization
    over cross-attention K/V, the cross-attention K/V preset (by name or pattern), or a list of such layers."""
    blocks = str(settings.get("blocks", AUTO_BLOCKS)).strip()
    if blocks == AUTO_BLOCKS:
        return settings.get("localize_attention", "cross") == "cross"
    pattern = BLOCK_PRESETS.get(blocks, blocks)
    if pattern == BLOCK_PRESETS["cross-attn-kv"]:
        return True
    listed = _LAYER_LIST.fullmatch(pattern)
    names = [re.sub(r"\\(.)", r"\1", n) for n in listed[1].split("|")] if listed else []
    return bool(names) and all(n.endswith(_PROMPT_ONLY_LAYERS) for n in names)


def merge_settings(family: str, recipe: dict, user: dict) -> dict:
    """The recipe's EraseConfig settings, then the user's, with a retain anchor the trained layers allow.

    The recipe's text anchor stands only where every trained layer reads the prompt alone: a user who trains other
    layers (blocks, localize_attention) gets the output anchor at the recipe's weight for it. A user who picks
    an anchor without a weight gets the recipe's weight for that anchor (the two measure different things: the
    toy recipe's are 300 and 4); a user's w_retain weighs the anchor in effect. None values mean "not set".
    """
    user = {k: v for k, v in user.items() if v is not None}
    out = {**recipe, **user}
    was = recipe.get("retain_anchor", "output")
    if was == "text" and "retain_anchor" not in user and not _reads_prompt_alone(out):
        out["retain_anchor"] = "output"
    now = out.get("retain_anchor", "output")
    if now != was and "w_retain" not in user:
        r = get_recipe(family)
        if now == "text" and r.text_anchor_weight is None:
            raise ConfigError("w_retain", f"the {family} recipe has no measured weight for retain_anchor='text'; "
                              "give w_retain too (the toy world's is 4: the share of the layers' output on the "
                              "retain prompts' tokens that the LoRA may change, squared)")  # fmt: skip
        out["w_retain"] = r.text_anchor_weight if now == "text" else r.settings.get("w_retain", EraseConfig.w_retain)
    return out


def recipe_config(family: str, concepts: list[str], kind: str = "object", **user) -> EraseConfig:
    """EraseConfig = the family's recipe, then what the user set (None values mean "not set")."""
    settings = recipe_settings(family, concepts, kind, robust=bool(user.get("robust")))
    return EraseConfig.from_dict(merge_settings(family, settings, user))
