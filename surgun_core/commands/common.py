"""What the commands share: the one place a model is loaded, reading --config files, and writing outputs."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from ..backends.base import Backend, resolve_device
from ..backends.single_file import load_model
from ..errors import ConfigError
from ..io import Written, atomic_path, write_failure
from ..toyworld import load_toy_backend

TOY_MODEL = "toy"  # --model toy: the embedded toy model (a folder named toy: write ./toy)


def load_backend(path: str | os.PathLike, device: str = "auto", precision: str = "float32",
                 config: str | os.PathLike | None = None) -> Backend:  # fmt: skip
    """The model every command works on: `toy` is the embedded toy model (on the CPU unless a device is
    named), anything else a diffusers model folder or a single-file .safetensors checkpoint
    (SD1.x/2.x/SDXL). The device is checked first, before minutes of loading."""
    resolve_device(device)
    if str(path) == TOY_MODEL:
        return load_toy_backend("cpu" if device == "auto" else device, precision)
    # a diffusers folder or a single .safetensors; `config`: a diffusers folder describing a non-standard single file
    return load_model(path, device=device, precision=precision, config=config)


def read_settings(path: str | os.PathLike, field: str = "config") -> dict:
    """A JSON file of EraseConfig settings, as a dict; a missing, unreadable or malformed file, or one that
    holds no JSON object, is a ConfigError naming `field`, the file and (for bad JSON) the line and column."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(field, f"{p} does not exist; give the path of a JSON file of settings, "
                          'e.g. {"steps": 100, "calibrate": false}') from None  # fmt: skip
    except IsADirectoryError:
        raise ConfigError(field, f"{p} is a folder; give the path of a JSON file of settings") from None
    except UnicodeDecodeError as e:
        raise ConfigError(field, f"{p} is not a text file ({e.reason}); give a JSON file of settings") from None
    except OSError as e:
        raise ConfigError(field, f"cannot read {p} ({e.strerror}); check that you may read it") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        where = f"line {e.lineno}, column {e.colno}"
        raise ConfigError(field, f"{p} is not valid JSON: {e.msg} at {where}; fix it (keys and text in double "
                          "quotes, no trailing commas, true/false in lower case)") from None  # fmt: skip
    if not isinstance(data, dict):
        raise ConfigError(field, f"{p} holds a JSON {_json_type(data)}; it must hold one object of settings, "
                          'e.g. {"steps": 100, "kind": "style"}')  # fmt: skip
    return data


def _json_type(v) -> str:
    names = {list: "list", str: "string", bool: "true/false", int: "number", float: "number", type(None): "null"}
    return names.get(type(v), type(v).__name__)


def write_output(path: str | os.PathLike, write: Callable[[Path], None], field: str = "out") -> Written:
    """Write one output atomically through `write(temp_path)`; a late failure (disk full) is one clear line."""
    writer = atomic_path(path)
    try:
        with writer as tmp:
            write(tmp)
    except OSError as e:
        raise write_failure(path, field, e) from e
    return Written(Path(path), writer.replaced)


def wrote(w: Written) -> str:
    """ "wrote X", and whether X replaced an existing file (two runs writing one --out: the later one says so)."""
    return f"wrote {w.path}" + (" (replaced an existing file)" if w.replaced else "")
