"""Cache of training images the frozen model generated, keyed by (model fingerprint, prompt, seed, settings).

In memory always; on disk too when a folder is given (SURGUN_CACHE or the caller's choice), as one small
safetensors file per image, written atomically. A hit needs the exact same base weights (fingerprint).
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .io import atomic_path

log = logging.getLogger(__name__)


def default_cache_dir() -> Path | None:
    env = os.environ.get("SURGUN_CACHE")
    if env == "":
        return None
    return Path(env) if env else Path.home() / ".cache" / "surgun" / "images"


class ImageCache:
    def __init__(self, folder: Path | None = None) -> None:
        self.folder = folder
        self._mem: dict[str, torch.Tensor] = {}

    @staticmethod
    def key(fingerprint: str, prompt: str, seed: int, steps: int, guidance: float) -> str:
        raw = f"{fingerprint}|{prompt}|{seed}|{steps}|{guidance:.4f}"
        return hashlib.sha256(raw.encode()).hexdigest()[:32]

    def get(self, key: str) -> torch.Tensor | None:
        if key in self._mem:
            return self._mem[key]
        if self.folder is not None:
            f = self.folder / f"{key}.safetensors"
            if f.is_file():
                try:
                    self._mem[key] = load_file(str(f))["x0"]
                    return self._mem[key]
                except Exception as e:  # a damaged cache entry is regenerated, never trusted
                    log.warning("ignoring damaged cache file %s (%s)", f, e)
        return None

    def put(self, key: str, x0: torch.Tensor) -> None:
        x0 = x0.detach().cpu().contiguous()
        self._mem[key] = x0
        if self.folder is not None:
            with atomic_path(self.folder / f"{key}.safetensors") as tmp:
                save_file({"x0": x0}, str(tmp))
