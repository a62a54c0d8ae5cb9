"""SurgUn Demo Model: the toy world's model as MODEL, CLIP and VAE, so workflows run on a CPU offline."""

from __future__ import annotations

from comfy_api.latest import io

from .toy_model import load_toy_clip, load_toy_model, load_toy_vae
from .types import CATEGORY


class SurgUnDemoModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SurgUnDemoModel",
            display_name="SurgUn Demo Model",
            category=CATEGORY,
            description=(
                "The SurgUn toy world's model (shipped with the pack, nothing to download): a tiny SD1.5-shaped "
                "model that draws coloured shapes ('a red circle') as 16x16 images, in pixel space. Use "
                "EmptyChromaRadianceLatentImage (16x16) for its LATENT and the ddim sampler with ddim_uniform. "
                "It knows only shapes (circle, square, triangle, cross, ring) and colours (red, green, blue, "
                "yellow, purple): in SurgUn Train give the other shapes (or colours) as distractors."
            ),
            inputs=[],
            outputs=[
                io.Model.Output(tooltip="The toy UNet in a stock ComfyUI model; KSampler and LoraLoader work on it."),
                io.Clip.Output(tooltip="The toy text encoder (SD1 CLIP classes, word-level vocabulary)."),
                io.Vae.Output(tooltip="ComfyUI's pixel-space VAE: the LATENT is the image itself."),
            ],
        )

    @classmethod
    def execute(cls) -> io.NodeOutput:
        return io.NodeOutput(load_toy_model(), load_toy_clip(), load_toy_vae())
