"""Learning token input embeddings against the model's own denoising loss (textual inversion's loop).

Concept inversion, the prefix attack (attacks/) and robust mode's adversary (robust.py) all do this: only the
learned embeddings move; the model under attack (erased or base) and its text encoder stay frozen. Gradients
are taken for the embeddings alone (torch.autograd.grad), so a LoRA whose weights still require grad is
neither touched nor charged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..backends.base import Backend


@dataclass
class Learned:
    tokens: dict[str, torch.Tensor]  # placeholder -> (k, d), detached
    losses: list[float]  # mean loss of each step


def learn_tokens(backend: Backend, init: dict[str, torch.Tensor], prompts: list[str], x0: torch.Tensor, steps: int,
                 lr: float, batch_size: int, seed: int) -> Learned:  # fmt: skip
    """Adam on the placeholders' embeddings to minimise l(x0_i, prompt_i) (DESIGN.md section 1) over the images.

    Args:
        init: placeholder -> (k, d) starting embeddings (copied).
        prompts: one per image of `x0` (N, C, H, W), containing the placeholders.
        seed: draws the batches, timesteps and noise, so a run is reproducible.
    """
    g = torch.Generator().manual_seed(seed)
    params = {k: torch.nn.Parameter(v.detach().clone().float()) for k, v in init.items()}
    opt = torch.optim.Adam(list(params.values()), lr=lr)
    b, n, losses = backend, len(x0), []
    for _ in range(steps):
        idx = torch.randint(0, n, (min(batch_size, n),), generator=g)  # (B,)
        x = x0[idx].to(b.device, b.dtype)
        t = b.objective.sample_t(len(idx), g)
        noise = torch.randn(x.shape, generator=g).to(x)
        cond = b.encode_with_tokens([prompts[i] for i in idx], dict(params))
        loss = b.loss(x, cond, noise, t).mean()
        grads = torch.autograd.grad(loss, list(params.values()))
        for p, gr in zip(params.values(), grads):
            p.grad = gr
        opt.step()
        losses.append(float(loss.detach()))
    return Learned({k: v.detach().clone() for k, v in params.items()}, losses)
