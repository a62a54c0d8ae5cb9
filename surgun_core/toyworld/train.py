"""The toy model's training recipe: `surgun toyworld train` reproduces the shipped weights.

Recipe (what made shapes reliable on 2 CPU cores): AdamW with warmup and cosine decay, an EMA of the
weights (the EMA is what ships), min-SNR-5 loss weighting (more weight on the high-noise steps, where the
shape is decided), 10% empty prompts for classifier-free guidance, and fresh renders every step. The run is
resumable: it checkpoints to a work folder and picks up from the last checkpoint with identical data.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..io import atomic_path, write_json
from .model import build_untrained, save_model_folder
from .world import COLOURS, SHAPES, render_batch, training_prompt

log = logging.getLogger(__name__)


def _flat_state(prefix: str, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v.detach().contiguous().clone() for k, v in module.state_dict().items()}


def _opt_tensors(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {}
    for i, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            out[f"opt.{i}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    return out


def _load_opt(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    sd = opt.state_dict()
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        if key.startswith("opt."):
            _, i, k = key.split(".", 2)
            state.setdefault(int(i), {})[k] = v
    sd["state"] = state
    opt.load_state_dict(sd)


def lr_at(step: int, steps: int, peak: float, warmup: int = 200, floor: float = 0.05) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    p = (step - warmup) / max(1, steps - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p)))


def train_toy_model(
    out_dir: Path,
    work_dir: Path,
    steps: int = 2000,
    batch: int = 64,
    seed: int = 0,
    lr: float = 1e-3,
    ema_decay: float = 0.999,
    checkpoint_every: int = 250,
    on_eval: Callable[[int, Path], None] | None = None,
    eval_every: int = 0,
) -> Path:
    """Train the toy text encoder + UNet and write the EMA weights as a diffusers folder in out_dir."""
    torch.manual_seed(seed)
    work_dir.mkdir(parents=True, exist_ok=True)
    tok, text, unet, sched = build_untrained(out_dir)
    params = list(text.parameters()) + list(unet.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    ema_text, ema_unet = copy.deepcopy(text).requires_grad_(False), copy.deepcopy(unet).requires_grad_(False)
    alphas = sched.alphas_cumprod.float()
    snr = alphas / (1 - alphas)
    weight = torch.clamp(snr, max=5.0) / snr  # min-SNR-5 for eps prediction

    # everything a checkpoint holds besides the optimizer, by name prefix
    parts = (("text", text), ("unet", unet), ("ema_text", ema_text), ("ema_unet", ema_unet))
    start = 0
    state_file, ckpt_file = work_dir / "state.json", work_dir / "checkpoint.safetensors"
    if state_file.exists() and ckpt_file.exists():
        tensors = load_file(str(ckpt_file))
        for prefix, mod in parts:
            n = len(prefix) + 1
            mod.load_state_dict({k[n:]: v for k, v in tensors.items() if k.startswith(prefix + ".")})
        _load_opt(opt, tensors)
        start = json.loads(state_file.read_text())["step"]
        log.info("resuming toy-model training at step %d from %s", start, work_dir)

    empty = tok([""], padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
    t0 = time.time()
    for step in range(start, steps):
        rng = np.random.default_rng([seed, step])
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        shapes = [SHAPES[i] for i in rng.integers(len(SHAPES), size=batch)]
        colours = [COLOURS[i] for i in rng.integers(len(COLOURS), size=batch)]
        x0 = render_batch(shapes, colours, rng)  # (B, 3, 16, 16)
        prompts = [training_prompt(s, c, rng) for s, c in zip(shapes, colours, strict=True)]
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
        ids = ids.input_ids
        drop = torch.rand(batch, generator=g) < 0.1
        ids[drop] = empty
        t = torch.randint(0, alphas.shape[0], (batch,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        a = alphas[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr)
        pred = unet(x_t, t, text(ids).last_hidden_state).sample
        loss = ((pred - eps) ** 2).mean(dim=(1, 2, 3)) * weight[t]
        loss = loss.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        d = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for ema, live in ((ema_text, text), (ema_unet, unet)):
                for pe, pl in zip(ema.parameters(), live.parameters(), strict=True):
                    pe.lerp_(pl, 1 - d)
        done = step + 1
        if done % 50 == 0:
            rate = (time.time() - t0) / (done - start)
            log.info("toy step %d/%d loss %.4f (%.2f s/step, %.0f min left)", done, steps, loss.item(), rate,
                     rate * (steps - done) / 60)  # fmt: skip
        if done % checkpoint_every == 0 or done == steps:
            tensors = {}
            for prefix, mod in parts:
                tensors.update(_flat_state(prefix, mod))
            tensors.update(_opt_tensors(opt))
            with atomic_path(ckpt_file) as tmp:
                save_file(tensors, str(tmp))
            write_json(state_file, {"step": done, "steps": steps, "seed": seed})
        if on_eval is not None and eval_every and (done % eval_every == 0 or done == steps):
            snap = work_dir / f"snapshot_{done}"
            snap.mkdir(exist_ok=True)
            shutil.copytree(out_dir / "tokenizer", snap / "tokenizer", dirs_exist_ok=True)
            save_model_folder(snap, ema_text, ema_unet, sched)
            on_eval(done, snap)
    save_model_folder(out_dir, ema_text, ema_unet, sched)
    return out_dir
