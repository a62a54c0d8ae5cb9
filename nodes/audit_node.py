"""SurgUn Attack Audit: does the erasure in MODEL survive attacks that try to bring the concept back?"""

from __future__ import annotations

import functools
import json
import logging

import comfy.utils
from comfy_api.latest import io

from ..surgun_core.audit import run_audit
from ..surgun_core.concepts import KINDS
from ..surgun_core.errors import ConfigError
from ..surgun_core.registry import ATTACK_NAMES
from .parsing import ALL_ATTACKS, parse_attack_settings, parse_attacks
from .train_node import cancelled, comfy_backend
from .types import CATEGORY, pil_to_image

log = logging.getLogger(__name__)


class SurgUnAttackAudit(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SurgUnAttackAudit",
            display_name="SurgUn Attack Audit",
            category=CATEGORY,
            description="Attack the erased model with attacks from the literature (concept inversion, a learned "
            "prompt prefix, a concept vector, unseen phrasings) and, as the control, the base model with the same "
            "settings and seeds. Recovery = share of attacked images the judge names as the concept: low on the "
            "erased model while high on the base model means the erasure holds. Slow: minutes per attack.",
            inputs=[
                io.Model.Input("model", tooltip="The erased model (from SurgUn Train, Apply Unlearning Delta or a "
                               "LoRA loader)."),
                io.Model.Input("base_model", tooltip="The model before the erasure: the control runs on it, and on a "
                               "real model it is the judge."),
                io.Clip.Input("clip", tooltip="The text encoder of the model (the attacks learn tokens through it)."),
                io.Vae.Input("vae", tooltip="The VAE of the model, to decode the attacked images."),
                io.String.Input("concept", default="", tooltip="The erased concept to bring back, e.g. 'circle'."),
                io.Combo.Input("kind", options=list(KINDS), default="object",
                               tooltip="What the concept is; picks the attack prompts and the judge's labels."),
                io.String.Input("attacks", default=ALL_ATTACKS,
                                tooltip=f"'{ALL_ATTACKS}', or some of {', '.join(ATTACK_NAMES)} separated by commas "
                                "(phrasings is the quickest: no optimisation)."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=False,
                             tooltip="Seed of the attacks' learning and images; same seed, same report."),
                io.String.Input("attack_settings", multiline=True, default="", optional=True,
                                tooltip='Optional JSON overrides per attack, e.g. {"inversion": {"steps": 200}}; '
                                "empty: the published settings, scaled to the model."),
            ],
            outputs=[
                io.Image.Output("grid", tooltip="One row per attack: its images on the base model (left) and on "
                                "the erased model (right)."),
                io.String.Output("report", tooltip="The audit as JSON (the same as `surgun audit` writes): per "
                                 "attack the recovery on the erased model, the control, settings and cost."),
                io.Float.Output("recovery", tooltip="The worst attack's recovery on the erased model (0..1)."),
            ],
        )  # fmt: skip

    @classmethod
    def execute(cls, model, base_model, clip, vae, concept, kind, attacks, seed, attack_settings="") -> io.NodeOutput:
        # 1. widgets -> attack names and settings (refused here, before minutes of work)
        concept = (concept or "").strip()
        if not concept:
            raise ConfigError("concept", "is empty; write the erased concept, e.g. circle")
        names, settings = parse_attacks(attacks), parse_attack_settings(attack_settings)
        # 2. every attack on the erased model and, inside as_model(base_model), the control and the judge
        backend = comfy_backend(model, clip, vae=vae)
        as_base = functools.partial(backend.as_model, base_model)
        pbar = comfy.utils.ProgressBar(len(names))

        def progress(_phase: str, done: int, total: int, _stats: dict) -> None:
            pbar.update_absolute(done, total)

        with backend.training():  # the attacks learn tokens: gradients on
            report = run_audit(backend, None, concept, kind, names, judge=as_base, seed=seed, settings=settings,
                               progress=progress, cancel=cancelled)  # fmt: skip
        data = report.to_dict()
        log.info("attack audit of %r: %s", concept, report.recovery)
        return io.NodeOutput(pil_to_image(report.grid()), json.dumps(data, indent=1), float(data["max_recovery"]))
