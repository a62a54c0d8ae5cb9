"""Errors that front ends show to users as they are: each says what is wrong and what to do."""

from __future__ import annotations


class SurgUnError(Exception):
    """Base class of every error SurgUn raises on purpose."""


class ConfigError(SurgUnError, ValueError):
    """A setting is invalid. `field` names the setting so a UI can highlight it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class DeltaFormatError(SurgUnError, ValueError):
    """A delta file cannot be read (not safetensors, truncated, a pickle, missing tensors)."""


class DeltaMismatchError(SurgUnError, ValueError):
    """A delta does not fit the model it is applied to (other architecture, other shapes)."""


class Cancelled(SurgUnError):
    """The user stopped a run; nothing was written."""
