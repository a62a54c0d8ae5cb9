"""Effort presets for the front ends with a form (the A1111/Forge tab, `surgun ui`).

A preset scales the recipe of the host's model family (surgun_core.recipes) rather than fixing numbers, so
"quick" means half the work on any model and "balanced" is the recipe itself. Advanced settings the
user fills in win over the preset.
"""

from __future__ import annotations

from surgun_core.config import EraseConfig
from surgun_core.errors import ConfigError

# name -> (multiplier on steps, localize_steps and images_per_concept; extra settings)
PRESETS: dict[str, tuple[float, dict]] = {
    "quick": (0.5, {}),
    "balanced": (1.0, {}),  # the SurgUn recipe as it is
    "thorough": (2.0, {"probe_seeds": 6, "localize_probe_seeds": 6}),
}
SCALED = ("steps", "localize_steps", "images_per_concept")


def preset_settings(name: str, base: dict) -> dict:
    """The settings of preset `name` over `base` (EraseConfig keyword arguments; EraseConfig defaults fill gaps)."""
    if name not in PRESETS:
        raise ConfigError("preset", f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    factor, extra = PRESETS[name]
    defaults = EraseConfig.__dataclass_fields__
    out = dict(base)
    for key in SCALED:
        value = base.get(key, defaults[key].default)
        out[key] = max(1, round(value * factor))
    out.update(extra)
    return out
