"""One erase-and-probe session for front ends with a form (the A1111/Forge tab, `surgun ui`).

No UI toolkit here: app code turns form values into an EraseRequest, calls EraseSession.erase / probe and
shows what comes back. A Host says where the model comes from, where LoRA files go and how progress and
the host's own Interrupt button are reported (StandaloneHost for `surgun ui`; surgun_ui.webui for
A1111/Forge).
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from surgun_core.audit import delta_concept, run_audit
from surgun_core.backends.base import Backend
from surgun_core.charts import plot_curve
from surgun_core.config import EraseConfig, parse_list
from surgun_core.errors import Cancelled, ConfigError, SurgUnError
from surgun_core.judges.probe import judge_for, probe_set, score_probe
from surgun_core.lora import LoraDelta
from surgun_core.recipes import family_of, merge_settings, recipe_settings
from surgun_core.registry import ATTACK_NAMES
from surgun_core.surgun import Progress, erase

from .presets import preset_settings

log = logging.getLogger(__name__)

GALLERY_PROMPTS = 6  # before/after pairs: the erased concepts first, then retained ones
DISPLAY_PX = 192  # small model outputs are scaled up (nearest) so a person can see them


class Host:
    """Where a session's model lives and where its results go. Subclasses override what differs."""

    name = "model"

    def backend(self) -> Backend:
        raise NotImplementedError

    def lora_dir(self) -> Path:
        raise NotImplementedError

    def recipe(self) -> str:
        """The recipe family of the host's model (surgun_core.recipes): what the presets scale."""
        return family_of(self.backend())

    def kind_for(self, concepts: list[str], kind: str) -> str:
        """The concept kind to use (a host that knows its concepts may correct the form's choice)."""
        return kind

    def on_progress(self, phase: str, done: int, total: int) -> None:
        """Mirror progress into the host (A1111's shared.state); the form gets it from the session too."""

    def interrupted(self) -> bool:
        """The host's own Stop/Interrupt button (A1111's shared.state.interrupted)."""
        return False

    def job(self):
        """A context around a whole job (A1111: shared.state.begin/end)."""
        from contextlib import nullcontext

        return nullcontext()


@dataclass
class EraseRequest:
    """The form: what the user typed, before validation (EraseConfig validates)."""

    concepts: str
    distractors: str = ""
    kind: str = "object"
    preset: str = "balanced"
    steps: int = 0  # 0: the preset's
    lr: float = 0.0  # 0: the preset's
    rank: int = 0  # 0: the preset's
    blocks: str = "auto"
    calibrate: bool = True
    guidance: float = 0.0  # 0: the preset's
    seed: int = 0
    lora_name: str = ""  # file name in the LoRA folder; empty: surgun-<concept>
    robust: bool = False  # robust mode: train against an adversary that learns a token to bring the concept back

    def to_config(self, host: Host) -> EraseConfig:
        concepts = parse_list(self.concepts)
        if not concepts:
            raise ConfigError("concepts", "name at least one concept to erase, e.g. 'circle' (one per line or comma)")
        kind = host.kind_for(concepts, self.kind)
        family = host.recipe()
        recipe = preset_settings(self.preset, recipe_settings(family, concepts, kind, self.robust))
        settings = dict(calibrate=self.calibrate, seed=int(self.seed))  # what the form sets
        if (self.blocks or "auto") != "auto" or not self.robust:  # robust mode keeps its recipe's wider blocks
            settings["blocks"] = self.blocks or "auto"
        distractors = parse_list(self.distractors)
        if distractors:
            settings["distractors"] = distractors
        for key, value in (("steps", self.steps), ("lr", self.lr), ("rank", self.rank), ("guidance", self.guidance)):
            if value is not None and float(value) < 0:
                raise ConfigError(key, f"must be 0 (the preset's value) or positive, got {value}")
            if value:
                settings[key] = int(value) if key in ("steps", "rank") else float(value)
        return EraseConfig(**merge_settings(family, recipe, settings))

    def file_name(self) -> str:
        name = self.lora_name.strip() or "surgun-" + "-".join(parse_list(self.concepts)[:2])
        name = name.removesuffix(".safetensors")
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")
        if not safe:
            raise ConfigError("lora_name", f"{self.lora_name!r} has no usable characters; use letters, digits, - or _")
        return safe


@dataclass
class EraseOutcome:
    scores: dict  # erase, retain, h (probe set, judged by the base model), steps, seconds, chosen_step
    lora_path: Path
    snippet: str  # <lora:name:1> for A1111/Forge prompts
    gallery: list[tuple[Image.Image, str]]  # before/after pairs with captions
    curve: Image.Image | None  # calibration curve (None without calibration)
    config: EraseConfig = field(repr=False)


class EraseSession:
    """Runs one job at a time on a host's model; Stop sets a flag the training loop checks every step."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self._stop = threading.Event()
        self._busy = threading.Lock()
        self.last: tuple[LoraDelta, EraseConfig] | None = None  # the latest delta, for probe()

    def stop(self) -> None:
        self._stop.set()

    def cancelled(self) -> bool:
        return self._stop.is_set() or self.host.interrupted()

    def erase(self, request: EraseRequest, progress: Progress | None = None) -> EraseOutcome:
        cfg = request.to_config(self.host)  # bad input fails here, before any work
        name = request.file_name()
        with self._one_job():
            self._stop.clear()
            with self.host.job():
                return self._erase(cfg, name, progress)

    @contextlib.contextmanager
    def _one_job(self):
        if not self._busy.acquire(blocking=False):
            raise SurgUnError("a job is already running in this tab; wait for it or press Stop")
        try:
            yield
        finally:
            self._busy.release()

    def _erase(self, cfg: EraseConfig, name: str, progress: Progress | None) -> EraseOutcome:
        backend = self.host.backend()
        with getattr(backend, "training", contextlib.nullcontext)():  # hosts that run under inference_mode
            return self._erase_on(backend, cfg, name, progress)

    def _erase_on(self, backend: Backend, cfg: EraseConfig, name: str, progress: Progress | None) -> EraseOutcome:

        def report(phase: str, done: int, total: int, stats: dict) -> None:
            self.host.on_progress(phase, done, total)
            if progress is not None:
                progress(phase, done, total, stats)

        prompts, seeds = gallery_prompts(cfg)
        report("before", 0, 1, {})
        before = backend.generate(prompts, seeds, cfg.sample_steps, cfg.guidance)
        if self.cancelled():
            raise Cancelled("stopped before training; nothing was written")
        result = erase(backend, cfg, progress=report, cancel=self.cancelled)
        try:
            report("after", 0, 1, {})
            after = backend.generate(prompts, seeds, cfg.sample_steps, cfg.guidance)
            scores = self._scores(backend, cfg, result)
        finally:
            result.lora.detach()
        path = result.delta.save(self.host.lora_dir() / f"{name}.safetensors")
        self.last = (result.delta, cfg)
        scores = {k: round(v, 4) if isinstance(v, float) else v for k, v in scores.items()}
        curve = None
        if result.calibration is not None:
            curve = plot_curve(result.calibration, title=f"calibration: {', '.join(cfg.concepts)}")
        scores.update(steps=result.steps_done, seconds=round(result.seconds, 1), stopped=result.stopped,
                      erased_at=result.erased_at, notes=result.notes())  # fmt: skip
        gallery = []
        for i, (p, s) in enumerate(zip(prompts, seeds)):
            gallery += [(to_pil(before[i]), f"before: {p} (seed {s})"), (to_pil(after[i]), f"after: {p} (seed {s})")]
        log.info("erased %s: %s -> %s", cfg.concepts, scores, path)
        return EraseOutcome(scores, path, f"<lora:{name}:1>", gallery, curve, cfg)

    def _scores(self, backend: Backend, cfg: EraseConfig, result) -> dict:
        cal = result.calibration
        if cal is not None:
            row = next(r for r in cal.curve if r["step"] == cal.chosen_step)
            return {"erase": row["erase"], "retain": row["retain"], "h": row["h"], "chosen_step": cal.chosen_step}
        s = score_probe(
            backend, judge_for(cfg, backend), probe_set(cfg), cfg.probe_steps, cfg.guidance, judge=result.lora.disabled
        )
        return {"erase": s.erase, "retain": s.retain, "h": s.h, "chosen_step": result.steps_done}

    def probe(self, prompt: str, seed: int = 0, strength: float = 1.0, lora_path: str | None = None) -> dict:
        """The same prompt and seed without and with the delta (the latest erase, or a LoRA file)."""
        if not (prompt or "").strip():
            raise ConfigError("prompt", "type a prompt to probe, e.g. 'a red circle'")
        with self._one_job():
            return self._probe(prompt.strip(), int(seed), float(strength), lora_path)

    def _probe(self, prompt: str, seed: int, strength: float, lora_path: str | None) -> dict:
        backend = self.host.backend()
        modules = backend.attention_linears()
        delta, cfg = self._delta(backend, lora_path)
        steps = cfg.sample_steps if cfg else 20
        x_before = backend.sample([prompt], [seed], steps)
        lset = delta.to_lora_set(modules, strength).attach()
        try:
            x_after = backend.sample([prompt], [seed], steps)
            verdict = self._verdict(backend, cfg, lset, torch.cat([x_before, x_after])) if cfg else {}
        finally:
            lset.detach()
        before, after = (backend.decode(x.to(backend.device)).float().cpu()[0] for x in (x_before, x_after))
        return {"prompt": prompt, "seed": seed, "strength": strength, "before": to_pil(before),
                "after": to_pil(after), "scores": verdict}  # fmt: skip

    def audit(
        self,
        lora_path: str | None = None,
        attacks: list[str] | None = None,
        seed: int = 0,
        progress: Progress | None = None,
    ) -> dict:
        """Attack the latest erase (or a LoRA file) and the base model: how much of the concept comes back.

        Returns {"grid": PIL image, "report": the audit JSON, "recovery": the worst attack's share}."""
        with self._one_job():
            self._stop.clear()
            with self.host.job():
                return self._audit(lora_path, attacks, int(seed), progress)

    def _audit(self, lora_path: str | None, attacks: list[str] | None, seed: int, progress) -> dict:
        backend = self.host.backend()
        delta, cfg = self._delta(backend, lora_path)
        concept, kind = delta_concept(delta, cfg.concepts[0] if cfg else None, cfg.kind if cfg else None)
        with getattr(backend, "training", contextlib.nullcontext)():  # the attacks learn tokens: grads on
            report = run_audit(backend, delta, concept, kind, attacks=attacks or ATTACK_NAMES, seed=seed,
                               progress=progress, cancel=self.cancelled)  # fmt: skip
        data = report.to_dict(prompts=False)
        log.info("audit of %s: %s", concept, report.recovery)
        return {"grid": report.grid(), "report": data, "recovery": data["max_recovery"]}

    def _delta(self, backend: Backend, lora_path: str | None) -> tuple[LoraDelta, EraseConfig | None]:
        """The LoRA file given, else the latest erase of this session."""
        if lora_path:
            if not Path(lora_path).is_file():
                raise ConfigError("lora", f"no file at {lora_path!r}; pick a .safetensors LoRA from the LoRA folder")
            return LoraDelta.load(lora_path, list(backend.attention_linears())), None
        if self.last is None:
            raise ConfigError("lora", "nothing erased yet in this session: press Train first, or give a LoRA file")
        return self.last

    def _verdict(self, backend: Backend, cfg: EraseConfig, lset, x0: torch.Tensor) -> dict:
        """What the judge (the base model, LoRA off) sees in each image, over the erased and retained labels."""
        probe = probe_set(cfg)
        with lset.disabled():
            before, after = judge_for(cfg, backend).predict(x0.to(backend.device), probe.labels)
        erased = set(probe.erased)
        return {"before": before, "after": after, "before_shows_erased": before in erased,
                "after_shows_erased": after in erased}  # fmt: skip


def gallery_prompts(cfg: EraseConfig) -> tuple[list[str], list[int]]:
    """The before/after gallery: each erased concept, then retained ones, in the first probe template."""
    probe = probe_set(cfg)
    tpl = probe.templates[0]
    names = (probe.erased + probe.retained)[:GALLERY_PROMPTS]
    return [tpl.format(c) for c in names], [cfg.seed + i for i in range(len(names))]


def to_pil(img: torch.Tensor) -> Image.Image:
    """(3, H, W) in [0, 1] -> PIL, scaled up (nearest) when the model's images are tiny."""
    arr = (img.float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    pil = Image.fromarray(arr)
    if pil.width < DISPLAY_PX:
        k = -(-DISPLAY_PX // pil.width)
        pil = pil.resize((pil.width * k, pil.height * k), Image.NEAREST)
    return pil
