"""Charts as PIL images (no plotting dependency): the calibration curve and the localization ranking."""

from __future__ import annotations

import os

from PIL import Image, ImageDraw

from .engine.calibrate import CalibrationResult
from .engine.localize import LocalizeResult
from .grid import save_png

ERASE, RETAIN, CHOSEN, THRESHOLD = (200, 30, 30), (30, 80, 200), (20, 130, 60), (150, 150, 150)


def plot_curve(result: CalibrationResult, path: str | os.PathLike | None = None, title: str = "") -> Image.Image:
    """Erase (red) and retain (blue) against step, the threshold dashed, the chosen step marked."""
    w, h, left, right, top, bottom = 520, 310, 48, 16, 46, 36
    img = Image.new("RGB", (w, h), (252, 252, 252))
    d = ImageDraw.Draw(img)
    steps = [r["step"] for r in result.curve] or [0]
    s0, s1 = min(steps), max(steps)
    span = max(1, s1 - s0)

    def xy(step: float, v: float) -> tuple[float, float]:
        return left + (step - s0) / span * (w - left - right), top + (1 - v) * (h - top - bottom)

    d.rectangle([left, top, w - right, h - bottom], outline=(180, 180, 180))
    for v in (0.0, 0.5, 1.0):
        d.text((6, xy(s0, v)[1] - 6), f"{v:.1f}", fill=(90, 90, 90))
    for i in range(left, w - right, 8):  # dashed threshold line
        y = xy(s0, result.threshold)[1]
        d.line([i, y, i + 4, y], fill=THRESHOLD)
    for key, colour in (("erase", ERASE), ("retain", RETAIN)):
        pts = [xy(r["step"], r[key]) for r in result.curve]
        if len(pts) > 1:
            d.line(pts, fill=colour, width=2)
        for x, y in pts:
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
    cx = xy(result.chosen_step, 0)[0]
    d.line([cx, top, cx, h - bottom], fill=(20, 150, 60), width=1)
    label = f"chosen: step {result.chosen_step}"
    d.text((cx + 3 if cx < w - right - 100 else cx - 100, top + 2), label, fill=(20, 120, 50))  # inside the frame
    d.text((left, h - bottom + 6), f"step {s0}", fill=(90, 90, 90))
    d.text((w - right - 60, h - bottom + 6), f"step {s1}", fill=(90, 90, 90))
    key_x = w // 2 - 80  # the colour key, under any title
    for text, colour in (("erase", ERASE), ("retain", RETAIN), ("threshold (dashed)", THRESHOLD)):
        d.text((key_x, h - bottom + 6), text, fill=colour)
        key_x += d.textlength(text) + 12
    d.text((left, 6), title or "SurgUn calibration", fill=(0, 0, 0))
    for i, line in enumerate(_wrap(d, result.reason, w - left - right)[:2]):  # the rule's reason, in full
        d.text((left, 18 + 12 * i), line, fill=(60, 60, 60))
    if path is not None:
        save_png(img, path)
    return img


def plot_groups(result: LocalizeResult, path: str | os.PathLike | None = None) -> Image.Image:
    """One row per candidate block group: its gradient share (red), or its short run's erase (red) and retain
    (blue) bars; chosen groups marked."""
    rows = result.groups
    keys = (("share", ERASE),) if rows and "share" in rows[0] else (("erase", ERASE), ("retain", RETAIN))
    what = "share of the loss's Adam gain" if len(keys) == 1 else "erase (red) and retain (blue) of a short run"
    label_w, bar_w, row_h, top = 170, 300, 26, 40
    img = Image.new("RGB", (label_w + bar_w + 70, top + row_h * max(1, len(rows)) + 10), (252, 252, 252))
    d = ImageDraw.Draw(img)
    d.text((8, 6), f"SurgUn localization: {what} per block group", fill=(0, 0, 0))
    d.text((8, 20), "chosen: " + (", ".join(result.chosen) or "none"), fill=CHOSEN)
    for i, r in enumerate(rows):
        y = top + i * row_h
        chosen = r["name"] in result.chosen
        d.text((8, y + 6), ("* " if chosen else "  ") + r["name"], fill=CHOSEN if chosen else (0, 0, 0))
        for j, (key, colour) in enumerate(keys):
            yy = y + 3 + j * 10
            d.rectangle([label_w, yy, label_w + bar_w * r[key], yy + 8], fill=colour)
            d.text((label_w + bar_w + 6, yy - 2), f"{r[key]:.2f}", fill=colour)
    if path is not None:
        save_png(img, path)
    return img


def _wrap(d: ImageDraw.ImageDraw, text: str, width: float) -> list[str]:
    """Words of `text` in lines no wider than `width` pixels in the default font."""
    lines, cur = [], ""
    for word in text.split():
        trial = f"{cur} {word}".strip()
        if cur and d.textlength(trial) > width:
            lines.append(cur)
            cur = word
        else:
            cur = trial
    return [*lines, cur] if cur else lines
