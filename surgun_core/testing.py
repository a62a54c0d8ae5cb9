"""Tiny, randomly initialised SD1-, SDXL- and SANA-shaped models built from configs, for tests.

Nothing is downloaded: tokenizers are word-level CLIPTokenizers written by the toy world's builder, every
network is built from a config under a fixed seed, so the same call gives the same weights every time.
Latents are 4 x 8 x 8; SD1/SDXL decode through a 2-level AutoencoderKL to 16 x 16 pixels, SANA through a
2-level AutoencoderDC (or works in pixel space with `vae=False`). Each denoiser has 17k-100k parameters.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from .backends.diffusers import DiffusersBackend, save_diffusers_folder
from .backends.text import ClipText, SanaText, SdxlText
from .toyworld.tokenizer import build_tokenizer_files

WORDS = ["a", "photo", "of", "the", "cat", "dog", "car", "tree", "painting", "in", "style", "red", "blue"]
LATENT = 8  # latent side; images are 2x that with a VAE
KINDS = ("sd1", "sdxl", "sana")


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed a fork of the global RNG, so building a model never disturbs the caller's random stream."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _tokenizer(max_length: int = 16):
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        build_tokenizer_files(WORDS, Path(tmp))
        return CLIPTokenizer.from_pretrained(tmp, model_max_length=max_length)


def _clip(tok, hidden: int, projection: int | None = None):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=tok.model_max_length,
        projection_dim=projection or hidden,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return CLIPTextModelWithProjection(cfg) if projection else CLIPTextModel(cfg)


def _scheduler_config(cls_name: str, **kw) -> dict:
    import diffusers

    sched = getattr(diffusers, cls_name)(**kw)
    return {"_class_name": cls_name, **{k: v for k, v in sched.config.items() if not k.startswith("_")}}


def _vae_kl(scaling_factor: float):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=8,
        layers_per_block=1,
        sample_size=2 * LATENT,
        scaling_factor=scaling_factor,
    )


def tiny_sd1_backend(prediction_type: str = "epsilon", seed: int = 0) -> DiffusersBackend:
    """SD1.x shape: CLIPTextModel (32), UNet with CrossAttnDownBlock2D..., DDIM scheduler (eps or v)."""
    from diffusers import UNet2DConditionModel

    tok = _tokenizer()
    with _seeded(seed):
        text = _clip(tok, 32)
        unet = UNet2DConditionModel(
            sample_size=LATENT,
            in_channels=4,
            out_channels=4,
            block_out_channels=(8, 16),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            mid_block_type="UNetMidBlock2DCrossAttn",
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            layers_per_block=1,
            cross_attention_dim=32,
            attention_head_dim=2,  # diffusers quirk: for UNets this is the number of heads
            norm_num_groups=4,
        )
        vae = _vae_kl(0.18215)
    sched = _scheduler_config(
        "DDIMScheduler",
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type=prediction_type,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return DiffusersBackend(unet, ClipText(tok, text), sched, vae=vae)


def tiny_sdxl_backend(seed: int = 0) -> DiffusersBackend:
    """SDXL shape: two CLIP encoders (24 + 32 -> cross-attention 56), text_time added conditioning."""
    from diffusers import UNet2DConditionModel

    tok, tok_2 = _tokenizer(), _tokenizer()
    pooled, time_dim = 16, 8
    with _seeded(seed):
        text, text_2 = _clip(tok, 24), _clip(tok_2, 32, projection=pooled)
        unet = UNet2DConditionModel(
            sample_size=LATENT,
            in_channels=4,
            out_channels=4,
            block_out_channels=(8, 16),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            layers_per_block=1,
            transformer_layers_per_block=(1, 2),
            cross_attention_dim=24 + 32,
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=time_dim,
            projection_class_embeddings_input_dim=pooled + 6 * time_dim,
            norm_num_groups=4,
        )
        vae = _vae_kl(0.13025)
    sched = _scheduler_config(
        "EulerDiscreteScheduler",
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type="epsilon",
        timestep_spacing="leading",
        steps_offset=1,
    )
    return DiffusersBackend(unet, SdxlText(tok, text, tok_2, text_2), sched, vae=vae)


def tiny_sana_backend(seed: int = 0, vae: bool = True) -> DiffusersBackend:
    """SANA shape: Gemma2Model text encoder (32), SanaTransformer2DModel (2 blocks), flow matching, DC-AE."""
    from diffusers import AutoencoderDC, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    tok = _tokenizer()
    channels = 4 if vae else 3
    with _seeded(seed):
        text = Gemma2Model(
            Gemma2Config(
                vocab_size=len(tok),
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                num_key_value_heads=1,
                head_dim=16,
                max_position_embeddings=64,
                pad_token_id=tok.pad_token_id,
                bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id,
            )
        )
        transformer = SanaTransformer2DModel(
            in_channels=channels,
            out_channels=channels,
            num_attention_heads=2,
            attention_head_dim=8,
            num_layers=2,
            num_cross_attention_heads=2,
            cross_attention_head_dim=8,
            cross_attention_dim=16,
            caption_channels=32,
            sample_size=LATENT if vae else 2 * LATENT,
        )
        dc = None
        if vae:
            dc = AutoencoderDC(
                latent_channels=4,
                attention_head_dim=4,
                encoder_block_out_channels=(8, 16),
                decoder_block_out_channels=(8, 16),
                encoder_layers_per_block=(1, 1),
                decoder_layers_per_block=(1, 1),
                encoder_qkv_multiscales=((), ()),
                decoder_qkv_multiscales=((), ()),
                scaling_factor=0.41407,
            )
    sched = _scheduler_config("FlowMatchEulerDiscreteScheduler", shift=3.0)
    return DiffusersBackend(transformer, SanaText(tok, text), sched, vae=dc)


def tiny_backend(kind: str, **kwargs) -> DiffusersBackend:
    """tiny_<kind>_backend(**kwargs) for kind in KINDS."""
    builders = {"sd1": tiny_sd1_backend, "sdxl": tiny_sdxl_backend, "sana": tiny_sana_backend}
    if kind not in builders:
        raise ValueError(f"unknown tiny backend {kind!r}; choose one of {', '.join(KINDS)}")
    return builders[kind](**kwargs)


def save_tiny_folder(backend_kind: str, path: str | Path, **kwargs) -> Path:
    """Write the tiny `backend_kind` model as a diffusers folder (load_diffusers_folder reads it back)."""
    return save_diffusers_folder(tiny_backend(backend_kind, **kwargs), path)
