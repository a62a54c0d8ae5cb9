"""Attacks on an erasure (DESIGN.md section 2): each tries to make the erased model draw the concept again.

One attack per file; ATTACKS is the registry (registry.ATTACK_NAMES names them for config validation).
run_attack runs one on the erased model and, as the control, on the base model under the same settings and
seeds, and returns both results.
"""

from __future__ import annotations

from ..backends.base import Backend
from ..cache import ImageCache
from ..errors import ConfigError
from ..judges.probe import Judge
from ..judges.scorers import Scorer
from ..registry import ATTACK_NAMES
from .base import Attack, AttackResult
from .concept_vector import ConceptVectorAttack
from .inversion import InversionAttack
from .phrasings import PhrasingsAttack
from .prefix import PrefixAttack

__all__ = ["ATTACKS", "Attack", "AttackResult", "get_attack", "run_attack"]

ATTACKS: dict[str, type[Attack]] = {
    "inversion": InversionAttack,
    "prefix": PrefixAttack,
    "concept_vector": ConceptVectorAttack,
    "phrasings": PhrasingsAttack,
}
assert tuple(ATTACKS) == ATTACK_NAMES  # registry.py names them for config validation


def get_attack(name: str) -> type[Attack]:
    """The attack class registered as `name`; an unknown name lists the valid ones."""
    if name not in ATTACKS:
        raise ConfigError("attacks", f"unknown attack {name!r}; choose from {', '.join(ATTACKS)}")
    return ATTACKS[name]


def run_attack(name: str, backend: Backend, concept: str, kind: str, scorer: Scorer, judge: Judge | None = None,
               seed: int = 0, settings: dict | None = None, control: bool = True,
               cache: ImageCache | None = None) -> tuple[AttackResult, AttackResult | None]:  # fmt: skip
    """Attack the model as it is (erased), then the base model (inside `judge`) as the control.

    Args:
        judge: a context in which the model is the base model (e.g. LoRASet.disabled); the judge scores in
            it and the control runs in it. None: the backend is the base model, and the control is skipped
            (it would repeat the attack).
        settings: overrides of the attack's defaults (ATTACKS[name].defaults, scaled to the model).
    """
    attack = get_attack(name)(backend, concept, kind, scorer, judge, seed, settings, cache)
    attacked = attack.attack()
    return attacked, (attack.attack(control=True) if control and judge is not None else None)
