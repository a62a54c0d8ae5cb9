"""Recovery columns of `surgun bench --attacks`: how much of an erased concept each attack brings back.

Every method's erased model is attacked with the same attacks, seeds and settings (attacks/, scaled to the
toy world), judged by the ground-truth classifier; the base model under the same attacks is the control,
computed once per concept and recorded like the runs (runs/<concept>/control.json), so it is reused.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

from .. import attacks as attack_package
from ..attacks import run_attack
from ..judges.scorers import ToyScorer
from ..toyworld.evaluate import concept_kind
from .methods import _code_digest


def recovery(backend, concept: str, attacks: tuple[str, ...], clf, seed: int = 0) -> dict[str, float]:
    """{"recovery_<attack>": share of attacked images the classifier sees as `concept`} for the model as it is."""
    scorer, kind = ToyScorer(backend, clf), concept_kind(concept)
    return {f"recovery_{a}": run_attack(a, backend, concept, kind, scorer, None, seed, control=False)[0].recovery
            for a in attacks}  # fmt: skip


def attack_code() -> str:
    """A digest of the attacks' source: part of every record key when the bench attacks."""
    mods = tuple(m for name, m in sorted(sys.modules.items()) if name.startswith(attack_package.__name__ + "."))
    return _code_digest((attack_package, *mods))


def control(backend, concept: str, attacks: tuple[str, ...], clf, out: Path, fresh: bool = False) -> dict:
    """The base model's recovery under the attacks (the control), from its record when the key matches."""
    key = hashlib.sha256(json.dumps([attacks, backend.fingerprint(), attack_code()]).encode()).hexdigest()[:32]
    path = out / "runs" / concept / "control.json"
    if not fresh and path.is_file():
        rec = json.loads(path.read_text())
        if rec.get("key") == key:
            return rec["control"]
    rec = {"key": key, "control": recovery(backend, concept, attacks, clf)}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rec, indent=2) + "\n")
    return rec["control"]
