"""`surgun audit`: attack an erasure from its files alone (model + delta) -> JSON report and image grid."""

from __future__ import annotations

from pathlib import Path

from ..audit import delta_concept, run_audit
from ..errors import ConfigError
from ..grid import save_png
from ..io import check_writable, write_json
from ..lora import LoraDelta
from ..registry import ATTACK_NAMES
from .common import load_backend
from .progress import TqdmProgress


def run(a) -> int:
    if not Path(a.delta).is_file():
        raise ConfigError("delta", f"{a.delta} does not exist; give the erasure LoRA (.safetensors) to audit")
    out = Path(a.out)
    check_writable(out / "audit.json", "out")  # before minutes of attacks
    backend = load_backend(a.model, a.device, a.precision, a.model_config)
    delta = LoraDelta.load(a.delta, list(backend.attention_linears()))
    concept, kind = delta_concept(delta, a.concept, a.kind)
    with TqdmProgress() as bar:
        report = run_audit(backend, delta, concept, kind, attacks=a.attack or ATTACK_NAMES, seed=a.seed, progress=bar)
    data = report.to_dict()
    json_path = write_json(Path(a.json) if a.json else out / f"audit-{Path(a.delta).stem}.json", data)
    grid_path = out / f"audit-{Path(a.delta).stem}.png"
    save_png(report.grid(), grid_path)
    print(f"audit of {Path(a.delta).name}: erasing {concept!r} ({kind}); share of attacked images judged as it")
    print("  attack           erased   base (control)   forwards")
    for name, e in data["attacks"].items():
        ctrl = "-" if e["control"] is None else f"{e['control']:.0%}"
        print(f"  {name:<15}  {e['recovery']:>6.0%}   {ctrl:>14}   {e['forwards']:>9,}")
    print(f"  worst: {data['worst_attack']} ({data['max_recovery']:.0%})\n  report: {json_path}\n  grid:   {grid_path}")
    return 0
