"""The ComfyUI backend: a Backend over a ComfyUI MODEL (ModelPatcher) and CLIP (DESIGN.md sections 2 and 5).

Imported only inside ComfyUI (it imports comfy at the top); no other module of surgun_core imports it.

- Noise levels: t IS sigma, drawn from the model's own model_sampling.sigmas (uniform over the training
  timesteps for discrete models, over the shifted schedule for flow models); x_t = noise_scaling(sigma,
  eps, x0) and the x0 prediction comes from BaseModel.apply_model, so EPS, V_PREDICTION and CONST (flow)
  models share one path.
- predict() returns (x_t - x0_hat) / sigma: for EPS models that is eps_hat, for CONST (flow) models the
  velocity eps - x0, i.e. each family's own training target (for V_PREDICTION models it is eps_hat, the
  v loss up to a per-sigma weight). So Backend.loss is the model's own loss l(x0, c) of DESIGN.md s.1.
- LoRA: the core's LoRASet forward hooks on the diffusion model's attention Linear layers. comfy.ops
  layers are nn.Linear subclasses whose forward may bypass nn.Linear.forward (forward_comfy_cast_weights),
  but module hooks run around any forward, so the same adapters train plain and comfy.ops layers alike.
- Training images: ComfyUI's own sampler (comfy.sample.sample), seeded per image by the core.
- Families: SD1.5 and SDXL UNets, SD3 and Flux DiTs take the same path. LoRA targets are module paths of
  diffusion_model (input_blocks.4.1.transformer_blocks.0.attn2.to_k, double_blocks.0.img_attn.qkv,
  joint_blocks.0.x_block.attn.qkv), written as kohya keys lora_unet_<path with _>, which
  comfy.lora.model_lora_keys_unet maps for every family. What differs per family: comfy_families.py.
- Learned tokens (attacks, robust mode): ComfyUI's own embedding path in the CLIP's token lists
  (comfy_tokens.py); images from such prepared conditioning: the ddim/euler sampler in sigma space here.
- Two MODELs, one backend: `as_model(base)` runs a block on another MODEL (an erased model's base, for the
  audit's control and judge), so an erasure made of ComfyUI weight patches needs no LoRA hooks to switch off.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
from collections.abc import Callable, Iterator, Sequence

import comfy.lora
import comfy.model_management
import comfy.model_sampling
import comfy.sample
import comfy.samplers
import torch
from torch import nn

from ..errors import ConfigError, DeltaMismatchError, SurgUnError
from ..lora import LoraDelta
from ..sampling import seeded_noise
from .base import Backend, Cond, cond_cat, cond_select
from .comfy_families import ARCHITECTURES, IMAGE_SIZES, ensure_rope_backward, mutates_saved_activations, saved_copies
from .comfy_tokens import embedding_tables, tokens_with_embeddings, word_embedding

log = logging.getLogger(__name__)


class SigmaObjective:
    """Noising and targets from a ComfyUI model_sampling object; t is sigma throughout."""

    def __init__(self, model_sampling) -> None:
        self.ms = model_sampling
        self.flow = isinstance(model_sampling, comfy.model_sampling.CONST)
        self.prediction_type = "flow" if self.flow else "epsilon"
        self.sigmas = model_sampling.sigmas.detach().float().cpu()

    def sample_t(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.sigmas[torch.randint(0, len(self.sigmas), (n,), generator=generator)]

    def noisy(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.ms.noise_scaling(t.to(x0.device, torch.float32), eps, x0)

    def target(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return eps - x0 if self.flow else eps

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def t_grid(self, n: int, lo: float = 0.1, hi: float = 0.8) -> torch.Tensor:
        """n fixed sigmas at the quantiles lo..hi of the model's schedule (sigmas ascend)."""
        idx = (torch.linspace(lo, hi, n) * (len(self.sigmas) - 1)).round().long()
        return self.sigmas[idx]


class ComfyBackend(Backend):
    """A ComfyUI MODEL + CLIP. `architecture` overrides the name written into delta metadata."""

    def __init__(self, model, clip, architecture: str | None = None, image_size: int | None = None,
                 sampler_name: str = "ddim", scheduler: str = "ddim_uniform", vae=None) -> None:  # fmt: skip
        if clip is None:
            raise SurgUnError("SurgUn needs the CLIP of the model to encode prompts; connect the CLIP output too")
        self.clip = clip
        self.vae = vae  # decodes latents (attacked images, judges that look at pixels); pixel-space models need none
        self._bind(model)
        self.device = model.load_device
        self.dtype = torch.float32  # inputs; apply_model casts to the weights' dtype itself
        fmt = self.base.latent_format
        self.pixel_space = fmt.latent_channels == 3 and getattr(fmt, "scale_factor", 1.0) == 1.0
        cfg_name = type(self.base.model_config).__name__
        self.architecture = architecture or ARCHITECTURES.get(cfg_name, f"comfyui-{cfg_name.lower()}")
        self.lora_prefix = "lora_unet"  # the prefix comfy.lora.model_lora_keys_unet maps for every family
        self.sampler_name, self.scheduler = sampler_name, scheduler
        size = image_size or IMAGE_SIZES.get(cfg_name)
        if not size:
            raise SurgUnError(f"SurgUn does not know the image size of {cfg_name} models; pass image_size")
        self.image_size = size
        self._ratio = 1 if self.pixel_space else 8  # pixels per latent cell (SD, SDXL, SD3, Flux VAEs: 8)
        self._latent_shape = (fmt.latent_channels, size // self._ratio, size // self._ratio)

    def _bind(self, model) -> None:
        """Point the backend at `model` (a ModelPatcher): its weights, patches and noise schedule."""
        self.patcher, self.base = model, model.model
        self.denoiser = self.base.diffusion_model
        self.objective = SigmaObjective(model.get_model_object("model_sampling"))
        self._copy_saved = mutates_saved_activations(self.base)  # Flux: in-place residuals (comfy_families)

    # ---- Backend ----------------------------------------------------------------------------------------

    def latent_shape(self) -> tuple[int, int, int]:
        return self._latent_shape

    def encode(self, prompts: list[str]) -> Cond:
        """Per prompt: CLIP conditioning turned into the model's own inputs (c_crossattn, SDXL's y, ...)."""
        return cond_cat([self._model_cond(*self._clip_encode(p)) for p in prompts])

    def encode_with_tokens(self, prompts: list[str], tokens: dict[str, torch.Tensor]) -> Cond:
        """encode(), each placeholder standing for its (k, D) input embeddings through ComfyUI's own embedding path
        (comfy_tokens.py), gradients flowing to them."""
        self._grad_ready_clip()
        out = []
        for p in prompts:
            with saved_copies():  # ComfyUI's CLIP layers add residuals in place (comfy/clip_model.py), as Flux does
                (cond, extra), *_ = self.clip.encode_from_tokens_scheduled(tokens_with_embeddings(self.clip, p, tokens))
            out.append(self._model_cond(cond, extra))
        return cond_cat(out)

    def word_embedding(self, word: str) -> torch.Tensor:
        return word_embedding(self.clip, word)

    def _model_cond(self, cond: torch.Tensor, extra: dict) -> Cond:
        """CLIP conditioning (cond, its options) -> the model's own inputs, as ComfyUI's sampler makes them."""
        c, h, w = self._latent_shape
        kw = {"cross_attn": cond, "pooled_output": extra.get("pooled_output"), "device": self.device,
              "noise": torch.zeros(1, c, h, w), "width": self.image_size, "height": self.image_size}  # fmt: skip
        kw.update({k: v for k, v in extra.items() if k != "pooled_output"})
        conds = self.base.extra_conds(**kw)
        return {k: v.cond.to(self.device) for k, v in conds.items() if isinstance(v.cond, torch.Tensor)}

    def _grad_ready_clip(self) -> None:
        """Outside inference mode, the text encoders' weights as normal tensors, so gradients can reach learned
        tokens through them (weights loaded inside a node are inference tensors; see training())."""
        if torch.is_inference_mode_enabled():
            return
        embedding_tables(self.clip)  # refuses encoders that take no learned tokens, before any weight is copied
        self.clip.load_model()
        _normal_parameters(self.clip.cond_stage_model)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1]: through the VAE given, else (pixel-space models) the pixels themselves."""
        if self.vae is None:
            if not self.pixel_space:
                raise SurgUnError("this model draws latents: connect its VAE to decode the images")
            return super().decode(latents)
        return self.vae.decode(self.base.process_latent_out(latents.to(self.device))).float().movedim(-1, 1)

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        sigma = t.to(x_t.device, torch.float32).expand(x_t.shape[0])  # (B,)
        kw = {k: v for k, v in cond.items() if k != "c_crossattn"}
        opts = self.patcher.model_options.get("transformer_options", {})
        with saved_copies(self._copy_saved):
            x0_hat = self.base.apply_model(x_t, sigma, c_crossattn=cond.get("c_crossattn"), transformer_options=opts,
                                           **kw)  # fmt: skip
        return (x_t.float() - x0_hat.float()) / sigma.view(-1, *([1] * (x_t.dim() - 1)))

    def sampler_id(self) -> str:
        return f"comfy-{self.sampler_name}-{self.scheduler}"

    @torch.no_grad()
    def sample(self, prompts, seeds: Sequence[int], steps: int = 20, guidance: float | None = None,
               batch_size: int = 64, on_batch: Callable[[int, int], None] | None = None,
               cond: Cond | None = None) -> torch.Tensor:  # fmt: skip
        """x0 in model space for each (prompt, seed), through ComfyUI's own sampler; from `cond` (the prompts'
        conditioning already made, one row each, e.g. with learned tokens: attacks/) through _sample_cond."""
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        g = self.default_guidance if guidance is None else guidance
        neg_c, neg_x = self._clip_encode("")
        if cond is not None:
            self._load()  # comfy.sample.sample loads its model itself; predict() uses the weights as they are
        patcher = self._metered_patcher() if cond is None else None  # one clone for every batch
        out = []
        for i in range(0, len(prompts), batch_size):
            p, s = prompts[i : i + batch_size], list(seeds[i : i + batch_size])
            noise = seeded_noise(s, self._latent_shape, torch.device("cpu"), torch.float32)
            if cond is not None:
                x = self._sample_cond(cond_select(cond, range(i, i + len(p))), noise, steps, g)
            else:
                pos = [self._clip_encode(q) for q in p]
                positive = [[torch.cat([c for c, _ in pos]), _cat_extra([x for _, x in pos])]]
                negative = [[neg_c.repeat(len(p), 1, 1), _cat_extra([neg_x] * len(p))]]
                x = comfy.sample.sample(patcher, noise, steps, g, self.sampler_name, self.scheduler, positive, negative,
                                        torch.zeros_like(noise), disable_pbar=True, seed=s[0])  # fmt: skip
                x = self.base.process_latent_in(x)
            out.append(x.float().cpu())
            if on_batch is not None:
                on_batch(min(i + batch_size, len(prompts)), len(prompts))
        return torch.cat(out)

    def _metered_patcher(self):
        """A clone of the MODEL whose every denoiser call through ComfyUI's sampler goes through the cost meter:
        ComfyUI calls the model itself there, not predict(). Counted at ComfyUI's own model function wrapper
        (rows of each batched call: cond and uncond, every sampler's own number of calls per step); a wrapper
        the user's MODEL carries already still runs inside."""
        inner = self.patcher.model_options.get("model_function_wrapper")
        meter = self.meter

        def counted(apply_model, args: dict):
            meter.add(int(args["input"].shape[0]))
            return inner(apply_model, args) if inner is not None else apply_model(args["input"], args["timestep"],
                                                                                 **args["c"])  # fmt: skip

        patcher = self.patcher.clone()
        patcher.set_model_unet_function_wrapper(counted)
        return patcher

    def _sample_cond(self, cond: Cond, noise: torch.Tensor, steps: int, g: float) -> torch.Tensor:
        """ComfyUI's ddim sampler on prepared conditioning: x0 (B, C, H, W) from noise (B, C, H, W).

        comfy.samplers.sampler_object("ddim") is k-diffusion's Euler; written out here because ComfyUI's
        sampler makes its conditioning from CLIP output itself. Same sigmas (the scheduler's), the same
        first-step noise scaling (KSAMPLER.max_denoise) and CFG: with d = (x - x0_hat) / sigma, which predict()
        gives, each step is x <- x + (sigma_next - sigma) * (d_uncond + g * (d_cond - d_uncond)).
        """
        if self.sampler_name not in ("ddim", "euler"):
            raise SurgUnError(f"images from prepared conditioning use the ddim (Euler) sampler; this backend was set "
                              f"up with {self.sampler_name!r}")  # fmt: skip
        ms = self.objective.ms
        sigmas = comfy.samplers.calculate_sigmas(ms, self.scheduler, steps).to(self.device)
        top, first = float(ms.sigma_max), float(sigmas[0])
        noise = noise.to(self.device)
        x = ms.noise_scaling(sigmas[0], noise, torch.zeros_like(noise), math.isclose(top, first, rel_tol=1e-5) or
                             first > top)  # fmt: skip
        both = cond_cat([cond, cond_select(self.encode([""]), [0] * len(noise))])
        for sigma, nxt in itertools.pairwise(sigmas):
            d_c, d_u = self.predict(torch.cat([x, x]), sigma.expand(2 * len(x)), both).chunk(2)
            x = x + (d_u + g * (d_c - d_u)) * (nxt - sigma)
        return ms.inverse_noise_scaling(sigmas[-1], x)

    def activate(self) -> None:
        """Make this model's patches the ones applied to the weights. Models that share weights (a base model
        and its LoRA-patched clone) take turns: after sampling with one, a direct apply_model on the other
        would still see the first one's patches."""
        comfy.model_management.load_models_gpu([self.patcher])

    @contextlib.contextmanager
    def as_model(self, model) -> Iterator[None]:
        """Inside this block the backend runs `model` (a MODEL of the same kind, e.g. the base model of an erased
        one: the audit's control and judge), then again the one it ran before, each with its own patches."""
        mine, theirs = type(self.base.model_config).__name__, type(model.model.model_config).__name__
        if mine != theirs:
            raise ConfigError("base_model", f"is a {theirs} model and the erased model a {mine} one; connect the "
                              "model the erasure was made from")  # fmt: skip
        before = self.patcher
        self._bind(model)
        self._load()
        try:
            yield
        finally:
            self._bind(before)
            self._load()

    def _load(self) -> None:
        """Load this model fully with its own patches; outside inference mode, with trainable frozen weights (a
        load that restores or patches weights under inference mode leaves inference tensors: see training())."""
        mm = comfy.model_management
        try:
            mm.load_models_gpu([self.patcher], force_full_load=True)
        except TypeError:  # force_full_load appeared in Dec 2025
            mm.load_models_gpu([self.patcher])
        if not torch.is_inference_mode_enabled():
            _normal_parameters(self.denoiser)

    def _clip_encode(self, prompt: str) -> tuple[torch.Tensor, dict]:
        (cond, extra), *rest = self.clip.encode_from_tokens_scheduled(self.clip.tokenize(prompt))
        if rest:
            log.debug("scheduled conditioning: only its first entry is used for training")
        return cond, extra

    # ---- training inside ComfyUI ------------------------------------------------------------------------

    @contextlib.contextmanager
    def training(self) -> Iterator[None]:
        """Load the model fully onto its device, then leave inference mode with trainable frozen weights.

        ComfyUI runs every node under torch.inference_mode(); weights created there are inference tensors,
        which autograd refuses to save for backward. Such weights are replaced by normal copies (same
        values); ModelPatcher still restores its backups on unpatch, so nothing else changes. RoPE models
        need a backward for comfy-kitchen's RoPE op (comfy_families.ensure_rope_backward).
        """
        self._load()
        with torch.inference_mode(False):
            _normal_parameters(self.denoiser)
            ensure_rope_backward()
            yield


def _cat_extra(extras: list[dict]) -> dict:
    """Concatenate the tensor entries (pooled_output, ...) of several conditionings' option dicts."""
    out = dict(extras[0])
    for k, v in extras[0].items():
        if isinstance(v, torch.Tensor):
            out[k] = torch.cat([e[k] for e in extras])
    return out


def _normal_parameters(module: nn.Module) -> None:
    for mod in module.modules():
        for name, p in list(mod._parameters.items()):
            if p is not None and p.is_inference():
                mod._parameters[name] = nn.Parameter(p.detach().clone(), requires_grad=False)
        for name, b in list(mod._buffers.items()):
            if b is not None and b.is_inference():
                mod._buffers[name] = b.clone()


# ---- deltas through ComfyUI's own LoRA patching -------------------------------------------------------------


def delta_patches(model, sd: dict[str, torch.Tensor], source: str = "delta", clip=None) -> dict:
    """ComfyUI weight patches for a kohya LoRA state dict; every key must map to a module of `model` (or of
    `clip`'s text encoder, when given)."""
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    if clip is not None:
        key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
    groups = {k.rsplit(".lora_", 1)[0].removesuffix(".alpha") for k in sd}
    missing = sorted(g for g in groups if g not in key_map)
    if missing:
        te_only = clip is None and all(g.startswith("lora_te") for g in missing)
        what = ("they are text-encoder weights: connect the CLIP input too" if te_only
                else "the delta was made for another model: apply it to the model it was trained on")  # fmt: skip
        raise DeltaMismatchError(
            f"{source}: {len(missing)} of {len(groups)} LoRA modules match nothing in this model "
            f"(first: {missing[0]!r}); {what}"
        )
    return comfy.lora.load_lora(sd, key_map, log_missing=False)


def apply_delta(model, delta: LoraDelta | dict, strength: float = 1.0, source: str | None = None):
    """A clone of `model` with the delta added as ComfyUI LoRA patches (stacks with other LoRAs)."""
    return apply_delta_with_clip(model, None, delta, strength, source)[0]


def apply_delta_with_clip(model, clip, delta: LoraDelta | dict, strength: float = 1.0, source: str | None = None):
    """(model, clip) clones with the delta's patches at `strength`, as comfy.sd.load_lora_for_models(model,
    clip, sd, strength, strength) does: each takes the patches that name its own weights. SurgUn deltas have
    no text-encoder keys, so the CLIP comes back unpatched; clip may be None (then None comes back)."""
    sd = delta.state_dict() if isinstance(delta, LoraDelta) else delta
    patches = delta_patches(model, sd, source or getattr(delta, "source", "delta"), clip)
    new = model.clone()
    new.add_patches(patches, strength)
    new_clip = None
    if clip is not None:
        new_clip = clip.clone()
        new_clip.add_patches(patches, strength)
    return new, new_clip
