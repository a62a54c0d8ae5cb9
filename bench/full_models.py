"""Full-size random-weight SD1.5 and SDXL backends, whole: UNet, text encoder(s) and VAE, as a model folder loads.

The UNet configs are bench/memory.py's (as runwayml/stable-diffusion-v1-5 and stabilityai/stable-diffusion-xl-
base-1.0); the text encoders are CLIP ViT-L/14 (SD1.5, and SDXL's first) and OpenCLIP bigG/14 with its projection
(SDXL's second) at their real sizes; the VAE is SD's AutoencoderKL. Weights are random and nothing is
downloaded: the tokenizer is the toy world's word-level CLIPTokenizer (real prompts map to a few known words
and <unk>, which changes no shape or cost). Every module is built directly in the target dtype on the target
device, so a 2.6B-parameter SDXL never exists in float32 first.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from memory import SCHEDULER, SD15, SDXL  # bench/memory.py, beside this file

from surgun_core.backends.diffusers import DiffusersBackend
from surgun_core.backends.text import ClipText, SdxlText
from surgun_core.toyworld.tokenizer import build_tokenizer_files

TOKENS = 77
VOCAB = 49408  # CLIP's BPE vocabulary: the embedding tables have their real size
WORDS = ["a", "photo", "of", "the", "cat", "dog", "car", "tree", "painting", "in", "style", "red", "blue"]
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              projection_dim=768, hidden_act="quick_gelu")  # fmt: skip
CLIP_BIGG = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                 projection_dim=1280, hidden_act="gelu")  # fmt: skip
VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
           up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
           latent_channels=4)  # fmt: skip
MODELS = {"sd15": (SD15, 0.18215), "sdxl": (SDXL, 0.13025)}  # UNet config, VAE scaling factor


@contextlib.contextmanager
def building(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Modules made inside are created on `device` in `dtype` (no float32 copy on the CPU first)."""
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            yield
    finally:
        torch.set_default_dtype(prev)


def tokenizer():
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        build_tokenizer_files(WORDS, Path(tmp))
        return CLIPTokenizer.from_pretrained(tmp, model_max_length=TOKENS)


def clip(tok, size: dict, projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=VOCAB, max_position_embeddings=TOKENS, eos_token_id=tok.eos_token_id,
                         bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id, **size)  # fmt: skip
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def full_backend(model: str, device: str | torch.device, precision: str, seed: int = 0) -> DiffusersBackend:
    """The whole `model` ("sd15" or "sdxl") with random weights, as load_diffusers_folder would give it."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    unet_cfg, scaling = MODELS[model]
    dev = torch.device(device)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[precision]
    torch.manual_seed(seed)
    with building(dev, dtype):
        unet = UNet2DConditionModel(**unet_cfg)
        vae = AutoencoderKL(**VAE, sample_size=8 * unet_cfg["sample_size"], scaling_factor=scaling)
        if model == "sd15":
            tok = tokenizer()
            text = ClipText(tok, clip(tok, CLIP_L))
        else:
            tok, tok_2 = tokenizer(), tokenizer()
            text = SdxlText(tok, clip(tok, CLIP_L), tok_2, clip(tok_2, CLIP_BIGG, projection=True))
    return DiffusersBackend(unet, text, SCHEDULER, vae=vae, device=dev, precision=precision)
