"""Node widget values -> EraseConfig. Pure Python: no ComfyUI import, so it is tested without ComfyUI.

The node layer only turns what the user typed into lists; EraseConfig validates them (one place).
"""

from __future__ import annotations

import re

# pack-relative import: inside ComfyUI the pack is a package whose name ComfyUI chooses, and surgun_core
# is not installed there, so the core is reached through the pack.
from ..surgun_core.config import EraseConfig, parse_list
from ..surgun_core.errors import ConfigError
from ..surgun_core.registry import AUTO_BLOCKS, BLOCK_PRESETS

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


def build_config(concepts: str, distractors: str = "", templates: str = "", **settings) -> EraseConfig:
    """EraseConfig from the Train node's text widgets and plain settings (kind, steps, lr, rank, seed, ...).

    An empty distractors or templates widget means the built-in list for `kind`. An empty concepts widget
    is an error, raised by EraseConfig with the field named.
    """
    tpl = parse_list_lines(templates)
    return EraseConfig(
        concepts=parse_list(concepts),
        distractors=parse_list(distractors) or None,
        templates=tpl or None,
        **settings,
    )


def parse_list_lines(text: str | None) -> list[str]:
    """Like parse_list but one entry per line only (templates may contain commas)."""
    if not text:
        return []
    lines = [ln.strip() for ln in text.splitlines()]
    return list(dict.fromkeys(ln for ln in lines if ln and not ln.startswith("#")))
