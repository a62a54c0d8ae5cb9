"""SurgUn Localize: which attention blocks should carry the erasure (the pixel-grounded block diagnostic)."""

from __future__ import annotations

import comfy.utils
from comfy_api.latest import io

from ..surgun_core.charts import plot_groups
from ..surgun_core.concepts import KINDS
from ..surgun_core.engine.localize import group_line, localize_for
from ..surgun_core.recipes import family_of
from ..surgun_core.registry import ATTENTION_KINDS, LOCALIZE_METHODS
from .parsing import build_config, recipe_value
from .probe_node import PROBE_SCORERS
from .train_node import cancelled, comfy_backend
from .types import CATEGORY, pil_to_image


class SurgUnLocalize(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SurgUnLocalize",
            display_name="SurgUn Localize",
            category=CATEGORY,
            description="Ranks the groups of attention blocks for an erasure. method 'gradient' (what SurgUn "
            "Train does with blocks = auto): a few SurgUn steps on every group at once, each group scored by its "
            "share of the loss's gradient, the groups carrying most of it chosen. 'short-runs': a short run per "
            "group, its probe images scored for erase and retain, the groups that erase with the best retain "
            "chosen (steps_per_group, keep). This node shows the ranking; its blocks output can feed Train's "
            "blocks_regex (blocks = manual).",
            inputs=[
                io.Model.Input("model", tooltip="The model to erase concepts from (not changed)."),
                io.Clip.Input("clip", tooltip="The model's text encoder."),
                io.String.Input("concepts", multiline=True, default="", tooltip="Concepts to erase, one per line."),
                io.String.Input("distractors", multiline=True, default="",
                                tooltip="Other concepts of the same kind, one per line; empty: the built-in list."),
                io.Combo.Input("kind", options=list(KINDS), default="object",
                               tooltip="What the concepts are: 'object' or 'style'."),
                io.Combo.Input("attention", options=list(ATTENTION_KINDS), default="cross",
                               tooltip="Candidate groups: cross-attention K/V per level, self-attention, or both."),
                io.Int.Input("steps_per_group", default=40, min=1, max=1000,
                             tooltip="SurgUn steps of each group's short run."),
                io.Int.Input("keep", default=2, min=1, max=16, tooltip="How many block groups to choose."),
                io.Float.Input("learning_rate", default=0.0, min=0.0, max=1.0, step=1e-4, round=False,
                               tooltip="AdamW learning rate of the short runs (as in SurgUn Train); 0: the recipe's."),
                io.Float.Input("guidance", default=0.0, min=0.0, max=30.0, step=0.1,
                               tooltip="CFG scale of training and probe images; 0: the recipe's."),
                io.Combo.Input("scorer", options=PROBE_SCORERS, default="diffusion",
                               tooltip="Judge of the probe images: the base model itself, or the demo model's "
                               "ground-truth classifier ('toy')."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=False,
                             tooltip="Seed of training images and runs."),
                io.Combo.Input("method", options=list(LOCALIZE_METHODS), default="gradient", optional=True,
                               tooltip="'gradient': the loss's gradient share per group (no probe images; "
                               "SurgUn Train's auto). 'short-runs': a short run per group, judged on probe images."),
            ],
            outputs=[
                io.String.Output("blocks", tooltip="A regular expression over the chosen layers: feed it to SurgUn "
                                 "Train's blocks_regex with blocks = manual."),
                io.Image.Output("chart", tooltip="Erase and retain of every group; the chosen ones starred."),
                io.String.Output("report", tooltip="The ranking as text."),
            ],
        )  # fmt: skip

    @classmethod
    def execute(cls, model, clip, concepts, distractors, kind, attention, steps_per_group, keep, learning_rate,
                guidance, scorer, seed, method="gradient") -> io.NodeOutput:  # fmt: skip
        backend = comfy_backend(model, clip)
        cfg = build_config(concepts, distractors, family=family_of(backend), kind=kind, localize_attention=attention,
                           localize_method=method,
                           localize_steps=steps_per_group, localize_keep=keep, lr=recipe_value(learning_rate),
                           guidance=recipe_value(guidance), scorer=scorer, seed=seed,
                           extra={"front_end": "comfyui"})  # fmt: skip
        backend.default_guidance = cfg.guidance
        pbar = comfy.utils.ProgressBar(1)
        with backend.training():
            res = localize_for(backend, cfg, progress=lambda _p, d, n, _s: pbar.update_absolute(d, n),
                               cancel=cancelled)  # fmt: skip
        chart = pil_to_image(plot_groups(res))
        lines = [f"chosen: {', '.join(res.chosen)}  ({res.seconds:.0f} s{', cached' if res.cached else ''})",
                 f"why: {res.reason}", "group                    layers"]  # fmt: skip
        lines += [group_line(r) for r in res.groups]
        return io.NodeOutput(res.pattern, chart, "\n".join(lines))
