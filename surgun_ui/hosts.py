"""The standalone host of `surgun ui`: the shipped toy model, or any diffusers model folder."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from surgun_core.backends.base import Backend
from surgun_core.session import Host

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
            from surgun_core.errors import ConfigError

            raise ConfigError("model", f"{model!r} is not a diffusers model folder (no model_index.json in it); give "
                              "the folder that holds model_index.json, or leave it out for the toy model")  # fmt: skip

    @property
    def toy(self) -> bool:
        return self.model is None

    def backend(self) -> Backend:
        with self._lock:
            if self._backend is None:
                if self.toy:
                    from surgun_core.toyworld import load_toy_backend

                    self._backend = load_toy_backend("cpu" if self._device == "auto" else self._device)
                else:
                    from surgun_core.backends.diffusers import load_diffusers_folder

                    self._backend = load_diffusers_folder(self.model, self._device, self._precision)
                log.info("loaded %s on %s", self.name, self._backend.device)
            return self._backend

    def lora_dir(self) -> Path:
        self._lora_dir.mkdir(parents=True, exist_ok=True)
        return self._lora_dir

    def kind_for(self, concepts: list[str], kind: str) -> str:
        if self.toy:
            from surgun_core.toyworld.evaluate import concept_kind

            return concept_kind(concepts[0])  # refuses a concept the toy world does not know, with the list
        return kind

    def base_settings(self, kind: str) -> dict:
        if not self.toy:
            return {}
        from surgun_core.demo import TOY_PROBE_TEMPLATES, TOY_RECIPE, toy_templates
        from surgun_core.toyworld.world import COLOURS, SHAPES

        pool = SHAPES if kind == "object" else COLOURS
        return dict(TOY_RECIPE, distractors=list(pool), templates=toy_templates(kind),
                    probe_templates=list(TOY_PROBE_TEMPLATES[kind]))  # fmt: skip

    def examples(self) -> list[str]:
        return ["circle", "red"] if self.toy else []
