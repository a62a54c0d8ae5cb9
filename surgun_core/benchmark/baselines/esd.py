"""ESD: Erased Stable Diffusion, a benchmark baseline.

Paper: "Erasing Concepts from Diffusion Models", Rohit Gandikota, Joanna Materzyńska, Jaden Fiotto-Kaufman,
David Bau. ICCV 2023. arXiv:2303.07345. Official code: github.com/rohitgandikota/erasing,
train-scripts/train-esd.py (the paper's CompVis script; its defaults are used here).

The fine-tuned model is taught to predict, under the concept prompt c, the frozen original's noise with
negative guidance away from c:

    target = eps0(x_t, "") - eta * (eps0(x_t, c) - eps0(x_t, ""))       (eps0: the frozen original)
    loss   = || eps_theta(x_t, c) - target ||^2

Each iteration draws a step k of a 50-step DDIM schedule and makes x_t by running the CURRENT model with the
concept prompt (classifier-free guidance 3, the script's start_guidance) from seeded noise for k steps, so x_t
sits at the schedule's timestep t_k, where all three predictions are taken. (The 2023 script queries a DDPM
time drawn from the 20-step bucket around t_k; its diffusers rewrite, esd_sd.py, uses t_k as done here.)

  ESD-x  trains every parameter of the cross-attention blocks (attn2): the script's `xattn`.
  ESD-u  trains every other parameter except the time embedding and the output layer (conv_norm_out,
         conv_out): the script's `noxattn`, which skips attn2, `time_embed` and `out.`.

Defaults (train-esd.py): 1000 iterations, Adam lr 1e-5, negative guidance eta 1.0, start guidance 3.0,
50 DDIM steps, batch 1. The script erases the bare concept word; here each iteration draws one of the
caller's prompt templates with the concept in it (the bare word when no templates are given), so every
baseline of the benchmark sees the same phrasings. eps- and v-prediction models only: a flow-matching model
raises SurgUnError (use uce or ca there).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from ...backends.base import Backend, Cond, cond_cat
from ...engine.data import CondBank
from ...errors import SurgUnError
from ...objectives import DiffusionObjective
from ...sampling import seeded_noise, x0_from_prediction
from ._common import (
    BaselineResult,
    Cancel,
    EditedWeights,
    Progress,
    check_cancel,
    editing,
    finish,
    prompts_for,
    resolve,
    start_clock,
)

log = logging.getLogger(__name__)

DEFAULTS = {
    "iterations": 1000,
    "lr": 1e-5,
    "negative_guidance": 1.0,  # eta
    "start_guidance": 3.0,  # guidance of the current model's sampling of x_t
    "ddim_steps": 50,
}
# Top-level modules ESD-u leaves alone besides attn2: the time embedding and the output layer (CompVis
# `time_embed` and `out.`; SANA's `time_embed`, `norm_out`, `proj_out`).
ESD_U_SKIP = ("time_embedding", "time_embed", "conv_norm_out", "conv_out", "norm_out", "proj_out")


def trained_names(denoiser: torch.nn.Module, variant: str) -> list[str]:
    """Parameter names ESD-x ("x") or ESD-u ("u") fine-tunes."""
    names = [n for n, _ in denoiser.named_parameters()]
    if variant == "x":
        return [n for n in names if "attn2" in n.split(".")]
    return [n for n in names if "attn2" not in n.split(".") and n.split(".")[0] not in ESD_U_SKIP]


def esd_x(backend: Backend, concept: str, **kwargs) -> BaselineResult:
    """ESD-x: fine-tune the cross-attention blocks. Arguments as `erase_esd`."""
    return erase_esd(backend, concept, variant="x", **kwargs)


def esd_u(backend: Backend, concept: str, **kwargs) -> BaselineResult:
    """ESD-u: fine-tune everything but cross-attention. Arguments as `erase_esd`."""
    return erase_esd(backend, concept, variant="u", **kwargs)


def erase_esd(
    backend: Backend,
    concept: str,
    *,
    variant: str,
    templates: list[str],
    preserve: list[str],
    anchor: str | None = None,
    seed: int = 0,
    iterations: int | None = None,
    lr: float | None = None,
    progress: Progress | None = None,
    cancel: Cancel | None = None,
    **options,
) -> BaselineResult:
    """Erase `concept` with ESD, editing `backend.denoiser` in place.

    Args:
        variant: "x" (cross-attention) or "u" (all but cross-attention).
        templates: prompt templates with one "{}"; each iteration uses one with the concept in it.
        preserve, anchor: unused (ESD has neither).
        seed: seeds the noise of each iteration and the draws of prompt and step.
        iterations, lr: None for the paper defaults (1000, 1e-5).
        options: negative_guidance, start_guidance, ddim_steps (defaults in DEFAULTS).

    Returns:
        BaselineResult; its restore() puts the original weights back.
    """
    name = f"esd-{variant}"
    t0 = start_clock(backend)
    cfg = resolve(name, DEFAULTS, options, iterations, lr)
    obj = backend.objective
    if not isinstance(obj, DiffusionObjective):
        raise SurgUnError(
            f"{name} samples x_t with DDIM over a discrete eps/v noise schedule; this model's objective is "
            f"{type(obj).__name__} (flow matching). Use uce or ca for it."
        )
    prompts = prompts_for(templates, concept)
    dev = backend.device
    bank = CondBank(backend, [*prompts, ""])
    empty = bank.batch([""])
    T = obj.alphas_cumprod.shape[0]
    ts = torch.linspace(T - 1, 0, cfg["ddim_steps"]).round().long()  # the grid sampling.ddim_sample uses
    g = torch.Generator().manual_seed(seed)
    weights = EditedWeights(backend.denoiser, trained_names(backend.denoiser, variant), f"{name} parameters")
    log.info("%s: erasing %r, %d iterations, %d parameters", name, concept, cfg["iterations"], weights.numel())
    eta = cfg["negative_guidance"]
    last = 0.0
    with editing(weights):
        opt = torch.optim.Adam(weights.trainable(), lr=cfg["lr"])
        for it in range(cfg["iterations"]):
            check_cancel(cancel)
            cond = bank.batch([prompts[int(torch.randint(len(prompts), (1,), generator=g))]])
            k = int(torch.randint(cfg["ddim_steps"], (1,), generator=g))  # DDIM steps taken before t_k
            noise = seeded_noise([seed * 1_000_003 + it], backend.latent_shape(), dev, backend.dtype)
            t = ts[k].view(1).to(dev)
            with torch.no_grad():
                # 1. x_t from the current model, concept prompt, start guidance
                x_t = ddim_until(backend, noise, cond, empty, ts, k, cfg["start_guidance"])
                # 2. the frozen original's predictions without and with the concept
                with weights.original():
                    e_0, e_c = backend.predict(torch.cat([x_t, x_t]), t.expand(2), cond_cat([empty, cond])).chunk(2)
                target = e_0.float() - eta * (e_c.float() - e_0.float())
            # 3. the model under the concept prompt learns the negatively guided prediction
            loss = F.mse_loss(backend.predict(x_t, t, cond).float(), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            last = loss.item()
            if progress is not None:
                progress("train", it + 1, cfg["iterations"], {"loss": last, "step": k})
    settings = {**cfg, "method": name, "optimizer": "Adam", "batch_size": 1, "prompts": prompts, "final_loss": last}
    return finish(name, t0, backend, settings, weights)


@torch.no_grad()
def ddim_until(
    backend: Backend, noise: torch.Tensor, cond: Cond, uncond: Cond, ts: torch.Tensor, k: int, guidance: float
) -> torch.Tensor:
    """Deterministic DDIM from pure noise at ts[0] for k steps with classifier-free guidance: x at ts[k]."""
    obj = backend.objective
    alphas = obj.alphas_cumprod
    x = noise
    both = cond_cat([uncond, cond])
    for j in range(k):
        a_t, a_next = alphas[ts[j]].to(x), alphas[ts[j + 1]].to(x)
        tt = ts[j].view(1).expand(2).to(x.device)
        p_u, p_c = backend.predict(torch.cat([x, x]), tt, both).chunk(2)
        pred = p_u + guidance * (p_c - p_u)
        x0 = x0_from_prediction(pred, x, a_t, obj.prediction_type)
        if backend.pixel_space:  # as Backend.sample does for pixel models
            x0 = x0.clamp(-1, 1)
        eps = (x - a_t.sqrt() * x0) / (1 - a_t).sqrt()
        x = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
    return x
