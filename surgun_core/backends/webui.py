"""Backends over the model AUTOMATIC1111 or Forge has loaded (shared.sd_model), DESIGN.md section 6.

Imports nothing of either: the tab passes shared.sd_model in. Both denoisers use the ComfyUI/ldm module
names (input_blocks.4.1.transformer_blocks.0.attn2.to_k, ...), so the kohya keys written are the ones
ComfyUI, A1111's Lora extension and Forge all load, exactly as from the ComfyUI backend.

- A1111: ldm's LatentDiffusion (SD1.x, SD2.x) or sgm's DiffusionEngine (SDXL). apply_model(x_t, t, cond)
  takes the DDPM timestep and returns the raw eps/v output, so the engine's DiffusionObjective over
  sd_model.alphas_cumprod applies unchanged.
- Forge: forge_objects.unet is a ComfyUI-style patcher whose KModel.apply_model(x, sigma, c_crossattn, y)
  takes k-diffusion inputs (x0 + sigma * eps) and returns the denoised x0, like ComfyUI's BaseModel. The
  backend keeps the DDPM view (alphas_cumprod = 1 / (1 + sigma^2)) and converts per call, so sampling,
  the loss and the judge are the engine's own, as for A1111.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from ..errors import SurgUnError
from ..objectives import DiffusionObjective, _bcast
from .base import Backend, Cond

ARCH = {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2", "sdxl": "stable-diffusion-xl-v1-base"}
SIZES = {"sd1": 512, "sd2": 768, "sdxl": 1024}


def webui_family(sd_model) -> str:
    if getattr(sd_model, "is_sdxl", False) or hasattr(sd_model, "conditioner"):
        return "sdxl"
    return "sd2" if getattr(sd_model, "is_sd2", False) else "sd1"


def _plain(x):
    """A normal tensor (or dict of them) from what the host may have made under torch.inference_mode()."""
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    with torch.inference_mode(False):
        return x.clone() if isinstance(x, torch.Tensor) else x


class _WebuiBackend(Backend):
    """What A1111 and Forge share: prompts through sd_model.get_learned_conditioning, images through
    decode_first_stage, training outside inference mode with the base weights frozen."""

    def __init__(self, sd_model, denoiser: nn.Module, image_size: int | None, latent_ratio: int) -> None:
        self.sd = sd_model
        self.family = webui_family(sd_model)
        self.architecture = ARCH[self.family]
        self.denoiser = denoiser
        p = next(denoiser.parameters())
        self.device, self.weight_dtype = p.device, p.dtype
        self.dtype = torch.float32  # inputs; the model casts to its own dtype
        self.image_size = image_size or SIZES[self.family]
        channels = getattr(denoiser, "in_channels", None) or getattr(
            getattr(denoiser, "config", None), "in_channels", 4
        )
        self._latent_shape = (channels, self.image_size // latent_ratio, self.image_size // latent_ratio)
        self.pixel_space = latent_ratio == 1

    def latent_shape(self) -> tuple[int, int, int]:
        return self._latent_shape

    def encode(self, prompts: list[str]) -> Cond:
        c = _plain(self.sd.get_learned_conditioning(list(prompts)))
        if isinstance(c, dict):  # SDXL: {"crossattn": (B, 77, 2048), "vector": (B, 2816)}
            return {"c_crossattn": c["crossattn"].to(self.device), "y": c["vector"].to(self.device)}
        return {"c_crossattn": c.to(self.device)}

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            x = _plain(self.sd.decode_first_stage(latents.to(self.device)))
        return ((x.float() + 1) / 2).clamp(0, 1)

    @contextlib.contextmanager
    def training(self) -> Iterator[None]:
        """Leave the host's inference mode; only LoRA layers get gradients (the base stays frozen)."""
        flags = [(q, q.requires_grad) for q in self.denoiser.parameters()]
        with torch.inference_mode(False), torch.enable_grad():
            for q, _ in flags:
                q.requires_grad_(False)
            try:
                yield
            finally:
                for q, was in flags:
                    q.requires_grad_(was)


class A1111Backend(_WebuiBackend):
    """shared.sd_model of AUTOMATIC1111 (ldm LatentDiffusion or sgm DiffusionEngine)."""

    def __init__(self, sd_model, image_size: int | None = None, latent_ratio: int = 8) -> None:
        if not hasattr(sd_model, "apply_model") or not hasattr(sd_model, "alphas_cumprod"):
            raise SurgUnError("this A1111 model has no apply_model/alphas_cumprod; SurgUn supports SD1.x, SD2.x "
                              "and SDXL checkpoints")  # fmt: skip
        super().__init__(sd_model, sd_model.model.diffusion_model, image_size, latent_ratio)
        pred = "v_prediction" if getattr(sd_model, "parameterization", "eps") == "v" else "epsilon"
        self.objective = DiffusionObjective(sd_model.alphas_cumprod.detach().float().cpu(), pred)

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        t = t.to(x_t.device).expand(x_t.shape[0])
        if "y" in cond:  # sgm's wrapper reads crossattn / vector
            out = self.sd.apply_model(x_t, t, {"crossattn": cond["c_crossattn"], "vector": cond["y"]})
        else:
            out = self.sd.apply_model(x_t, t, cond["c_crossattn"])
        return out.float()


class ForgeBackend(_WebuiBackend):
    """shared.sd_model of Forge: its forge_objects.unet patcher (a ComfyUI-style KModel inside)."""

    def __init__(self, sd_model, image_size: int | None = None, latent_ratio: int = 8) -> None:
        unet = getattr(getattr(sd_model, "forge_objects", None), "unet", None)
        if unet is None:
            raise SurgUnError("this Forge model has no forge_objects.unet; load an SD1.x, SD2.x or SDXL checkpoint")
        self.patcher, self.kmodel = unet, unet.model
        super().__init__(sd_model, self.kmodel.diffusion_model, image_size, latent_ratio)
        predictor = self.kmodel.predictor
        if any(w in type(predictor).__name__.lower() for w in ("flow", "flux")):
            raise SurgUnError("Forge flow models (Flux, SD3) are not supported in the tab yet; use the ComfyUI nodes")
        self.sigmas = predictor.sigmas.detach().float().cpu()
        self.v = getattr(predictor, "prediction_type", "epsilon") == "v_prediction"
        alphas = 1 / (1 + self.sigmas**2)
        self.objective = DiffusionObjective(alphas, "v_prediction" if self.v else "epsilon")

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        t = t.to("cpu").long().expand(x_t.shape[0])
        a = _bcast(self.objective.alphas_cumprod[t], x_t)
        sigma = self.sigmas[t].to(x_t.device)
        x_k = x_t / a.sqrt()  # k-diffusion scaling: x0 + sigma * eps
        kw = {"y": cond["y"]} if "y" in cond else {}
        x0 = self.kmodel.apply_model(x_k, sigma, c_crossattn=cond["c_crossattn"], **kw).float()
        eps = (x_k.float() - x0) / _bcast(sigma, x_t)
        return a.sqrt() * eps - (1 - a).sqrt() * x0 if self.v else eps


def webui_backend(sd_model, **kwargs) -> Backend:
    """The backend for whichever host loaded sd_model: Forge when it has forge_objects, else A1111."""
    if hasattr(sd_model, "forge_objects"):
        return ForgeBackend(sd_model, **kwargs)
    return A1111Backend(sd_model, **kwargs)
