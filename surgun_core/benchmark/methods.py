"""The methods `surgun bench` compares: SurgUn, its ablations, and the baselines (ESD-x/-u, UCE, CA).

Each method erases one toy concept from the toy backend and returns a MethodRun whose `undo()` puts the
model back, so every method sees the same base model, concepts, seeds and probe prompts.
`method_signature()` names everything that decides a method's result (its settings and the source of the
code that runs it), so the bench can reuse a finished run and redo a stale one.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

from .. import lora, meter, objectives, recipes, sampling, surgun
from ..cache import ImageCache
from ..demo import toy_config
from ..engine import anchor, calibrate, data, learn_tokens, localize, robust, saliency, train
from ..engine.localize import clear_memory_cache
from ..errors import ConfigError
from ..judges import checkpoint, probe, scorers
from ..recipes import toy_templates
from ..surgun import erase
from ..toyworld.evaluate import concept_kind
from ..toyworld.world import COLOURS, SHAPES
from .baselines import BASELINES, _common, run_baseline


@dataclass
class MethodRun:
    seconds: float
    undo: Callable[[], None]
    settings: dict = field(default_factory=dict)
    calibration: object | None = None  # SurgUn: its CalibrationResult, drawn by the bench


# SurgUn ablations (the paper claims each part is needed): EraseConfig overrides on the toy recipe
ABLATIONS: dict[str, dict] = {
    "surgun": {},
    "surgun-no-distractors": {"use_distractors": False, "use_contrast": False, "use_ascent": True},
    "surgun-one-distractor": {"one_distractor": True},
    "surgun-no-contrast": {"use_contrast": False},
    "surgun-no-localization": {"blocks": "cross-attn-kv"},
    "surgun-no-calibration": {"calibrate": False},
    "surgun-robust": {"robust": True},  # robust mode: the recipe's robust settings and the adversary (robust.py)
    # the retain anchor on the prompts' tokens (engine/anchor.py, "text"): no denoiser forward a step; weight 1 is
    # about the output anchor's 300 in pull (README, method section, "The retain anchor on the prompts' tokens")
    "surgun-text-anchor": {"retain_anchor": "text", "w_retain": 1.0},
}
# each baseline at the best setting of its recorded sweep (sweep.py), beside the paper's setting
TUNED = {f"{b}-tuned": b for b in ("esd-x", "esd-u", "ca")}
METHODS = [*ABLATIONS, *BASELINES, *TUNED]
MAIN_METHODS = ["surgun", *BASELINES]
# the code each family of methods runs (its source is part of method_signature)
_SURGUN_CODE = (surgun, train, anchor, localize, saliency, calibrate, checkpoint, probe, scorers, data, lora,
                objectives, sampling, recipes, meter, robust, learn_tokens)  # fmt: skip
_BASELINE_CODE = (_common, objectives, sampling, meter)


def check_methods(names: list[str]) -> list[str]:
    bad = [n for n in names if n not in METHODS]
    if bad:
        raise ConfigError("methods", f"unknown method {bad[0]!r}; choose from {', '.join(METHODS)}")
    return list(dict.fromkeys(names))


@dataclass
class _Plan:
    """A method resolved for one concept: the EraseConfig (SurgUn methods) or the baseline's arguments."""

    name: str
    cfg: object | None = None
    baseline: dict | None = None
    base: str | None = None  # the baseline a tuned method runs

    def signature(self) -> dict:
        if self.cfg is not None:
            code, what = _SURGUN_CODE, {"erase_config": self.cfg.to_dict()}
        else:
            fn = BASELINES[self.base or self.name]
            mod = sys.modules[fn.__module__]
            code, what = (mod, *_BASELINE_CODE), {"arguments": self.baseline, "defaults": getattr(mod, "DEFAULTS", {})}
        return {"method": self.name, **what, "code": _code_digest(code)}


@functools.cache
def _code_digest(modules: tuple) -> str:
    """A digest of the modules' source (read once per process: every concept's signature asks again)."""
    return hashlib.sha256("".join(inspect.getsource(m) for m in modules).encode()).hexdigest()[:16]


def _plan(name: str, concept: str, quick: bool, seed: int, overrides: dict | None) -> _Plan:
    overrides = dict(overrides or {})
    b_its, b_lr = overrides.pop("baseline_iterations", None), overrides.pop("baseline_lr", None)
    tuned = overrides.pop("tuned", {})
    if name in TUNED:  # the paper's baseline at its sweep's best learning rate and iterations
        best = tuned.get(TUNED[name])
        if best is None:
            raise ConfigError("methods", f"{name} runs {TUNED[name]} at the best setting of its sweep, and there is "
                              "none yet: run `surgun bench --sweep --out DIR` first (same --out)")  # fmt: skip
        base = {"baseline_iterations": best["iterations"], "baseline_lr": best["lr"],
                "baseline_options": overrides.get("baseline_options", {})}  # fmt: skip
        plan = _plan(TUNED[name], concept, quick, seed, base)
        return _Plan(name, baseline=plan.baseline, base=TUNED[name])
    b_opts = overrides.pop("baseline_options", {}).get(name, {})
    kind = concept_kind(concept)
    pool = SHAPES if kind == "object" else COLOURS
    others = [c for c in pool if c != concept]
    if name in ABLATIONS:
        ablation = dict(ABLATIONS[name])
        if ablation.pop("one_distractor", False):
            ablation.update(distractors=others[:1], distractors_per_step=1)
        return _Plan(name, cfg=toy_config(concept, seed=seed, **{**overrides, **ablation}))
    check_methods([name])
    quick_its = {"esd-x": 100, "esd-u": 100} if quick else {}
    if quick and name == "ca":  # its 200 anchor images at 50 steps are most of its time
        b_opts = {"n_images": 48, "sample_steps": 20, **b_opts}
    its = b_its if b_its is not None and name != "uce" else quick_its.get(name)
    args = dict(templates=toy_templates(kind), preserve=others, anchor=others[0], seed=seed, iterations=its,
                lr=b_lr if name != "uce" else None, **b_opts)  # fmt: skip
    return _Plan(name, baseline=args)


def method_signature(name: str, concept: str, *, quick: bool = False, seed: int = 0,
                     overrides: dict | None = None) -> dict:  # fmt: skip
    """Everything that decides `name`'s erase of `concept`: its settings and a digest of its code's source."""
    return _plan(name, concept, quick, seed, overrides).signature()


def run_method(name: str, backend, concept: str, *, quick: bool = False, seed: int = 0, progress=None,
               overrides: dict | None = None) -> MethodRun:  # fmt: skip
    """Erase `concept` from the toy `backend` with method `name`; undo() restores the base model.

    Args:
        overrides: smaller runs (tests): EraseConfig settings for SurgUn methods; "baseline_iterations",
            "baseline_lr" and "baseline_options" ({method: options}) for the baselines. None: the toy recipe and
            the papers' defaults.
    """
    plan = _plan(name, concept, quick, seed, overrides)
    clear_memory_cache()  # every method pays for its own localization; ImageCache(None) below: no disk cache
    if plan.cfg is not None:
        cfg = plan.cfg
        res = erase(backend, cfg, progress=progress, cache=ImageCache(None))
        settings = {"steps": cfg.steps, "lr": cfg.lr, "blocks": res.delta.metadata["surgun.blocks"],
                    "step_chosen": int(res.delta.metadata["surgun.step_chosen"])}  # fmt: skip
        return MethodRun(res.seconds, res.lora.detach, settings, res.calibration)
    res = run_baseline(plan.base or name, backend, concept, progress=progress, **plan.baseline)
    return MethodRun(res.seconds, res.restore, dict(res.settings))
