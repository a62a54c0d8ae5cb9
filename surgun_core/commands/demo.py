"""`surgun demo`: erase a toy concept and print what was measured."""

from __future__ import annotations

from ..demo import run_demo
from .progress import TqdmProgress

MEANINGS = (
    ("ua", "erased concept no longer drawn"),
    ("ira", "other concepts of that kind kept"),
    ("cra", "the other kind kept"),
    ("h", "harmonic mean of UA, IRA, CRA"),
    ("spread", "erased prompts spread over the others (1 even, 0 one proxy)"),
    ("drift", "mean pixel change on retain prompts"),
)


def run(a) -> int:
    overrides = {"steps": a.steps} if a.steps else {}
    if a.robust:
        overrides["robust"] = True
    with TqdmProgress() as bar:
        r = run_demo(a.concept, a.out, a.json, seeds_per_pair=a.seeds, progress=bar, audit=a.audit or a.robust,
                     **overrides)  # fmt: skip
    print(f"\nSurgUn demo: erased {r['concept']!r} from the toy model in {r['seconds']:.1f} s "
          f"(peak memory {r['peak_mem_mb']:.0f} MB, {r['forwards']:,} denoiser sample-forwards)")  # fmt: skip
    print("  metric  value   meaning")
    for k, meaning in MEANINGS:
        print(f"  {k:<6}  {r[k]:.3f}   {meaning}")
    for name, e in r.get("audit", {}).items():
        print(f"  attack {name:<15} brings back {e['recovery']:.0%} (base model: {e['control']:.0%})")
    print(f"  delta: {r['delta']}\n  grid:  {r['grid']}")
    return 0
