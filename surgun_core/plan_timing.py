"""Seconds per sample-forward for `surgun erase --plan --time` (plan.py): one training step and one sampler call,
timed on the model itself (metered under "plan timing")."""

from __future__ import annotations

import time

import torch

from .backends.base import Backend
from .config import EraseConfig
from .engine.train import StepBatch, surgun_backward
from .lora import LoRASet
from .meter import total
from .plan_memory import lora_targets


def time_forwards(backend: Backend, cfg: EraseConfig, sampler_steps: int = 2) -> dict[str, float]:
    """Seconds per sample-forward: "training" from one training step, "inference" from one sampler call.

    Real work on the model, metered under "plan timing". On CUDA each is run once untimed first (kernel
    selection and caches warm up); on a CPU the single timed run includes that warm-up.
    """
    warm = backend.device.type == "cuda"
    with backend.meter.phase("plan timing"):
        prompts = [f"a photo of {cfg.concepts[0]}"] * min(cfg.sample_batch_size, 64)
        seeds = list(range(len(prompts)))
        sample = lambda: backend.sample(prompts, seeds, sampler_steps, cfg.guidance, batch_size=len(prompts))  # noqa: E731
        inference = _per_forward(backend, sample, warm)
        lset = LoRASet(lora_targets(backend, cfg), cfg.rank, cfg.alpha).attach()
        try:
            opt = torch.optim.AdamW(list(lset.parameters()), lr=cfg.lr)
            ckpt = cfg.gradient_checkpointing if cfg.gradient_checkpointing is not None else warm
            with backend.gradient_checkpointing(ckpt):
                training = _per_forward(backend, lambda: training_step(backend, cfg, lset, opt), warm)
        finally:
            lset.detach()
    return {"training": training, "inference": inference}


def _per_forward(backend: Backend, fn, warm: bool) -> float:
    if warm:
        fn()
    _sync(backend)
    before = total(backend.meter.counts)
    t0 = time.perf_counter()
    fn()
    _sync(backend)
    return (time.perf_counter() - t0) / max(1, total(backend.meter.counts) - before)


def _sync(backend: Backend) -> None:
    if backend.device.type == "cuda":
        torch.cuda.synchronize(backend.device)


def training_step(backend: Backend, cfg: EraseConfig, lset: LoRASet, opt: torch.optim.Optimizer,
                  seed: int = 0) -> torch.Tensor:  # fmt: skip
    """One step of the training loop (engine/train.py) on random latents: the loop's own surgun_backward,
    gradient clipping and the optimizer step, at cfg.batch_size with cfg's loss terms. Returns the loss."""
    g = torch.Generator().manual_seed(seed)
    B, dev, dt = cfg.batch_size, backend.device, backend.dtype
    shape = (B, *backend.latent_shape())
    rand = lambda: torch.randn(shape, generator=g).to(dev, dt)  # noqa: E731
    c = backend.encode([f"a photo of {cfg.concepts[0]}"] * B)
    b = StepBatch(rand(), c, backend.objective.sample_t(B, g), rand())
    if cfg.use_distractors or cfg.use_contrast:
        b.x_D, b.noise_D = rand(), rand()
    if cfg.use_retain:
        b.x_R, b.c_R, b.noise_R = rand(), c, rand()
    opt.zero_grad(set_to_none=True)
    L = surgun_backward(backend, cfg, lset, b)[0]
    torch.nn.utils.clip_grad_norm_(list(lset.parameters()), cfg.max_grad_norm)
    opt.step()
    return L
