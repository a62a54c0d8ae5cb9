"""Deterministic samplers shared by every backend: DDIM for eps/v models, Euler for flow matching.

A sampler takes `predict(x, t, cond) -> model output` (the model's own parameterization) and a noise
schedule, so the same code samples SD1.5, SDXL, SANA and the toy model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

Predict = Callable[[torch.Tensor, torch.Tensor, object], torch.Tensor]


def seeded_noise(seeds: Sequence[int], shape: tuple[int, ...], device=None, dtype=torch.float32) -> torch.Tensor:
    """One independent N(0, 1) tensor of `shape` per seed, stacked: (len(seeds), *shape).

    Each image depends on its own seed only, so batch composition never changes an image.
    """
    out = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return torch.stack(out).to(device=device, dtype=dtype)


def alphas_cumprod(scheduler) -> torch.Tensor:
    return scheduler.alphas_cumprod.to(torch.float32)


def x0_from_prediction(pred, x_t, a_t, prediction_type: str):
    """x0 estimate from an eps/v prediction at cumulative alpha a_t (broadcastable)."""
    if prediction_type == "epsilon":
        return (x_t - (1 - a_t).sqrt() * pred) / a_t.sqrt()
    if prediction_type == "v_prediction":
        return a_t.sqrt() * x_t - (1 - a_t).sqrt() * pred
    raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")


@torch.no_grad()
def ddim_sample(
    predict: Predict,
    cond,
    uncond,
    noise: torch.Tensor,
    alphas: torch.Tensor,
    prediction_type: str,
    steps: int = 20,
    guidance: float = 1.0,
    clip: float | None = None,
) -> torch.Tensor:
    """Deterministic DDIM (eta=0) with classifier-free guidance. Returns x0 of noise's shape.

    Args:
        predict: model call (x, t, cond) -> eps or v.
        cond / uncond: conditioning for the prompts and for the empty prompt (uncond unused if guidance==1).
        alphas: cumulative alpha per training timestep, shape (T,).
        clip: clamp x0 estimates to [-clip, clip] (pixel-space models); None for latents.
    """
    T = alphas.shape[0]
    ts = torch.linspace(T - 1, 0, steps).round().long()
    x = noise
    for i, t in enumerate(ts):
        a_t = alphas[t].to(x)
        a_prev = alphas[ts[i + 1]].to(x) if i + 1 < len(ts) else torch.ones((), dtype=x.dtype)
        tt = torch.full((x.shape[0],), int(t), dtype=torch.long, device=x.device)
        pred = _guided(predict, x, tt, cond, uncond, guidance)
        x0 = x0_from_prediction(pred, x, a_t, prediction_type)
        if clip is not None:
            x0 = x0.clamp(-clip, clip)
        eps = (x - a_t.sqrt() * x0) / (1 - a_t).sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    return x


@torch.no_grad()
def flow_sample(
    predict: Predict,
    cond,
    uncond,
    noise: torch.Tensor,
    steps: int = 20,
    guidance: float = 1.0,
    shift: float = 1.0,
    num_train_timesteps: int = 1000,
) -> torch.Tensor:
    """Euler sampler for rectified-flow models that predict v = eps - x0 at x_t = (1-s) x0 + s eps."""
    sig = torch.linspace(1.0, 0.0, steps + 1)
    sig = shift * sig / (1 + (shift - 1) * sig)
    x = noise
    for i in range(steps):
        s, s_next = float(sig[i]), float(sig[i + 1])
        tt = torch.full((x.shape[0],), s * num_train_timesteps, dtype=x.dtype, device=x.device)
        v = _guided(predict, x, tt, cond, uncond, guidance)
        x = x + (s_next - s) * v
    return x


def _guided(predict: Predict, x, t, cond, uncond, guidance: float) -> torch.Tensor:
    """Classifier-free guidance: uncond + g * (cond - uncond), both halves in one batch."""
    if guidance == 1.0:
        return predict(x, t, cond)
    p_u, p_c = predict(torch.cat([x, x]), torch.cat([t, t]), _cat_cond(uncond, cond)).chunk(2)
    return p_u + guidance * (p_c - p_u)


def _cat_cond(a, b):
    """Concatenate two conditionings along the batch: tensors, or dicts/tuples of tensors."""
    if isinstance(a, torch.Tensor):
        return torch.cat([a, b])
    if isinstance(a, dict):
        return {k: _cat_cond(a[k], b[k]) for k in a}
    if isinstance(a, (tuple, list)):
        return type(a)(_cat_cond(x, y) for x, y in zip(a, b, strict=True))
    if a is None:
        return None
    raise TypeError(f"cannot batch conditioning of type {type(a).__name__}")
