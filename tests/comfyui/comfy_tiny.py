"""Support for the in-process ComfyUI tests: ComfyUI imported from a checkout, the pack loaded the way ComfyUI
loads it, tiny untrained models of each family built from ComfyUI's own model configs.

Importing this module skips the importing test module when COMFYUI_SRC is unset or ComfyUI does not import.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import sys
import zlib
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SRC = os.environ.get("COMFYUI_SRC", "")
if not SRC:
    pytest.skip("COMFYUI_SRC is not set (path of a ComfyUI checkout)", allow_module_level=True)
sys.path.insert(0, SRC)  # ComfyUI is not an installable package: its checkout is the import root
try:
    import comfy.cli_args

    if not torch.cuda.is_available():
        comfy.cli_args.args.cpu = True  # what `main.py --cpu` sets; model_management reads it at import
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.model_sampling
    import comfy.sd
    import comfy.supported_models
except ImportError as e:  # e.g. torchvision missing
    pytest.skip(f"ComfyUI at {SRC} does not import here: {e}", allow_module_level=True)

PACK = "surgun_pack_inprocess"
CONTEXT, POOLED = 64, 32  # text-conditioning widths of the tiny models (the toy CLIP's hidden size is 64)
# Tiny unet_configs: the keys comfy/model_detection.py would detect for each family, widths and depths cut
# down. The SD1.5 context is 64 like the toy CLIP.
_UNET = dict(in_channels=4, out_channels=4, model_channels=32, num_res_blocks=[1, 1], channel_mult=[1, 2],
             context_dim=CONTEXT, use_temporal_attention=False, use_spatial_transformer=True, legacy=False,
             image_size=8, use_checkpoint=False, use_temporal_resblock=False)  # fmt: skip
TINY = {
    "SD15": (comfy.supported_models.SD15, dict(_UNET, transformer_depth=[1, 1], transformer_depth_output=[1, 1, 1, 1],
                                               transformer_depth_middle=1, use_linear_in_transformer=False,
                                               adm_in_channels=None)),
    # SDXL: no attention at the first level, linear proj_in, pooled text + 6 size embeddings of 256 in `y`
    "SDXL": (comfy.supported_models.SDXL, dict(_UNET, transformer_depth=[0, 1], transformer_depth_output=[0, 0, 1, 1],
                                               transformer_depth_middle=1, use_linear_in_transformer=True,
                                               num_classes="sequential", adm_in_channels=POOLED + 6 * 256)),
    # SD3 MMDiT: hidden size = 64 * depth, heads = depth
    "SD3": (comfy.supported_models.SD3, dict(in_channels=16, out_channels=16, patch_size=2, depth=2, input_size=None,
                                             adm_in_channels=POOLED, pos_embed_max_size=8, num_patches=64,
                                             context_embedder_config={"target": "torch.nn.Linear", "params": {
                                                 "in_features": CONTEXT, "out_features": 128}},
                                             pos_embed_scaling_factor=None, x_block_self_attn_layers=[])),
    # Flux-dev: guidance embedding; axes_dim sums to the head size (64 / 2 heads)
    "Flux": (comfy.supported_models.Flux, dict(image_model="flux", in_channels=16, out_channels=16, patch_size=2,
                                               vec_in_dim=POOLED, context_in_dim=CONTEXT, hidden_size=64,
                                               mlp_ratio=2.0, num_heads=2, depth=1, depth_single_blocks=1,
                                               axes_dim=[8, 12, 12], theta=10000, qkv_bias=True, guidance_embed=True,
                                               txt_ids_dims=[])),
}  # fmt: skip


@functools.cache
def _pack_module():
    os.environ["SURGUN_CACHE"] = ""
    spec = importlib.util.spec_from_file_location(PACK, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[PACK] = mod
    spec.loader.exec_module(mod)
    assert mod.IN_COMFYUI
    return mod


def load_pack():
    """The pack as ComfyUI imports it (a package under a name of ComfyUI's choosing); returns sub -> module."""
    _pack_module()
    return lambda sub: importlib.import_module(f"{PACK}.{sub}")


def tiny_model(family: str) -> comfy.model_patcher.ModelPatcher:
    """Built and filled under inference mode, as Load Checkpoint does: its weights are inference tensors."""
    config_cls, unet_config = TINY[family]
    with torch.inference_mode():
        base = config_cls(unet_config).get_model({})
        g = torch.Generator().manual_seed(0)
        sd = {k: torch.randn(v.shape, generator=g) * 0.05 for k, v in base.diffusion_model.state_dict().items()}
        base.diffusion_model.load_state_dict(sd)
    return comfy.model_patcher.ModelPatcher(base, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())  # fmt: skip


class StandInClip:
    """A stand-in for a comfy.sd.CLIP, for tests only: the two calls ComfyBackend makes (tokenize,
    encode_from_tokens_scheduled), giving seeded tensors of the family's conditioning shapes.

    Why not a real encoder: ComfyUI's SDXL (CLIP-L + CLIP-G), SD3 (+ T5-XXL) and Flux (CLIP-L + T5-XXL) text
    encoders are built from full-size configs, and no weights of those encoders can be downloaded here. The
    backend only needs what they return: cond (1, tokens, context), pooled_output (1, pooled), and for Flux
    the `guidance` option FluxGuidance adds. Same prompt, same tensors; different prompts, different ones.
    """

    def __init__(self, tokens: int = 8, **options) -> None:
        self.tokens, self.options = tokens, options

    def tokenize(self, text: str) -> dict:
        return {"text": text}

    def encode_from_tokens_scheduled(self, tokens: dict) -> list:
        g = torch.Generator().manual_seed(zlib.crc32(tokens["text"].encode()))
        cond = torch.randn(1, self.tokens, CONTEXT, generator=g)
        pooled = torch.randn(1, POOLED, generator=g)
        return [[cond, {"pooled_output": pooled, **self.options}]]


def stand_in_clip(family: str) -> StandInClip:
    return StandInClip(guidance=3.5) if family == "Flux" else StandInClip()
