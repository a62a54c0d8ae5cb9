"""SurgUn Train: erase concepts from the loaded MODEL; outputs the erased MODEL and the delta."""

from __future__ import annotations

import logging

import comfy.model_management
import comfy.utils
from comfy_api.latest import io

from ..surgun_core.backends.comfy import ComfyBackend, apply_delta
from ..surgun_core.concepts import KINDS
from ..surgun_core.config import BLOCK_PRESETS
from ..surgun_core.surgun import erase
from .parsing import BLOCK_CHOICES, build_config, resolve_blocks
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
                io.Int.Input("steps", default=150, min=1, max=10000,
                             tooltip="Training steps; more erases more strongly and takes longer."),
                io.Float.Input("learning_rate", default=2e-3, min=1e-6, max=1.0, step=1e-4, round=False,
                               tooltip="AdamW learning rate of the LoRA."),
                io.Int.Input("rank", default=4, min=1, max=128, tooltip="LoRA rank: size of the delta."),
                io.Combo.Input("blocks", options=BLOCK_CHOICES, default=next(iter(BLOCK_PRESETS)),
                               tooltip="Which attention layers get the LoRA: a preset, or 'manual' to use "
                               "blocks_regex."),
                io.String.Input("blocks_regex", default="", optional=True,
                                tooltip="With blocks = manual: a regular expression over the model's attention "
                                "Linear names, e.g. attn2\\.to_k$."),
                io.Float.Input("guidance", default=5.0, min=0.0, max=30.0, step=0.1,
                               tooltip="CFG scale used when the frozen model draws its own training images."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=False,
                             tooltip="Seed of training images and of training; same seed, same delta."),
                io.String.Input("templates", multiline=True, default="", optional=True,
                                tooltip="Prompt templates with one {} for the concept, one per line; empty: the "
                                "built-in templates for the kind."),
            ],
            outputs=[
                io.Model.Output(tooltip="The model with the erasure applied (as a LoRA patch, strength 1)."),
                UnlearnDelta.Output(tooltip="The trained delta: save it, or apply it at another strength."),
            ],
            hidden=[io.Hidden.unique_id],
        )  # fmt: skip

    @classmethod
    def execute(cls, model, clip, concepts, distractors, kind, steps, learning_rate, rank, blocks, guidance, seed,
                blocks_regex="", templates="") -> io.NodeOutput:  # fmt: skip
        # 1. widgets -> EraseConfig (validated there: an empty concept list fails here, before any work)
        cfg = build_config(concepts, distractors, templates or "", kind=kind, steps=steps, lr=learning_rate,
                           rank=rank, alpha=float(rank), blocks=resolve_blocks(blocks, blocks_regex),
                           guidance=guidance, seed=seed, extra={"front_end": "comfyui"})  # fmt: skip
        base = model.model
        backend = ComfyBackend(model, clip, architecture=getattr(base, "surgun_architecture", None),
                               image_size=getattr(base, "surgun_image_size", None))  # fmt: skip
        backend.default_guidance = guidance
        # 2. train (progress bar + Cancel), leaving the shared model as it was
        pbar = comfy.utils.ProgressBar(cfg.steps)
        with backend.training():
            result = erase(backend, cfg, progress=cls._progress(pbar), cancel=_cancelled)
            result.lora.detach()
        # 3. the erased model through ComfyUI's own LoRA patching
        return io.NodeOutput(apply_delta(model, result.delta, 1.0), result.delta)

    @classmethod
    def _progress(cls, pbar):
        node_id = cls.hidden.unique_id if cls.hidden else None

        def progress(phase: str, done: int, total: int, stats: dict) -> None:
            pbar.update_absolute(done, total)
            if phase == "train" and node_id:
                text = f"step {done}/{total}  " + "  ".join(f"{k} {v:.4f}" for k, v in stats.items())
                _send_text(text, node_id)

        return progress


def _cancelled() -> bool:
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
