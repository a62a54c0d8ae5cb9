"""Node widget values -> EraseConfig, and the Attack Audit's attack list and settings. Pure Python: no ComfyUI
import, so it is tested without ComfyUI.

The node layer only turns what the user typed into lists; EraseConfig validates them (one place).
"""

from __future__ import annotations

import json
import re

# pack-relative import: inside ComfyUI the pack is a package whose name ComfyUI chooses, and surgun_core
# is not installed there, so the core is reached through the pack.
from ..surgun_core.config import EraseConfig, parse_list
from ..surgun_core.errors import ConfigError
from ..surgun_core.recipes import recipe_config
from ..surgun_core.registry import ATTACK_NAMES, AUTO_BLOCKS, BLOCK_PRESETS

MANUAL_BLOCKS = "manual"
BLOCK_CHOICES = [AUTO_BLOCKS, *BLOCK_PRESETS, MANUAL_BLOCKS]


def resolve_blocks(preset: str, manual: str | None) -> str:
    """The EraseConfig.blocks value for the node's block choice ("manual" takes the regular expression)."""
    if preset == MANUAL_BLOCKS:
        pattern = (manual or "").strip()
        if not pattern:
            raise ConfigError("blocks", "is 'manual' but the blocks_regex widget is empty; write a regular "
                              "expression over module names (e.g. attn2\\.to_k$) or pick a preset")  # fmt: skip
        try:
            re.compile(pattern)
        except re.error as e:
            raise ConfigError("blocks", f"{pattern!r} is not a valid regular expression ({e})") from e
        return pattern
    if preset not in BLOCK_CHOICES:
        raise ConfigError("blocks", f"unknown preset {preset!r}; choose one of {', '.join(BLOCK_CHOICES)}")
    return preset


def build_config(concepts: str, distractors: str = "", templates: str = "", family: str = "sd1", kind: str = "object",
                 **settings) -> EraseConfig:  # fmt: skip
    """EraseConfig from the Train node's widgets: the model family's recipe, then what the user set.

    A setting given as None (a widget left at 0, "the recipe's") keeps the recipe's value. An empty distractors
    or templates widget keeps the recipe's lists (the built-in ones for `kind`). An empty concepts widget is
    an error, raised by EraseConfig with the field named.
    """
    user = dict(settings, distractors=parse_list(distractors) or None, templates=parse_list_lines(templates) or None)
    return recipe_config(family, parse_list(concepts), kind, **user)


def recipe_value(value):
    """A numeric widget at 0 means "the recipe's value" (None); any other value is the user's."""
    return None if value == 0 else value


def parse_list_lines(text: str | None) -> list[str]:
    """Like parse_list but one entry per line only (templates may contain commas)."""
    if not text:
        return []
    lines = [ln.strip() for ln in text.splitlines()]
    return list(dict.fromkeys(ln for ln in lines if ln and not ln.startswith("#")))


ALL_ATTACKS = "all"


def parse_attacks(text: str | None) -> list[str]:
    """The Attack Audit node's `attacks` widget: "all" (or empty) for every registered attack, else names separated
    by commas or lines; an unknown name is refused with the valid ones."""
    names = parse_list(text or "")
    if not names or names == [ALL_ATTACKS]:
        return list(ATTACK_NAMES)
    unknown = [n for n in names if n not in ATTACK_NAMES]
    if unknown:
        raise ConfigError("attacks", f"unknown attack {unknown[0]!r}; write {ALL_ATTACKS} or some of "
                          f"{', '.join(ATTACK_NAMES)}")  # fmt: skip
    return names


def parse_attack_settings(text: str | None) -> dict[str, dict]:
    """The `attack_settings` widget: JSON {attack: {setting: value}} (attacks/<name>.py lists each attack's
    settings); empty: none. Setting names are checked by the attacks themselves."""
    if not (text or "").strip():
        return {}
    try:
        settings = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError("attack_settings", f"is not valid JSON ({e}); write e.g. "
                          '{"inversion": {"steps": 100}}') from e  # fmt: skip
    if not isinstance(settings, dict) or not all(isinstance(v, dict) for v in settings.values()):
        raise ConfigError("attack_settings", 'must map attack names to their settings, e.g. {"phrasings": '
                          '{"seeds_per_prompt": 1}}')  # fmt: skip
    return settings
