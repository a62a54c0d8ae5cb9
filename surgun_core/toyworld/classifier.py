"""The ground-truth classifier: a small CNN with a shape head and a colour head, trained on renders."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

from ..io import atomic_path
from .world import COLOURS, SHAPES, render_batch

log = logging.getLogger(__name__)


class ToyClassifier(nn.Module):
    """(B, 3, 16, 16) in [-1, 1] -> (shape logits (B, 5), colour logits (B, 5))."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),  # 8x8
            nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.ReLU(),  # 4x4
            nn.Flatten(), nn.Linear(64 * 16, 128), nn.ReLU(),
        )  # fmt: skip
        self.shape_head = nn.Linear(128, len(SHAPES))
        self.colour_head = nn.Linear(128, len(COLOURS))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(x)
        return self.shape_head(h), self.colour_head(h)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> tuple[list[str], list[str]]:
        """Names of the predicted shape and colour for each image."""
        s, c = self(x.float().clamp(-1, 1))
        return [SHAPES[i] for i in s.argmax(1)], [COLOURS[i] for i in c.argmax(1)]


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Generated images are imperfect: add noise, blur and brightness changes so the judge is robust."""
    b = x.shape[0]
    sigma = torch.rand(b, 1, 1, 1, generator=g) * 0.2
    x = x + sigma * torch.randn(x.shape, generator=g)
    blur = torch.rand(b, generator=g) < 0.3
    if blur.any():
        k = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16
        xb = F.conv2d(x[blur], k.expand(3, 1, 3, 3), padding=1, groups=3)
        x = x.clone()
        x[blur] = xb
    x = x * (1 + 0.1 * torch.randn(b, 1, 1, 1, generator=g))
    return x.clamp(-1, 1)


def train_classifier(steps: int = 1500, batch: int = 128, seed: int = 0) -> ToyClassifier:
    """Train the judge on freshly rendered images; deterministic given the seed."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    net = ToyClassifier()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    for step in range(steps):
        rng = np.random.default_rng([seed, step])
        si = rng.integers(len(SHAPES), size=batch)
        ci = rng.integers(len(COLOURS), size=batch)
        x = _augment(render_batch([SHAPES[i] for i in si], [COLOURS[i] for i in ci], rng), g)
        s_logit, c_logit = net(x)
        loss = F.cross_entropy(s_logit, torch.from_numpy(si)) + F.cross_entropy(c_logit, torch.from_numpy(ci))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 250 == 0:
            log.info("classifier step %d loss %.4f", step, loss.item())
    return net.eval()


def save_classifier(net: ToyClassifier, path: Path) -> None:
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp))


def load_classifier(path: Path) -> ToyClassifier:
    net = ToyClassifier()
    net.load_state_dict(load_file(str(path)))
    return net.eval()
