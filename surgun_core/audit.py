"""The audit (DESIGN.md section 2, orchestrator): does an erasure survive attack? Model + delta -> report + grid.

Each attack of attacks/ runs on the erased model and, as the control, on the base model (the delta switched
off) with the same settings and seeds. An erasure holds against an attack when its recovery is low while the
control is high; a low control means the attack could not find the concept even before the erasure, and says
nothing. The report's JSON goes into a delta's header (`surgun.audit`) when an audit runs after training.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image

from . import __version__
from .attacks import AttackResult, get_attack, run_attack
from .attacks.prompts import is_toy
from .backends.base import Backend
from .cache import ImageCache
from .engine.train import Cancel, Progress
from .errors import Cancelled, ConfigError
from .grid import before_after_grid
from .judges.probe import Judge
from .judges.scorers import Scorer, make_scorer
from .lora import LoraDelta, LoRASet
from .registry import ATTACK_NAMES

log = logging.getLogger(__name__)

GRID_IMAGES = 8  # attacked images shown per row (each side)


@dataclass
class AuditReport:
    concept: str
    kind: str
    seed: int
    scorer: str
    architecture: str
    fingerprint: str
    results: dict[str, tuple[AttackResult, AttackResult | None]] = field(default_factory=dict)  # (erased, control)
    seconds: float = 0.0

    @property
    def recovery(self) -> dict[str, float]:
        return {name: r.recovery for name, (r, _) in self.results.items()}

    @property
    def forwards(self) -> int:
        return sum(r.forwards + (c.forwards if c else 0) for r, c in self.results.values())

    def to_dict(self, prompts: bool = True) -> dict:
        """JSON-ready: per attack recovery, control, settings, forwards and seconds; `prompts`: the prompts too."""
        attacks = {}
        for name, (r, c) in self.results.items():
            both = [r] + ([c] if c else [])
            entry = {"recovery": r.recovery, "control": c.recovery if c else None, "settings": _jsonable(r.settings),
                     "forwards": sum(x.forwards for x in both), "seconds": round(sum(x.seconds for x in both), 2),
                     "erased": r.to_dict(), "base": c.to_dict() if c else None}  # fmt: skip
            if not prompts:
                for side in ("erased", "base"):
                    if entry[side]:
                        entry[side].pop("prompts")
            attacks[name] = entry
        worst = max(self.recovery, key=self.recovery.get) if self.results else None
        return {"concept": self.concept, "kind": self.kind, "seed": self.seed, "scorer": self.scorer,
                "architecture": self.architecture, "base_fingerprint": self.fingerprint,
                "max_recovery": self.recovery[worst] if worst else None, "worst_attack": worst,
                "attacks": attacks, "forwards": self.forwards, "seconds": round(self.seconds, 2),
                "surgun_version": __version__}  # fmt: skip

    def grid(self, per_row: int = GRID_IMAGES) -> Image.Image:
        """One row per attack: the attack on the base model (left) and on the erased model (right)."""
        rows = []
        for name, (r, c) in self.results.items():
            idx = _shown(r, per_row)
            label = f"{name}: {r.recovery:.0%}" + (f" (base {c.recovery:.0%})" if c else "")
            base = c.images[idx] if c is not None else torch.zeros_like(r.images[idx])
            rows.append((label, base, r.images[idx]))
        return before_after_grid(rows, title=f"SurgUn audit: {self.concept!r}, share of attacked images judged as it")


def run_audit(
    backend: Backend,
    lora_or_delta: LoRASet | LoraDelta | None,
    concept: str,
    kind: str,
    attacks: Sequence[str] = ATTACK_NAMES,
    scorer: Scorer | None = None,
    judge: Judge | None = None,
    seed: int = 0,
    settings: dict[str, dict] | None = None,
    cache: ImageCache | None = None,
    progress: Progress | None = None,
    cancel: Cancel | None = None,
) -> AuditReport:
    """Attack the erased model with each of `attacks` and the base model as the control.

    Args:
        lora_or_delta: the erasure: a LoRASet (attached if it is not, and left attached: the caller owns it) or
            a LoraDelta (attached for the audit, detached after); None: the backend is the erased model already
            (e.g. a ComfyUI MODEL with the erasure in its weight patches) and `judge` switches it to the base.
        scorer: who judges the images; default: the toy classifier on the toy world, else the diffusion judge.
        judge: a context in which the model is the base model; default: the erasure's LoRA switched off.
        settings: per attack name, overrides of its settings (attacks/<name>.py documents them).
    """
    names = list(attacks)
    for n in [*names, *(settings or {})]:
        get_attack(n).settings_for(backend, (settings or {}).get(n, {}))  # unknown names, keys: refused before work
    if not names:
        raise ConfigError("attacks", f"no attack chosen; choose from {', '.join(ATTACK_NAMES)}")
    if lora_or_delta is None and judge is None:
        raise ConfigError("delta", "an audit needs the erasure (a LoRASet or LoraDelta) or, for a model erased "
                          "already, a judge context in which it is the base model")  # fmt: skip
    t0 = time.time()
    with _erasure(backend, lora_or_delta) as lora:
        judge = judge or lora.disabled
        scorer = scorer or make_scorer("toy" if is_toy(backend) else "diffusion", backend, kind)
        with judge():  # the base model's fingerprint, whatever the erasure does to the weights
            fingerprint = backend.fingerprint()
        report = AuditReport(concept, kind, seed, scorer.name, backend.architecture, fingerprint)
        for i, name in enumerate(names):
            if cancel is not None and cancel():
                raise Cancelled("audit cancelled by the user; nothing was written")
            if progress is not None:
                progress("audit", i, len(names), {"attack": name})
            report.results[name] = run_attack(name, backend, concept, kind, scorer, judge, seed,
                                              (settings or {}).get(name), cache=cache)  # fmt: skip
        if progress is not None:
            progress("audit", len(names), len(names), {})
    report.seconds = time.time() - t0
    return report


def audit_metadata(report: AuditReport) -> dict[str, str]:
    """The delta header entry of an audit (DESIGN.md section 4): `surgun.audit`, the report's JSON."""
    return {"surgun.audit": json.dumps(report.to_dict(prompts=False))}


@contextlib.contextmanager
def _erasure(backend: Backend, lora_or_delta: LoRASet | LoraDelta | None):
    """The erasure attached to `backend` for the audit; what this attached is detached after. None: nothing to
    attach (the backend is the erased model itself)."""
    if lora_or_delta is None:
        yield None
        return
    if isinstance(lora_or_delta, LoraDelta):
        lora = lora_or_delta.to_lora_set(backend.attention_linears()).attach()
        try:
            yield lora
        finally:
            lora.detach()
        return
    if not isinstance(lora_or_delta, LoRASet):
        raise ConfigError("delta", f"an audit needs the erasure as a LoRASet or LoraDelta, got "
                          f"{type(lora_or_delta).__name__}")  # fmt: skip
    yield lora_or_delta.attach()  # a no-op when attached (erase() leaves it so); the caller owns it after


def _shown(r: AttackResult, n: int) -> list[int]:
    """Which of an attack's images the grid shows: n spread over them (over the best group's, for a sweep)."""
    best = r.details.get("best")
    pool = [i for i, g in enumerate(r.groups or []) if g == best] if best else list(range(len(r.prompts)))
    step = max(1, len(pool) // n)
    return pool[::step][:n]


def _jsonable(settings: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()}


def delta_concept(delta: LoraDelta, concept: str | None, kind: str | None) -> tuple[str, str]:
    """The concept and kind to attack: the flags, else the delta's header (surgun.concepts, surgun.kind)."""
    concepts = json.loads(delta.metadata.get("surgun.concepts", "[]") or "[]")
    concept = concept or (concepts[0] if concepts else None)
    if not concept:
        raise ConfigError("concept", "the delta's header names no concept; give --concept (the erased concept)")
    return concept, kind or delta.metadata.get("surgun.kind") or "object"
