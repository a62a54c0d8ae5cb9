"""`surgun erase`: the family's recipe, then the --config file, then the flags given; one core call."""

from __future__ import annotations

import logging
from pathlib import Path

from ..config import EraseConfig
from ..errors import ConfigError
from ..io import check_writable
from ..plan import format_plan, plan_erase
from ..recipes import family_of, recipe_config
from ..surgun import erase
from .common import load_backend, read_settings, wrote
from .progress import TqdmProgress

log = logging.getLogger(__name__)

FLAGS = ("kind", "steps", "lr", "rank", "alpha", "blocks", "seed", "device", "precision", "robust")


def settings_from(a) -> dict:
    """What the user set: the --config file's settings, then the flags that were given (None: not given)."""
    settings = read_settings(a.config) if a.config else {}
    settings["concepts"] = a.concept
    settings.update({k: getattr(a, k) for k in FLAGS if getattr(a, k) is not None})
    if a.distractor:
        settings["distractors"] = a.distractor
    return settings


def erase_config(settings: dict, backend) -> EraseConfig:
    """The model family's recipe, then the user's settings (from settings_from)."""
    settings = dict(settings)
    concepts, kind = settings.pop("concepts"), settings.pop("kind", "object")
    return recipe_config(family_of(backend), concepts, kind, **settings)


def run(a) -> int:
    settings = settings_from(a)
    EraseConfig.from_dict(settings)  # what the user set is checked before any work (the recipe fills the rest)
    if a.out is None and not a.plan:
        raise ConfigError("out", "give the delta file to write (--out NAME.safetensors), or --plan for the cost only")
    out = Path(a.out or "plan.safetensors")  # --plan writes nothing
    if out.suffix != ".safetensors":
        raise ConfigError("out", f"{out.name!r}: the delta file must end in .safetensors")
    if not a.plan:
        check_writable(out, "out")  # a bad --out fails now, not after the whole erase
    backend = load_backend(a.model, config=a.model_config, device=settings.get("device", "auto"),
                           precision=settings.get("precision", "float32"))  # fmt: skip
    cfg = erase_config(settings, backend)
    if a.plan:  # the cost before any work: nothing is trained or written
        print(format_plan(plan_erase(backend, cfg, time_it=a.time or None)))
        return 0
    with TqdmProgress() as bar:
        result = erase(backend, cfg, progress=bar)
    written = result.delta.write(out)  # a late failure (disk full) is one line: io.WriteError
    print(f"{wrote(written)}: {len(result.delta.weights)} layers, {result.steps_done} steps, {result.seconds:.1f} s, "
          f"{result.forwards:,} sample-forwards, recipe {cfg.recipe}")  # fmt: skip
    for line in result.notes():
        print(line)
    return 0
