"""The standalone host of `surgun ui`: the shipped toy model, or any diffusers model folder."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from surgun_core.backends.base import Backend
from surgun_core.backends.diffusers import load_diffusers_folder
from surgun_core.errors import ConfigError
from surgun_core.recipes import family_of
from surgun_core.toyworld import load_toy_backend
from surgun_core.toyworld.evaluate import concept_kind

from .session import Host

log = logging.getLogger(__name__)


class StandaloneHost(Host):
    """Loads its model once, on first use; LoRA files go to `lora_dir` (created when the first one is saved)."""

    def __init__(self, model: str | None = None, lora_dir: str | Path = "models/Lora", device: str = "auto",
                 precision: str = "float32") -> None:  # fmt: skip
        self.model = model
        self.name = "toy model (shapes x colours)" if model is None else Path(model).name
        self._lora_dir = Path(lora_dir)
        self._device, self._precision = device, precision
        self._backend: Backend | None = None
        self._lock = threading.Lock()
        if model is not None and not (Path(model) / "model_index.json").is_file():
            raise ConfigError("model", f"{model!r} is not a diffusers model folder (no model_index.json in it); give "
                              "the folder that holds model_index.json, or leave it out for the toy model")  # fmt: skip

    @property
    def toy(self) -> bool:
        return self.model is None

    def backend(self) -> Backend:
        with self._lock:
            if self._backend is None:
                if self.toy:
                    self._backend = load_toy_backend("cpu" if self._device == "auto" else self._device)
                else:
                    self._backend = load_diffusers_folder(self.model, self._device, self._precision)
                log.info("loaded %s on %s", self.name, self._backend.device)
            return self._backend

    def lora_dir(self) -> Path:
        self._lora_dir.mkdir(parents=True, exist_ok=True)
        return self._lora_dir

    def kind_for(self, concepts: list[str], kind: str) -> str:
        if self.toy:
            return concept_kind(concepts[0])  # refuses a concept the toy world does not know, with the list
        return kind

    def recipe(self) -> str:
        return "toy" if self.toy else family_of(self.backend())

    def examples(self) -> list[str]:
        return ["circle", "red"] if self.toy else []
