"""Apply and Save Unlearning Delta: a delta on a MODEL (and CLIP) through ComfyUI's LoRA patching; a delta into
models/loras."""

from __future__ import annotations

import logging
from pathlib import Path

import folder_paths
from comfy_api.latest import io, ui

from ..surgun_core.backends.comfy import apply_delta_with_clip
from ..surgun_core.errors import SurgUnError
from ..surgun_core.lora import read_safetensors
from .types import CATEGORY, UnlearnDelta

log = logging.getLogger(__name__)
NO_FILE = "[none]"


class SurgUnApplyDelta(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SurgUnApplyDelta",
            display_name="Apply Unlearning Delta",
            category=CATEGORY,
            description="Apply an erasure to a model as a LoRA patch; it stacks with other LoRAs (like LoraLoader).",
            inputs=[
                io.Model.Input("model", tooltip="The model to apply the erasure to (a patched copy is returned)."),
                io.Float.Input("strength", default=1.0, min=-4.0, max=4.0, step=0.05,
                               tooltip="1 erases fully, 0.5 half way, 0 not at all; negative pushes the other way."),
                UnlearnDelta.Input("delta", optional=True,
                                   tooltip="A delta from SurgUn Train. Give this or a file, not both."),
                io.Combo.Input("delta_file", options=[NO_FILE, *folder_paths.get_filename_list("loras")],
                               default=NO_FILE, optional=True,
                               tooltip="A delta saved in models/loras. Give this or the delta input, not both."),
                io.Clip.Input("clip", optional=True,
                              tooltip="Optional: the text encoder, to chain this node like LoraLoader. SurgUn deltas "
                              "change only the model, so the CLIP passes through unchanged."),
            ],
            outputs=[
                io.Model.Output(tooltip="The model with the erasure applied."),
                io.Clip.Output(tooltip="The CLIP input with the delta's text-encoder part (none in SurgUn deltas); "
                               "empty when no CLIP is connected."),
            ],
        )  # fmt: skip

    @classmethod
    def execute(cls, model, strength, delta=None, delta_file=NO_FILE, clip=None) -> io.NodeOutput:
        use_file = bool(delta_file) and delta_file != NO_FILE
        if delta is not None and use_file:
            raise SurgUnError("Apply Unlearning Delta: both a delta input and delta_file are given; "
                              f"disconnect one or set delta_file to {NO_FILE}")  # fmt: skip
        if delta is None and not use_file:
            raise SurgUnError("Apply Unlearning Delta: no delta; connect SurgUn Train's UNLEARN_DELTA or pick a "
                              "delta_file from models/loras")  # fmt: skip
        if delta is not None:  # as comfy.sd.load_lora_for_models(model, clip, sd, strength, strength)
            return io.NodeOutput(*_with_base(model, apply_delta_with_clip(model, clip, delta, strength)))
        path = folder_paths.get_full_path("loras", delta_file)
        if path is None:
            raise SurgUnError(f"Apply Unlearning Delta: {delta_file!r} is not in models/loras; save it there first "
                              "or pick another file")  # fmt: skip
        tensors, _ = read_safetensors(path)
        return io.NodeOutput(
            *_with_base(model, apply_delta_with_clip(model, clip, tensors, strength, source=delta_file))
        )


def _with_base(base, patched: tuple) -> tuple:
    """Remember the unpatched model on the patched one, so Concept Probe can compare without a base input."""
    patched[0].surgun_base = base
    return patched


class SurgUnSaveDelta(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SurgUnSaveDelta",
            display_name="Save Unlearning Delta",
            category=CATEGORY,
            description="Save a delta into models/loras; stock LoraLoader / LoraLoaderModelOnly load it.",
            inputs=[
                UnlearnDelta.Input("delta", tooltip="The delta from SurgUn Train."),
                io.String.Input("filename_prefix", default="surgun/erase",
                                tooltip="File name prefix inside models/loras; a counter and .safetensors are added."),
            ],
            outputs=[io.String.Output(tooltip="The saved file's name in models/loras, as LoraLoader lists it.")],
            is_output_node=True,
        )  # fmt: skip

    @classmethod
    def execute(cls, delta, filename_prefix) -> io.NodeOutput:
        loras = folder_paths.get_folder_paths("loras")[0]
        folder, name, counter, _subfolder, _prefix = folder_paths.get_save_image_path(filename_prefix, loras)
        path = Path(folder) / f"{name}_{counter:05}_.safetensors"
        delta.save(path)  # atomic: temporary file in the same folder, then rename
        rel = str(path.relative_to(loras))
        log.info("SurgUn: saved delta to %s", path)
        return io.NodeOutput(rel, ui=ui.PreviewText(f"saved models/loras/{rel}"))
