"""The diffusers backend: SD1.x (and the toy world, in pixel space), SDXL, and SANA model folders.

Families differ in how text is encoded and what extra conditioning the denoiser takes; those live in
backends/text.py. Everything else (noising, sampling, LoRA targets) is the shared Backend code.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn

from ..errors import ConfigError
from ..objectives import objective_from_scheduler
from .base import Backend, Cond, cond_len, resolve_device, resolve_dtype
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
        self.denoiser = _place(denoiser, self.device, self.dtype).requires_grad_(False).eval()
        self.text = _place(text, self.device, self.dtype)
        self.vae = None
        if vae is not None:
            # VAEs marked force_upcast (SDXL's) overflow in float16: keep them in float32 as the pipelines do.
            upcast = self.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
            self.vae = _place(vae, self.device, torch.float32 if upcast else self.dtype).requires_grad_(False).eval()
        self.pixel_space = vae is None
        self.scheduler_config = dict(scheduler_config)
        self.objective = objective_from_scheduler(self.scheduler_config)
        self.family = family_of(denoiser)
        self.architecture = architecture or ARCHITECTURES[self.family]
        self.lora_prefix = "lora_transformer" if self.family == "sana" else "lora_unet"
        _check_text(self.family, denoiser.config, text)

    # ---- Backend ----------------------------------------------------------------------------------------

    def encode(self, prompts: list[str]) -> Cond:
        with torch.no_grad():
            cond = self.text.encode(list(prompts), self.device)
        return self._added_cond(cond, len(prompts))

    def encode_with_tokens(self, prompts: list[str], tokens: dict[str, torch.Tensor]) -> Cond:
        cond = self.text.encode_with_tokens(list(prompts), {k: v.to(self.device) for k, v in tokens.items()},
                                            self.device)  # fmt: skip
        return self._added_cond(cond, len(prompts))

    def word_embedding(self, word: str) -> torch.Tensor:
        return self.text.word_embedding(word)

    def _added_cond(self, cond: Cond, n: int) -> Cond:
        """The family's extra conditioning (SDXL's size ids), all floats in the model's dtype."""
        if self.family == "sdxl":
            size = self.image_size()
            ids = torch.tensor([size, size, 0, 0, size, size], dtype=self.dtype, device=self.device)
            cond["time_ids"] = ids.expand(n, 6).clone()
        return {k: v.to(self.dtype) if v.is_floating_point() else v for k, v in cond.items()}

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        x_t = x_t.to(self.dtype)
        if cond_len(cond) != x_t.shape[0]:  # SANA would silently fold extra text tokens into the batch
            raise ValueError(f"conditioning for {cond_len(cond)} samples but x_t holds {x_t.shape[0]}")
        t = t.to(self.device).expand(x_t.shape[0])  # (B,)
        if self.family == "sana":
            # SanaPipeline feeds sigma * num_train_timesteps * timestep_scale in float32 (bfloat16 would round
            # 999 to 1000 and lose the low timesteps' detail).
            out = self.denoiser(
                x_t,
                encoder_hidden_states=cond["encoder_hidden_states"],
                encoder_attention_mask=cond.get("encoder_attention_mask"),
                timestep=t.float() * float(self.denoiser.config.timestep_scale),
                return_dict=False,
            )[0]
        else:
            added = None
            if self.family == "sdxl":
                added = {"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}
            out = self.denoiser(
                x_t, t, encoder_hidden_states=cond["encoder_hidden_states"], added_cond_kwargs=added, return_dict=False
            )[0]
        if out.shape[1] == 2 * x_t.shape[1]:  # learned-sigma models: the variance half is not ours to train
            out = out[:, : x_t.shape[1]]
        return out

    def latent_shape(self) -> tuple[int, int, int]:
        cfg = self.denoiser.config
        size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
        return (cfg.in_channels, size, size)

    def image_size(self) -> int:
        return self.latent_shape()[1] * self.vae_scale_factor()

    def vae_scale_factor(self) -> int:
        """Pixels per latent cell: AutoencoderDC says it (32 for SANA); AutoencoderKL has 2 per level past one."""
        if self.vae is None:
            return 1
        ratio = getattr(self.vae, "spatial_compression_ratio", None)
        return int(ratio) if ratio else 2 ** (len(self.vae.config.block_out_channels) - 1)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            return super().decode(latents)
        cfg = self.vae.config
        shift = getattr(cfg, "shift_factor", None) or 0.0  # AutoencoderDC has no shift_factor
        z = latents.to(self.device, next(self.vae.parameters()).dtype) / cfg.scaling_factor + shift
        with torch.no_grad():
            img = self.vae.decode(z, return_dict=False)[0]
        return ((img.float() + 1) / 2).clamp(0, 1)


def _place(module: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Move to device; cast only when the dtype differs (diffusers warns on any cast)."""
    module = module.to(device)
    if any(p.dtype != dtype for p in module.parameters()):
        module = module.to(dtype)
    return module


def _check_text(family: str, cfg, text: TextEncoderAdapter) -> None:
    """Refuse a text side that cannot condition this denoiser, before the first forward fails obscurely."""
    if text.family and text.family != family:
        raise ConfigError(
            "model", f"a {family} denoiser needs the {family} text encoders, got {type(text).__name__} ({text.family})"
        )
    if family == "sdxl" and hasattr(text, "pooled_dim"):
        # SDXL's added conditioning: pooled text embedding + 6 time ids, each embedded in addition_time_embed_dim.
        want = text.pooled_dim + 6 * cfg.addition_time_embed_dim
        if cfg.projection_class_embeddings_input_dim != want:
            raise ConfigError(
                "model",
                f"UNet projection_class_embeddings_input_dim is {cfg.projection_class_embeddings_input_dim} but "
                f"text_encoder_2 projection ({text.pooled_dim}) + 6 x addition_time_embed_dim "
                f"({cfg.addition_time_embed_dim}) = {want}; the UNet and text encoders are from different models",
            )


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
    """Load a diffusers model folder (model_index.json, unet/ or transformer/, text encoder(s), scheduler/).

    A missing path, an incomplete folder or unreadable (truncated) weights are one ConfigError("model", ...)
    naming the part, and a device this machine lacks is refused before the weights are read.
    """
    path = Path(path)
    if not path.exists():
        raise ConfigError("model", f"{path} does not exist; give a diffusers model folder (the one with "
                          "model_index.json)")  # fmt: skip
    if not (path / "model_index.json").is_file():
        raise ConfigError(
            "model", f"{path} is not a diffusers model folder (no model_index.json); give the folder that holds it"
        )
    if not (path / "scheduler" / "scheduler_config.json").is_file():
        raise ConfigError("model", f"{path} has no scheduler/scheduler_config.json: the model folder is incomplete; "
                          "copy or download it again, whole")  # fmt: skip
    resolve_device(device)
    with _reading(path, "model_index.json"):
        index = json.loads((path / "model_index.json").read_text())
    if (path / "unet").is_dir():
        from diffusers import UNet2DConditionModel

        with _reading(path, "unet"):
            denoiser = UNet2DConditionModel.from_pretrained(str(path), subfolder="unet")
    elif (path / "transformer").is_dir():
        from diffusers import SanaTransformer2DModel

        with _reading(path, "transformer"):
            denoiser = SanaTransformer2DModel.from_pretrained(str(path), subfolder="transformer")
    else:
        raise ConfigError("model", f"{path} has neither unet/ nor transformer/; it is not a supported model folder")
    vae = None
    if (path / "vae").is_dir():
        from diffusers import AutoencoderDC, AutoencoderKL

        with _reading(path, "vae"):
            vae_cfg = json.loads((path / "vae" / "config.json").read_text())
            vae_cls = AutoencoderDC if vae_cfg.get("_class_name") == "AutoencoderDC" else AutoencoderKL
            vae = vae_cls.from_pretrained(str(path), subfolder="vae")
    with _reading(path, "scheduler"):
        sched = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    with _reading(path, "text encoder"):
        text = load_text_adapter(path, family_of(denoiser))
    arch = index.get("_surgun_architecture")
    return DiffusersBackend(denoiser, text, sched, vae=vae, architecture=arch, device=device, precision=precision)


@contextlib.contextmanager
def _reading(path: Path, part: str) -> Iterator[None]:
    """A part of the folder that cannot be read (truncated weights, broken JSON): one line naming it."""
    try:
        yield
    except ConfigError:
        raise
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError("model", f"{path}: the {part} cannot be read ({first}); the model folder may be "
                          "truncated or incomplete: copy or download it again") from e  # fmt: skip


PIPELINES = {"sd1": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline", "sana": "SanaPipeline"}


def save_diffusers_folder(backend: DiffusersBackend, path: str | Path) -> Path:
    """Write `backend` as a diffusers model folder that load_diffusers_folder reads back unchanged."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    sub = "transformer" if backend.family == "sana" else "unet"
    backend.denoiser.save_pretrained(str(path / sub), safe_serialization=True)
    index = {"_class_name": PIPELINES[backend.family], sub: ["diffusers", type(backend.denoiser).__name__]}
    index.update(backend.text.save_pretrained(path))
    if backend.vae is not None:
        backend.vae.save_pretrained(str(path / "vae"), safe_serialization=True)
        index["vae"] = ["diffusers", type(backend.vae).__name__]
    sched = dict(backend.scheduler_config)
    index["scheduler"] = ["diffusers", sched.get("_class_name", "DDPMScheduler")]
    (path / "scheduler").mkdir(exist_ok=True)
    (path / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched, indent=2))
    if backend.family == "sdxl":
        index["force_zeros_for_empty_prompt"] = bool(getattr(backend.text, "zero_empty_prompt", True))
    if backend.architecture != ARCHITECTURES[backend.family]:
        index["_surgun_architecture"] = backend.architecture
    (path / "model_index.json").write_text(json.dumps(index, indent=2))
    return path
