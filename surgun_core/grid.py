"""Labelled before | after image grids (PNG), for the demo, the CLI and the front ends."""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image, ImageDraw

from .io import atomic_path


def _tile(img: torch.Tensor, cell: int) -> Image.Image:
    arr = (img.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(arr).resize((cell, cell), Image.NEAREST)


def before_after_grid(rows: list[tuple[str, torch.Tensor, torch.Tensor]], cell: int = 64,
                      title: str = "") -> Image.Image:  # fmt: skip
    """rows: (label, before (K, 3, H, W), after (K, 3, H, W)) in [0, 1] -> one image, before left, after right."""
    k = max(r[1].shape[0] for r in rows)
    label_w, gap, head = 190, 12, 34
    width = label_w + 2 * k * (cell + 2) + gap
    height = head + len(rows) * (cell + 4)
    canvas = Image.new("RGB", (width, height), (250, 250, 250))
    draw = ImageDraw.Draw(canvas)
    x_after = label_w + k * (cell + 2) + gap
    draw.text((4, 4), title, fill=(0, 0, 0))
    left, right = "before (base model)", "after (erased)"
    if draw.textlength(left) > x_after - label_w - 4:  # one narrow column a side: the long heads would overlap
        left, right = "before", "after"
    draw.text((label_w, 18), left, fill=(40, 40, 40))
    draw.text((x_after, 18), right, fill=(160, 20, 20))
    for r, (label, before, after) in enumerate(rows):
        y = head + r * (cell + 4)
        draw.text((4, y + cell // 2 - 6), label, fill=(0, 0, 0))
        for j in range(before.shape[0]):
            canvas.paste(_tile(before[j], cell), (label_w + j * (cell + 2), y))
        for j in range(after.shape[0]):
            canvas.paste(_tile(after[j], cell), (x_after + j * (cell + 2), y))
    return canvas


def save_png(img: Image.Image, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
