"""Configs of the toy world's text encoder and pixel-space UNet, and their diffusers-folder layout.

The toy model is a Stable Diffusion 1.x-shaped model in miniature: a CLIPTextModel, a UNet2DConditionModel
with SD block types (CrossAttnDownBlock2D, UNetMidBlock2DCrossAttn, CrossAttnUpBlock2D) and a DDPM/DDIM
scheduler. It works in pixel space (no VAE), which the diffusers backend supports for any model folder
that has no vae/ subfolder.
"""

from __future__ import annotations

import json
from pathlib import Path

from diffusers import DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from .paths import ARCHITECTURE
from .tokenizer import MAX_LENGTH, build_tokenizer_files
from .world import IMAGE_SIZE, vocabulary

TEXT_DIM = 64

UNET_CONFIG = dict(
    sample_size=IMAGE_SIZE,
    in_channels=3,
    out_channels=3,
    # No attention at 16x16 (it costs 3x the step time on CPU); cross-attention at 8x8, 4x4 and the middle.
    block_out_channels=(32, 64, 96),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    layers_per_block=1,
    cross_attention_dim=TEXT_DIM,
    attention_head_dim=8,
    norm_num_groups=8,
)

SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_schedule="squaredcos_cap_v2",
    prediction_type="epsilon",
    clip_sample=True,
    set_alpha_to_one=False,
    steps_offset=1,
)


def text_config(vocab_size: int, eos_token_id: int, bos_token_id: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TEXT_DIM,
        intermediate_size=4 * TEXT_DIM,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH,
        projection_dim=TEXT_DIM,
        eos_token_id=eos_token_id,
        bos_token_id=bos_token_id,
        pad_token_id=eos_token_id,
    )


def build_untrained(out_dir: Path) -> tuple[CLIPTokenizer, CLIPTextModel, UNet2DConditionModel, DDIMScheduler]:
    """Fresh tokenizer files in out_dir/tokenizer and randomly initialised text encoder and UNet."""
    build_tokenizer_files(vocabulary(), out_dir / "tokenizer")
    tok = CLIPTokenizer.from_pretrained(str(out_dir / "tokenizer"))
    text = CLIPTextModel(text_config(len(tok), tok.eos_token_id, tok.bos_token_id))
    unet = UNet2DConditionModel(**UNET_CONFIG)
    sched = DDIMScheduler(**SCHEDULER_CONFIG)
    return tok, text, unet, sched


def save_model_folder(out_dir: Path, text: CLIPTextModel, unet: UNet2DConditionModel, sched) -> None:
    """Write the diffusers folder layout (the tokenizer is already in out_dir/tokenizer)."""
    text.save_pretrained(str(out_dir / "text_encoder"), safe_serialization=True)
    unet.save_pretrained(str(out_dir / "unet"), safe_serialization=True)
    sched.save_pretrained(str(out_dir / "scheduler"))
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_surgun_note": "SurgUn toy world: pixel space, no VAE",
        "_surgun_architecture": ARCHITECTURE,
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "scheduler": ["diffusers", "DDIMScheduler"],
    }
    (out_dir / "model_index.json").write_text(json.dumps(index, indent=2))
