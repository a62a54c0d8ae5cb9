"""`surgun probe`: a delta's before/after grid (PNG) and the judge's erase/retain scores (JSON); one core call."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ConfigError
from ..io import check_writable
from ..lora import LoraDelta
from ..probe_report import probe_delta
from .common import load_backend, write_output, wrote
from .progress import TqdmProgress


def run(a) -> int:
    if a.delta and not Path(a.delta).is_file():
        raise ConfigError("delta", f"{a.delta} does not exist; give the .safetensors delta that `surgun erase` wrote")
    if a.seeds < 1:
        raise ConfigError("seeds", f"must be a whole number >= 1, got {a.seeds}")
    out = check_writable(a.out, "out", folder=True)  # before any work
    json_path = check_writable(a.json, "json") if a.json else None
    backend = load_backend(a.model, a.device, a.precision, a.model_config)
    delta = LoraDelta.load(a.delta, list(backend.attention_linears())) if a.delta else None
    with TqdmProgress() as bar:
        report = probe_delta(backend, delta, a.strength, a.concept, a.kind, a.prompt or (), a.seeds,
                             retained=a.retain, scorer=a.scorer, progress=bar)  # fmt: skip
    stem = f"{Path(a.delta).stem}-probe" if a.delta else "base-probe"
    grid_path, json_path = out / f"{stem}.png", json_path or out / f"{stem}.json"
    scores = {"model": str(a.model), "delta": a.delta, **report.scores, "grid": str(grid_path)}
    written = [write_output(grid_path, lambda tmp: report.grid.save(tmp, format="PNG")),
               write_output(json_path, lambda tmp: tmp.write_text(json.dumps(scores, indent=2) + "\n"),
                            "json" if a.json else "out")]  # fmt: skip
    print(_table(report.scores))
    for w in written:
        print(wrote(w))
    return 0


def _table(s: dict) -> str:
    """The scores as a few aligned lines: before, and after the delta at its strength."""
    lines = [f"probe of {', '.join(s['concepts'])} ({s['kind']}); retained: {', '.join(s['retained'])}; "
             f"judge: {s['scorer']}, {len(s['seeds'])} seed(s) per prompt",
             "            erase   retain  h"]  # fmt: skip
    for name in ("before", "after"):
        if s[name] is not None:
            label = name if name == "before" else f"after x{s['strength']:g}"
            lines.append(f"  {label:<9} {s[name]['erase']:.3f}   {s[name]['retain']:.3f}   {s[name]['h']:.3f}")
    for prompt, v in s["prompts"].items():
        after = "" if v["after"] is None else f" -> {v['after']:.2f}"
        lines.append(f"  {prompt!r}: judged as an erased concept {v['before']:.2f}{after}")
    lines.append(f"  {s['forwards']:,} denoiser sample-forwards, {s['seconds']:.1f} s")
    return "\n".join(lines)
