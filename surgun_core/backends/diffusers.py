"""The diffusers backend: SD1.x (and the toy world, in pixel space), SDXL, and SANA model folders.

Families differ in how text is encoded and what extra conditioning the denoiser takes; those live in
backends/text.py. Everything else (noising, sampling, LoRA targets) is the shared Backend code.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError
from ..objectives import objective_from_scheduler
from .base import Backend, Cond, resolve_device, resolve_dtype
from .text import TextEncoderAdapter, load_text_adapter

log = logging.getLogger(__name__)


class DiffusersBackend(Backend):
    """One diffusers model: a UNet2DConditionModel or SanaTransformer2DModel, its text side, optional VAE."""

    def __init__(
        self,
        denoiser: nn.Module,
        text: TextEncoderAdapter,
        scheduler_config: dict,
        vae: nn.Module | None = None,
        architecture: str | None = None,
        device: str | torch.device = "cpu",
        precision: str = "float32",
    ) -> None:
        self.device = resolve_device(device) if isinstance(device, str) else device
        self.dtype = resolve_dtype(precision, self.device)
        self.denoiser = denoiser.to(self.device, self.dtype).requires_grad_(False).eval()
        self.text = text.to(self.device, self.dtype)
        self.vae = vae.to(self.device, self.dtype).requires_grad_(False).eval() if vae is not None else None
        self.pixel_space = vae is None
        self.scheduler_config = dict(scheduler_config)
        self.objective = objective_from_scheduler(self.scheduler_config)
        self.family = family_of(denoiser)
        self.architecture = architecture or ARCHITECTURES[self.family]
        self.lora_prefix = "lora_transformer" if self.family == "sana" else "lora_unet"

    # ---- Backend ----------------------------------------------------------------------------------------

    def encode(self, prompts: list[str]) -> Cond:
        with torch.no_grad():
            cond = self.text.encode(list(prompts), self.device)
        if self.family == "sdxl":
            size = self.image_size()
            ids = torch.tensor([size, size, 0, 0, size, size], dtype=self.dtype, device=self.device)
            cond["time_ids"] = ids.expand(len(prompts), 6).clone()
        return {k: v.to(self.dtype) if v.is_floating_point() else v for k, v in cond.items()}

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        x_t = x_t.to(self.dtype)
        if self.family == "sana":
            out = self.denoiser(
                x_t,
                encoder_hidden_states=cond["encoder_hidden_states"],
                encoder_attention_mask=cond.get("encoder_attention_mask"),
                timestep=t.to(self.dtype),
                return_dict=False,
            )[0]
            return out
        added = None
        if self.family == "sdxl":
            added = {"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}
        return self.denoiser(
            x_t, t, encoder_hidden_states=cond["encoder_hidden_states"], added_cond_kwargs=added, return_dict=False
        )[0]

    def latent_shape(self) -> tuple[int, int, int]:
        cfg = self.denoiser.config
        size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
        return (cfg.in_channels, size, size)

    def image_size(self) -> int:
        factor = 1 if self.vae is None else 2 ** (len(self.vae.config.block_out_channels) - 1)
        return self.latent_shape()[1] * factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            return super().decode(latents)
        cfg = self.vae.config
        z = latents.to(self.dtype) / cfg.scaling_factor + (getattr(cfg, "shift_factor", None) or 0.0)
        with torch.no_grad():
            img = self.vae.decode(z, return_dict=False)[0]
        return ((img.float() + 1) / 2).clamp(0, 1)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return []


ARCHITECTURES = {
    "sd1": "stable-diffusion-v1",
    "sdxl": "stable-diffusion-xl-v1-base",
    "sana": "sana",
}


def family_of(denoiser: nn.Module) -> str:
    name = type(denoiser).__name__
    if name == "SanaTransformer2DModel":
        return "sana"
    if name == "UNet2DConditionModel":
        return "sdxl" if getattr(denoiser.config, "addition_embed_type", None) == "text_time" else "sd1"
    raise ConfigError("model", f"unsupported denoiser {name}; SurgUn supports UNet2DConditionModel and SANA")


def load_diffusers_folder(path: str | Path, device: str = "auto", precision: str = "float32") -> DiffusersBackend:
    """Load a diffusers model folder (model_index.json, unet/ or transformer/, text encoder(s), scheduler/)."""
    path = Path(path)
    if not (path / "model_index.json").is_file():
        raise ConfigError(
            "model", f"{path} is not a diffusers model folder (no model_index.json); give the folder that holds it"
        )
    index = json.loads((path / "model_index.json").read_text())
    if (path / "unet").is_dir():
        from diffusers import UNet2DConditionModel

        denoiser = UNet2DConditionModel.from_pretrained(str(path), subfolder="unet")
    elif (path / "transformer").is_dir():
        from diffusers import SanaTransformer2DModel

        denoiser = SanaTransformer2DModel.from_pretrained(str(path), subfolder="transformer")
    else:
        raise ConfigError("model", f"{path} has neither unet/ nor transformer/; it is not a supported model folder")
    vae = None
    if (path / "vae").is_dir():
        from diffusers import AutoencoderDC, AutoencoderKL

        vae_cls = AutoencoderDC if "AutoencoderDC" in json.dumps(index.get("vae", "")) else AutoencoderKL
        vae = vae_cls.from_pretrained(str(path), subfolder="vae")
    sched = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    text = load_text_adapter(path, family_of(denoiser))
    arch = index.get("_surgun_architecture")
    return DiffusersBackend(denoiser, text, sched, vae=vae, architecture=arch, device=device, precision=precision)
