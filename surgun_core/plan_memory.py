"""Estimated peak memory of an erase (`surgun erase --plan`), from a shape-only trace of one denoiser forward.

estimate_memory: weights + LoRA state + runtime + the larger of the training step's activations and
the largest no-grad batch's, each from a shape-only trace of one denoiser forward (FakeTensorMode: nothing
is computed or allocated). Per batch row the trace gives
  all    the bytes of every leaf module's output (what autograd keeps for backward without checkpointing),
  ckpt   with gradient checkpointing: the inputs of the checkpointed units (resnets, transformer blocks), the
         outputs of the leaves outside them, and the largest unit's leaf outputs (recomputed in backward),
  leaf   the largest single leaf output (a no-grad forward keeps only a few tensors alive).
  training activations  = K_CKPT * ckpt (or K_FULL * all) * rows of the target+distractor forward (2B)
  inference activations = K_INFERENCE * leaf * rows of the largest no-grad batch (sampler with guidance,
                          probe images, the judge's batches)
  LoRA  = 16 bytes per LoRA parameter (fp32 weight, gradient, two AdamW moments) + 4 per kept checkpoint
  runtime = CPU_RUNTIME_MB on a CPU (the process's resident set before any model); 0 on CUDA, where
          torch.cuda.max_memory_allocated counts tensors only (the CUDA context adds a few hundred MB)
Calibrated against README.md's "Memory" table (bench/memory.py, CPU, float32, batch 1, checkpointing on):
SD1.5 64x64 training-step peak 4,507 MB (estimate 4,423 MB, -1.9%), SDXL 128x128 12,295 MB (12,528 MB,
+1.9%); inference, 2 rows: 4,044 MB (4,059, +0.4%) and 10,932 MB (10,941, +0.1%). K_FULL from one run
without checkpointing (SD1.5 at 32x32 latents, same setting: peak 4,433 MB, estimate 4,498, +1.5%; with
checkpointing 3,913 MB, estimate 3,898, -0.4%). tests/test_plan.py keeps the README figures within 5%.
The constants come from CPU runs (float32, the CPU's attention kernel); bench/gpu_check.py prints the
estimate beside torch.cuda.max_memory_allocated for fp16/bf16 on a card, to check them there.
"""

from __future__ import annotations

import inspect
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from .backends.base import Backend
from .config import EraseConfig
from .engine.localize import candidate_groups
from .registry import AUTO_BLOCKS

K_CKPT = 0.86  # fitted: measured activation rise / (2 rows x ckpt bytes) was 0.97 (SD1.5), 0.78 (SDXL)
K_FULL = 0.93  # measured: SD1.5 at 32x32 latents without checkpointing (CPU, float32, batch 1: rise 776 MB)
K_INFERENCE = 4.2  # fitted: measured no-grad rise / (2 rows x leaf bytes) was 4.08 (SD1.5), 4.33 (SDXL)
CPU_RUNTIME_MB = 440.0  # resident set of Python + torch + diffusers before a model (README table: 439, 446)
_UNIT_NAMES = ("ResnetBlock2D", "ResBlock", "DoubleStreamBlock", "SingleStreamBlock")  # checkpointed units
MB = 2**20


@dataclass
class ActivationTrace:
    """Bytes per batch row of one denoiser forward (see the module docstring)."""

    all_bytes: int
    ckpt_bytes: int
    leaf_bytes: int


@dataclass
class MemoryEstimate:
    """Estimated peak memory (MB) of an erase, by part; the peak is the larger of training and inference."""

    device: str
    dtype: str
    weights_mb: float  # the denoiser's parameters and buffers
    other_weights_mb: float  # text encoders, VAE
    lora_mb: float
    runtime_mb: float
    checkpointing: bool
    train_rows: int
    train_activations_mb: float
    inference_rows: int
    inference_activations_mb: float
    per_row: ActivationTrace

    @property
    def base_mb(self) -> float:
        return self.weights_mb + self.other_weights_mb + self.lora_mb + self.runtime_mb

    @property
    def training_peak_mb(self) -> float:
        return self.base_mb + self.train_activations_mb

    @property
    def inference_peak_mb(self) -> float:
        return self.base_mb + self.inference_activations_mb

    @property
    def peak_mb(self) -> float:
        return max(self.training_peak_mb, self.inference_peak_mb)

    def to_dict(self) -> dict:
        return {**asdict(self), "training_peak_mb": self.training_peak_mb,
                "inference_peak_mb": self.inference_peak_mb, "peak_mb": self.peak_mb}  # fmt: skip


def trace_activations(backend: Backend, cond: dict | None = None) -> ActivationTrace:
    """Bytes per row of one forward of the denoiser, traced on shapes only (FakeTensorMode, nothing computed).

    Args:
        cond: conditioning for one row (default: the backend's encoding of the empty prompt, traced too).
    """
    den = backend.denoiser
    units = [
        m for m in den.modules() if type(m).__name__ in _UNIT_NAMES or type(m).__name__.endswith("TransformerBlock")
    ]
    owner = {m: u for u in units for m in u.modules()}  # nested units: the outermost wins (iterated last)
    leaf_out: dict[nn.Module | None, int] = {}
    leaves: list[int] = []
    unit_inputs: dict[int, torch.Tensor] = {}  # by id, kept alive so ids are not reused

    def on_leaf(mod, _args, out):
        b = sum(t.numel() * t.element_size() for t in _tensors(out))
        leaves.append(b)
        key = owner.get(mod)
        leaf_out[key] = leaf_out.get(key, 0) + b

    def on_unit(_mod, args, kwargs):
        for t in _tensors((args, kwargs)):
            unit_inputs[id(t)] = t

    hooks = [m.register_forward_hook(on_leaf) for m in den.modules() if not list(m.children())]
    hooks += [u.register_forward_pre_hook(on_unit, with_kwargs=True) for u in units]
    predict = inspect.unwrap(type(backend).predict)  # unmetered: a trace is not work the erase does
    try:
        with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad():
            c = cond if cond is not None else backend.encode([""])
            x = torch.zeros((1, *backend.latent_shape()), device=backend.device, dtype=backend.dtype)
            t = backend.objective.model_time(backend.objective.t_grid(1))
            predict(backend, x, t, c)
    finally:
        for h in hooks:
            h.remove()
    outside = leaf_out.pop(None, 0)
    stored = sum(t.numel() * t.element_size() for t in unit_inputs.values())
    ckpt = stored + outside + max(leaf_out.values(), default=0)
    return ActivationTrace(outside + sum(leaf_out.values()), ckpt, max(leaves, default=0))


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


def estimate_memory(backend: Backend, cfg: EraseConfig, *, inference_rows: int, checkpoints: int = 0,
                    cond: dict | None = None, trace: ActivationTrace | None = None) -> MemoryEstimate:  # fmt: skip
    """Estimated peak memory of an erase at the backend's dtype and device (the formula: module docstring).

    Args:
        inference_rows: rows of the largest no-grad forward (plan.largest_no_grad_batch).
        checkpoints: LoRA checkpoints kept for calibration (each a copy of the LoRA's weights).
        cond: conditioning of one row for the trace (default: the backend encodes the empty prompt).
        trace: the model's trace_activations, when already made (it depends on the model only).
    """
    dev = backend.device
    trace = trace or trace_activations(backend, cond)
    seen: set[int] = set()
    weights = _module_bytes(backend.denoiser, seen)
    other = sum(_module_bytes(m, seen) for m in _other_modules(backend))
    lora_params = sum(cfg.rank * (m.in_features + m.out_features) for m in lora_targets(backend, cfg).values())
    lora = lora_params * (16 + 4 * (checkpoints + 1))  # + the last good state, kept every step
    ckpt = cfg.gradient_checkpointing if cfg.gradient_checkpointing is not None else dev.type == "cuda"
    train_rows = cfg.batch_size * (2 if cfg.use_distractors or cfg.use_contrast else 1)
    train_act = train_rows * (K_CKPT * trace.ckpt_bytes if ckpt else K_FULL * trace.all_bytes)
    return MemoryEstimate(str(dev), str(backend.dtype).removeprefix("torch."), weights / MB, other / MB, lora / MB,
                          CPU_RUNTIME_MB if dev.type == "cpu" else 0.0, bool(ckpt), train_rows, train_act / MB,
                          inference_rows, K_INFERENCE * inference_rows * trace.leaf_bytes / MB, trace)  # fmt: skip


def _module_bytes(mod: nn.Module, seen: set[int]) -> int:
    n = 0
    for t in [*mod.parameters(), *mod.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            n += t.numel() * t.element_size()
    return n


def _other_modules(backend: Backend) -> list[nn.Module]:
    """The backend's modules beside the denoiser that stay loaded during an erase (text encoders, VAE)."""
    return [m for m in (getattr(backend, "text", None), getattr(backend, "vae", None)) if isinstance(m, nn.Module)]


def lora_targets(backend: Backend, cfg: EraseConfig) -> dict[str, nn.Linear]:
    """The layers the LoRA trains; blocks="auto": every candidate group's (an upper bound: it keeps a few)."""
    if cfg.blocks.strip() != AUTO_BLOCKS:
        return backend.lora_targets(cfg.block_pattern)
    linears = backend.attention_linears()
    return {n: linears[n] for g in candidate_groups(backend, cfg.localize_attention) for n in g.modules}
