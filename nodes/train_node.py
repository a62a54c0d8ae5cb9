"""SurgUn Train: erase concepts from the loaded MODEL; outputs the erased MODEL and the delta."""

from __future__ import annotations

import logging

import comfy.model_management
import comfy.utils
from comfy_api.latest import io

from ..surgun_core.backends.comfy import ComfyBackend, apply_delta
from ..surgun_core.concepts import KINDS
from ..surgun_core.config import EraseConfig
from ..surgun_core.engine.localize import group_line
from ..surgun_core.recipes import family_of
from ..surgun_core.registry import AUTO_BLOCKS
from ..surgun_core.surgun import erase
from .live import send_train_update
from .parsing import BLOCK_CHOICES, build_config, recipe_value, resolve_blocks
from .types import CATEGORY, UnlearnDelta

log = logging.getLogger(__name__)


class SurgUnTrain(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SurgUnTrain",
            display_name="SurgUn Train",
            category=CATEGORY,
            description="Erase one or more concepts from the model by training a small LoRA delta (SurgUn).",
            inputs=[
                io.Model.Input("model", tooltip="The model to erase concepts from (it is not changed; a copy is)."),
                io.Clip.Input("clip", tooltip="The model's text encoder, used to encode the training prompts."),
                io.String.Input("concepts", multiline=True, default="",
                                tooltip="Concepts to erase, one per line (or comma-separated), e.g. 'circle'."),
                io.String.Input("distractors", multiline=True, default="",
                                tooltip="Other concepts of the same kind that the erased prompt should drift to, one "
                                "per line; empty: the built-in list for the kind."),
                io.Combo.Input("kind", options=list(KINDS), default="object",
                               tooltip="What the concepts are: 'object' (things) or 'style' (artists, looks)."),
                io.Int.Input("steps", default=0, min=0, max=10000,
                             tooltip="Training steps; more erases more strongly and takes longer. 0: the recipe's "
                             "for this model family (the same as `surgun erase` and the tab's balanced preset)."),
                io.Float.Input("learning_rate", default=0.0, min=0.0, max=1.0, step=1e-4, round=False,
                               tooltip="AdamW learning rate of the LoRA; 0: the recipe's."),
                io.Int.Input("rank", default=0, min=0, max=128,
                             tooltip="LoRA rank: size of the delta; 0: the recipe's."),
                io.Combo.Input("blocks", options=BLOCK_CHOICES, default=AUTO_BLOCKS,
                               tooltip="Which attention layers get the LoRA: 'auto' = localization picks the block "
                               "groups that erase with the best retain (short runs first); a preset; or 'manual' "
                               "to use blocks_regex (e.g. from SurgUn Localize)."),
                io.Boolean.Input("calibration", default=True,
                                 tooltip="Keep the LoRA every steps/5 steps, score each on probe images and ship the "
                                 "one with the best retain among those that erase enough; off: the last step."),
                io.String.Input("blocks_regex", default="", optional=True,
                                tooltip="With blocks = manual: a regular expression over the model's attention "
                                "Linear names, e.g. attn2\\.to_k$."),
                io.Float.Input("guidance", default=0.0, min=0.0, max=30.0, step=0.1,
                               tooltip="CFG scale used when the frozen model draws its own training images; 0: the "
                               "recipe's."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=False,
                             tooltip="Seed of training images and of training; same seed, same delta."),
                io.String.Input("templates", multiline=True, default="", optional=True,
                                tooltip="Prompt templates with one {} for the concept, one per line; empty: the "
                                "built-in templates for the kind."),
                io.Boolean.Input("robust", default=False, optional=True,
                                 tooltip="Robust mode: train against an adversary that learns a token bringing the "
                                 "concept back (concept inversion), on every attention layer; slower. Check it "
                                 "with `surgun audit`."),
            ],
            outputs=[
                io.Model.Output(tooltip="The model with the erasure applied (as a LoRA patch, strength 1)."),
                UnlearnDelta.Output(tooltip="The trained delta: save it, or apply it at another strength."),
                io.String.Output("report", tooltip="Blocks chosen, calibration curve and step shipped, timings."),
            ],
            hidden=[io.Hidden.unique_id],
        )  # fmt: skip

    @classmethod
    def execute(cls, model, clip, concepts, distractors, kind, steps, learning_rate, rank, blocks, guidance, seed,
                calibration=True, blocks_regex="", templates="", robust=False) -> io.NodeOutput:  # fmt: skip
        # 1. widgets -> the model family's recipe + what the user set (validated: an empty concept list fails here)
        backend = comfy_backend(model, clip)
        cfg = train_config(backend, concepts, distractors, kind, steps, learning_rate, rank, blocks, guidance, seed,
                           calibration, blocks_regex, templates, robust)  # fmt: skip
        backend.default_guidance = cfg.guidance
        # 2. localize, train, calibrate (progress bar, live numbers, Cancel), leaving the shared model as it was
        pbar = comfy.utils.ProgressBar(cfg.steps)
        with backend.training():
            result = erase(backend, cfg, progress=cls._progress(pbar), cancel=cancelled)
            result.lora.detach()
        # 3. the erased model through ComfyUI's own LoRA patching
        erased = apply_delta(model, result.delta, 1.0)
        erased.surgun_base = model  # lets Concept Probe find the base model when base_model is not connected
        return io.NodeOutput(erased, result.delta, train_report(result))

    @classmethod
    def _progress(cls, pbar):
        node_id = cls.hidden.unique_id if cls.hidden else None

        def progress(phase: str, done: int, total: int, stats: dict) -> None:
            pbar.update_absolute(done, total)
            if node_id:
                send_train_update(node_id, {**stats, "phase": phase, "step": done, "total": total})
            if phase == "train" and node_id:
                text = f"step {done}/{total}  " + "  ".join(f"{k} {v:.4f}" for k, v in stats.items())
                _send_text(text, node_id)

        return progress


def train_config(backend, concepts, distractors, kind, steps, learning_rate, rank, blocks, guidance, seed,
                 calibration=True, blocks_regex="", templates="", robust=False) -> EraseConfig:  # fmt: skip
    """The Train node's widgets -> EraseConfig: the model family's recipe, then the widgets not left at 0 (robust
    mode with blocks "auto" keeps the recipe's wider robust blocks)."""
    chosen = resolve_blocks(blocks, blocks_regex)
    return build_config(concepts, distractors, templates or "", family=family_of(backend), kind=kind,
                        steps=recipe_value(steps), lr=recipe_value(learning_rate), rank=recipe_value(rank),
                        alpha=float(rank) if rank else None, blocks=None if robust and chosen == "auto" else chosen,
                        calibrate=calibration, guidance=recipe_value(guidance), seed=seed, robust=bool(robust) or None,
                        extra={"front_end": "comfyui"})  # fmt: skip


def comfy_backend(model, clip, guidance: float | None = None, vae=None) -> ComfyBackend:
    """The ComfyUI backend for a MODEL + CLIP (+ the VAE that decodes its images); the demo model carries its
    architecture and image size."""
    base = model.model
    backend = ComfyBackend(model, clip, architecture=getattr(base, "surgun_architecture", None),
                           image_size=getattr(base, "surgun_image_size", None), vae=vae)  # fmt: skip
    if guidance is not None:
        backend.default_guidance = guidance
    return backend


def train_report(result) -> str:
    recipe = result.delta.metadata.get("surgun.recipe") or "custom"
    lines = [f"SurgUn ({recipe} recipe): {result.steps_done} steps in {result.seconds:.0f} s, "
             f"{result.forwards:,} denoiser sample-forwards"]  # fmt: skip
    if result.localization:
        loc = result.localization
        lines.append(f"blocks (auto): {', '.join(loc.chosen)}" + (" (cached)" if loc.cached else ""))
        lines += [f"  {group_line(r)}" for r in loc.groups]
    if result.calibration:
        cal = result.calibration
        lines.append(f"calibration: shipped step {cal.chosen_step}: {cal.reason}")
        lines += [f"  step {r['step']:>5}  erase {r['erase']:.2f}  retain {r['retain']:.2f}" for r in cal.curve]
    lines += result.notes()
    return "\n".join(lines)


def cancelled() -> bool:
    """ComfyUI's Cancel: raises InterruptProcessingException, which ends the run as 'interrupted'."""
    comfy.model_management.throw_exception_if_processing_interrupted()
    return False


def _send_text(text: str, node_id: str) -> None:
    try:
        from server import PromptServer
    except ImportError:  # ComfyUI used as a library, without its server
        return
    if PromptServer.instance is not None:
        PromptServer.instance.send_progress_text(text, node_id)
