"""The A1111/Forge host of the tab: the model the web UI has loaded, its models/Lora folder, shared.state.

Imports A1111's `modules` only when constructed (inside the web UI).
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

from surgun_core.backends.base import Backend
from surgun_core.backends.webui import webui_backend
from surgun_core.errors import SurgUnError

from .session import Host

log = logging.getLogger(__name__)

PHASE_NAMES = {"before": "SurgUn: before images", "images": "SurgUn: training images", "localize": "SurgUn: localize",
               "train": "SurgUn: train", "calibrate": "SurgUn: calibrate", "after": "SurgUn: after images"}  # fmt: skip


class WebuiHost(Host):
    def __init__(self, shared=None, paths=None) -> None:
        if shared is None or paths is None:
            from modules import paths as webui_paths
            from modules import shared as webui_shared

            shared, paths = shared or webui_shared, paths or webui_paths
        self.shared, self.paths = shared, paths
        self._backend: tuple[int, Backend] | None = None

    @property
    def name(self) -> str:
        info = getattr(self.shared.sd_model, "sd_checkpoint_info", None)
        return getattr(info, "name_for_extra", None) or getattr(info, "title", None) or "the loaded checkpoint"

    def backend(self) -> Backend:
        model = self.shared.sd_model
        if model is None:
            raise SurgUnError("no checkpoint is loaded; pick one in the checkpoint list at the top first")
        if self._backend is None or self._backend[0] != id(model):  # the user switched checkpoints
            self._backend = (id(model), webui_backend(model))
        return self._backend[1]

    def lora_dir(self) -> Path:
        folder = getattr(self.shared.cmd_opts, "lora_dir", None) or os.path.join(self.paths.models_path, "Lora")
        Path(folder).mkdir(parents=True, exist_ok=True)
        return Path(folder)

    def on_progress(self, phase: str, done: int, total: int) -> None:
        st = self.shared.state
        st.job = PHASE_NAMES.get(phase, f"SurgUn: {phase}")
        st.sampling_step, st.sampling_steps = done, max(total, 1)

    def interrupted(self) -> bool:
        return bool(getattr(self.shared.state, "interrupted", False))

    @contextlib.contextmanager
    def job(self):
        st = self.shared.state
        try:
            st.begin(job="surgun")
        except TypeError:  # A1111 before 1.6: begin() takes no job name
            st.begin()
        st.job_count = 1
        try:
            yield
        finally:
            st.end()
