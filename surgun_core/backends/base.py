"""The Backend interface: what the engine needs from one model family (DESIGN.md section 2).

A conditioning ("cond") is a dict of tensors whose first dimension is the batch, so the engine can
slice, repeat and concatenate it without knowing the family (SD1.5: encoder_hidden_states; SDXL adds
text_embeds and time_ids; SANA adds an attention mask).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from ..errors import ConfigError, SurgUnError
from ..meter import CostMeter
from ..objectives import FlowObjective, Objective
from ..registry import BLOCK_PRESETS
from ..sampling import ddim_sample, flow_sample, seeded_noise

Cond = dict[str, torch.Tensor]


def cond_select(cond: Cond, index: torch.Tensor | Sequence[int]) -> Cond:
    index = torch.as_tensor(index, dtype=torch.long)
    return {k: v[index.to(v.device)] for k, v in cond.items()}


def cond_cat(conds: Sequence[Cond]) -> Cond:
    return {k: torch.cat([c[k] for c in conds]) for k in conds[0]}


def cond_len(cond: Cond) -> int:
    return next(iter(cond.values())).shape[0]


class Backend(ABC):
    """Adapts one model family to the engine. Subclasses set the attributes below and the abstract calls."""

    architecture: str  # modelspec.architecture of the base model, e.g. "stable-diffusion-v1"
    lora_prefix: str = "lora_unet"
    objective: Objective
    denoiser: nn.Module  # the module LoRA layers live in (UNet or DiT)
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32
    pixel_space: bool = False  # True when the model denoises pixels directly (the toy world)
    default_guidance: float = 5.0

    def __init_subclass__(cls, **kwargs) -> None:
        """Every family's predict() goes through the cost meter, whoever calls it (sampler, loss, judge)."""
        super().__init_subclass__(**kwargs)
        if "predict" in cls.__dict__ and not getattr(cls.__dict__["predict"], "metered", False):
            cls.predict = _metered(cls.__dict__["predict"])

    @property
    def meter(self) -> CostMeter:
        """Denoiser sample-forwards of this backend by phase (meter.py); created on first use."""
        if "_meter" not in self.__dict__:
            self.__dict__["_meter"] = CostMeter()
        return self.__dict__["_meter"]

    def sampler_id(self) -> str:
        """Names the sampler that draws training images; part of the image-cache key, since two samplers
        give slightly different images from the same model, prompt and seed."""
        return "surgun-flow-euler" if isinstance(self.objective, FlowObjective) else "surgun-ddim"

    @abstractmethod
    def encode(self, prompts: list[str]) -> Cond:
        """Text conditioning for each prompt."""

    @abstractmethod
    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """The network's raw output at model time t (eps, v or flow velocity)."""

    @abstractmethod
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one sample the denoiser works on."""

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1]. Pixel-space default; latent backends override."""
        return ((latents.float() + 1) / 2).clamp(0, 1)

    # ---- shared behaviour -------------------------------------------------------------------------------

    def loss(self, x0: torch.Tensor, cond: Cond, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Per-sample training loss l(x0, c) of DESIGN.md section 1: (B,)."""
        obj = self.objective
        x_t = obj.noisy(x0, noise, t.to(x0.device))
        pred = self.predict(x_t, obj.model_time(t).to(x0.device), cond)
        return ((pred.float() - obj.target(x0, noise, t.to(x0.device)).float()) ** 2).flatten(1).mean(1)

    @torch.no_grad()
    def sample(
        self,
        prompts: list[str],
        seeds: Sequence[int],
        steps: int = 20,
        guidance: float | None = None,
        batch_size: int = 64,
        on_batch: Callable[[int, int], None] | None = None,
        cond: Cond | None = None,
    ) -> torch.Tensor:
        """x0 (latents, or pixels in [-1, 1]) for each (prompt, seed); deterministic per seed.

        `cond`: the prompts' conditioning already made (one row per prompt), e.g. with learned tokens (attacks/).
        """
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        g = self.default_guidance if guidance is None else guidance
        out = []
        uncond_one = self.encode([""])
        for i in range(0, len(prompts), batch_size):
            p, s = prompts[i : i + batch_size], list(seeds[i : i + batch_size])
            c = self.encode(p) if cond is None else cond_select(cond, range(i, i + len(p)))
            uncond = cond_select(uncond_one, [0] * len(p))
            noise = seeded_noise(s, self.latent_shape(), self.device, self.dtype)
            if isinstance(self.objective, FlowObjective):
                x = flow_sample(self.predict, c, uncond, noise, steps, g, self.objective.shift,
                                self.objective.num_train_timesteps)  # fmt: skip
            else:
                x = ddim_sample(self.predict, c, uncond, noise, self.objective.alphas_cumprod,
                                self.objective.prediction_type, steps, g,
                                clip=1.0 if self.pixel_space else None)  # fmt: skip
            out.append(x.float().cpu())
            if on_batch is not None:
                on_batch(min(i + batch_size, len(prompts)), len(prompts))
        return torch.cat(out)

    def generate(self, prompts: list[str], seeds: Sequence[int], steps: int = 20, guidance=None,
                 on_batch: Callable[[int, int], None] | None = None) -> torch.Tensor:  # fmt: skip
        """Decoded images (B, 3, H, W) in [0, 1]."""
        x = self.sample(prompts, seeds, steps, guidance, on_batch=on_batch)
        return torch.cat([self.decode(x[i : i + 16].to(self.device)).float().cpu() for i in range(0, len(x), 16)])

    @contextlib.contextmanager
    def gradient_checkpointing(self, on: bool) -> Iterator[None]:
        """Recompute the denoiser's activations in backward (much less memory, ~30% more compute), where the
        denoiser supports it (diffusers models do); a no-op elsewhere."""
        mod = self.denoiser
        can = on and hasattr(mod, "enable_gradient_checkpointing")
        was = any(getattr(m, "gradient_checkpointing", False) for m in mod.modules()) if can else False
        if can and not was:
            mod.enable_gradient_checkpointing()
        try:
            yield
        finally:
            if can and not was:
                mod.disable_gradient_checkpointing()

    def attention_linears(self) -> dict[str, nn.Linear]:
        """Every nn.Linear inside an attention module of the denoiser, by dotted name."""
        attn = [n for n, m in self.denoiser.named_modules() if n and type(m).__name__.endswith("Attention")]
        out = {}
        for name, mod in self.denoiser.named_modules():
            if isinstance(mod, nn.Linear) and any(name.startswith(a + ".") for a in attn):
                out[name] = mod
        return out

    def lora_targets(self, pattern: str) -> dict[str, nn.Linear]:
        """Attention Linear layers whose name matches the regular expression `pattern`."""
        try:
            rx = re.compile(pattern)
        except re.error as e:
            raise ConfigError("blocks", f"{pattern!r} is not a valid regular expression ({e})") from e
        cands = self.attention_linears()
        hits = {n: m for n, m in cands.items() if rx.search(n)}
        if not hits:
            examples = ", ".join(list(cands)[:3])
            fits = [k for k, p in BLOCK_PRESETS.items() if any(re.search(p, n) for n in cands)]
            raise ConfigError(
                "blocks",
                f"{pattern!r} matches no attention layer of this model; names look like: {examples}"
                + (f"; presets that fit this model: {', '.join(fits)}" if fits else ""),
            )
        return hits

    def fingerprint(self) -> str:
        """Short hash of the denoiser's architecture and a sample of its weights (identifies the base)."""
        return fingerprint_of(self.architecture, self.denoiser.state_dict())

    # ---- learned tokens (attacks/, robust mode) ----------------------------------------------------------

    def encode_with_tokens(self, prompts: list[str], tokens: dict[str, torch.Tensor]) -> Cond:
        """encode(), where each placeholder word (a key of `tokens`, e.g. "<concept>") in a prompt stands for
        its input embeddings (k, d) (k tokens; d as word_embedding gives), gradients flowing to them. Attacks
        learn such tokens against the erased model (concept inversion, prefix attacks)."""
        raise SurgUnError(f"the {type(self).__name__} backend cannot encode prompts with learned tokens yet; "
                          "run attacks and robust mode on a diffusers model folder")  # fmt: skip

    def word_embedding(self, word: str) -> torch.Tensor:
        """The text encoder's input embeddings (n, d) of the n tokens of `word` (a learned token's start)."""
        raise SurgUnError(f"the {type(self).__name__} backend cannot give word embeddings yet; "
                          "run attacks and robust mode on a diffusers model folder")  # fmt: skip


def fingerprint_of(architecture: str, state: dict[str, torch.Tensor]) -> str:
    """Backend.fingerprint from an architecture name and the denoiser's state dict (in its own key names), so a
    model can be identified without building it (e.g. straight from a single-file checkpoint)."""
    h = hashlib.sha256(architecture.encode())
    for name, t in sorted(state.items()):
        h.update(f"{name}:{tuple(t.shape)}".encode())
    for _, t in list(sorted(state.items()))[:: max(1, len(state) // 16)]:
        h.update(t.detach().flatten()[:64].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _metered(predict: Callable) -> Callable:
    """predict() that counts its rows once, at the outermost call (a subclass may call its parent's)."""

    @functools.wraps(predict)
    def counted(self, x_t, t, cond, *args, **kwargs):
        depth = self.__dict__.get("_meter_depth", 0)
        self.__dict__["_meter_depth"] = depth + 1
        try:
            out = predict(self, x_t, t, cond, *args, **kwargs)
        finally:
            self.__dict__["_meter_depth"] = depth
        if depth == 0:
            self.meter.add(x_t.shape[0], backward=out.requires_grad)
        return out

    counted.metered = True
    return counted


def resolve_device(device: str) -> torch.device:
    """`auto`: cuda if available, else cpu. A named device must exist on this machine (checked here, before
    any model is loaded, instead of torch's AssertionError at the first tensor moved there)."""
    if not isinstance(device, str):
        raise ConfigError("device", f"must be a device name (auto, cpu, cuda, cuda:N, mps), got {device!r}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ConfigError("device", f"{device!r} is not a device; use auto, cpu, cuda or cuda:N") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch was built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ConfigError("device", f"{device!r}: CUDA is not available here ({why}); use --device cpu (or auto), "
                              "or install a CUDA build of torch on a machine with an NVIDIA GPU")  # fmt: skip
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise ConfigError("device", f"{device!r}: this machine has {n} CUDA device(s), cuda:0 to cuda:{n - 1}")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device", f"{device!r}: Apple's MPS is not available here; use --device cpu (or auto)")
    return dev


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[precision]
    if device.type == "cpu" and dt == torch.float16:
        raise ConfigError("precision", "float16 is not supported on CPU; use float32 or bfloat16")
    return dt
