"""`surgun erase`: the family's recipe, then the --config file, then the flags given; one core call."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..backends.diffusers import load_diffusers_folder
from ..config import EraseConfig
from ..errors import ConfigError
from ..recipes import family_of, recipe_config
from ..surgun import erase
from .progress import TqdmProgress

log = logging.getLogger(__name__)

FLAGS = ("kind", "steps", "lr", "rank", "alpha", "blocks", "seed", "device", "precision")


def settings_from(a) -> dict:
    """What the user set: the --config file's settings, then the flags that were given (None: not given)."""
    settings = json.loads(Path(a.config).read_text()) if a.config else {}
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
    out = Path(a.out)
    if out.suffix != ".safetensors":
        raise ConfigError("out", f"{out.name!r}: the delta file must end in .safetensors")
    backend = load_diffusers_folder(a.model, device=settings.get("device", "auto"),
                                    precision=settings.get("precision", "float32"))  # fmt: skip
    cfg = erase_config(settings, backend)
    with TqdmProgress() as bar:
        result = erase(backend, cfg, progress=bar)
    result.delta.save(out)
    print(f"wrote {out} ({len(result.delta.weights)} layers, {result.steps_done} steps, {result.seconds:.1f} s, "
          f"{result.forwards:,} sample-forwards, recipe {cfg.recipe})")  # fmt: skip
    if result.stopped:
        print(f"note: {result.stopped}")
    return 0
