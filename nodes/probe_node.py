"""Concept Probe: is the concept gone from the erased MODEL, and is everything else still there?"""

from __future__ import annotations

import comfy.utils
import torch
from comfy_api.latest import io

from ..surgun_core.concepts import KINDS, templates_for
from ..surgun_core.errors import ConfigError, SurgUnError
from ..surgun_core.grid import before_after_grid
from ..surgun_core.judges.probe import ProbeSet, score_probe
from ..surgun_core.judges.scorers import make_scorer
from .parsing import parse_list, parse_list_lines
from .train_node import comfy_backend
from .types import CATEGORY, pil_to_image

PROBE_SCORERS = ["diffusion", "toy"]  # clip needs a local model folder: use the core/CLI for it


class SurgUnConceptProbe(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SurgUnConceptProbe",
            display_name="Concept Probe",
            category=CATEGORY,
            description="Draw the erased and the retained concepts with the base and the erased model (same seeds) "
            "and score them: erase = share of erased-concept images no longer showing it; retain = share of "
            "other concepts' images still showing theirs.",
            inputs=[
                io.Model.Input("model", tooltip="The erased model (from SurgUn Train or Apply Unlearning Delta)."),
                io.Clip.Input("clip", tooltip="The text encoder of the model."),
                io.Vae.Input("vae", tooltip="The VAE of the model, to decode the probe images."),
                io.String.Input("concepts", multiline=True, default="",
                                tooltip="The erased concepts, one per line (e.g. 'circle')."),
                io.String.Input("retain_concepts", multiline=True, default="",
                                tooltip="Other concepts of the same kind that must survive, one per line."),
                io.Combo.Input("kind", options=list(KINDS), default="object",
                               tooltip="What the concepts are; picks the default prompt templates."),
                io.Int.Input("seeds", default=4, min=1, max=64,
                             tooltip="Images per prompt (seeds 0..N-1 offset by seed); more is steadier."),
                io.Int.Input("steps", default=20, min=1, max=200, tooltip="Sampler steps per image."),
                io.Float.Input("guidance", default=5.0, min=0.0, max=30.0, step=0.1, tooltip="CFG scale."),
                io.Combo.Input("scorer", options=PROBE_SCORERS, default="diffusion",
                               tooltip="Who judges the images: 'diffusion' = the base model itself as a zero-shot "
                               "classifier (no download); 'toy' = the demo model's ground-truth classifier."),
                io.Model.Input("base_model", optional=True,
                               tooltip="The model before the erasure; if absent, the one SurgUn Train / Apply "
                               "Unlearning Delta patched (when connected straight from them)."),
                io.String.Input("templates", multiline=True, default="", optional=True,
                                tooltip="Prompt templates with one {} for the concept, one per line; empty: the "
                                "first two built-in templates for the kind."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, optional=True, control_after_generate=False,
                             tooltip="First seed of the probe images."),
            ],
            outputs=[
                io.Image.Output("grid", tooltip="Labelled before | after images, one row per prompt."),
                io.String.Output("report", tooltip="Scores per concept, before and after."),
                io.Float.Output("erase", tooltip="Share of erased-concept images that no longer show it (0..1)."),
                io.Float.Output("retain", tooltip="Share of retained-concept images that still show theirs (0..1)."),
            ],
        )  # fmt: skip

    @classmethod
    def execute(cls, model, clip, vae, concepts, retain_concepts, kind, seeds, steps, guidance, scorer,
                base_model=None, templates="", seed=0) -> io.NodeOutput:  # fmt: skip
        erased, retained = parse_list(concepts), parse_list(retain_concepts)
        if not erased:
            raise ConfigError("concepts", "is empty; write the erased concepts, one per line")
        if not retained:  # the judge picks among labels: with the erased concept alone it cannot say "not it"
            raise ConfigError("retain_concepts", "is empty; write at least one other concept of the same kind")
        base_model = base_model or getattr(model, "surgun_base", None)
        if base_model is None:
            raise SurgUnError("Concept Probe: connect base_model (the model before the erasure) or connect model "
                              "straight from SurgUn Train / Apply Unlearning Delta")  # fmt: skip
        probe = ProbeSet(erased, retained, parse_list_lines(templates) or list(templates_for(kind)[:2]),
                         [seed + i for i in range(seeds)])  # fmt: skip
        if any(t.count("{}") != 1 for t in probe.templates):
            raise ConfigError("templates", "each template needs exactly one {} where the concept goes")
        after, base = (comfy_backend(m, clip, guidance) for m in (model, base_model))
        rows = probe.rows()
        prompts, row_seeds = [r[0] for r in rows], [r[2] for r in rows]
        pbar = comfy.utils.ProgressBar(2 * len(rows))
        x_before = base.sample(prompts, row_seeds, steps, guidance, on_batch=lambda d, n: pbar.update_absolute(d))
        x_after = after.sample(prompts, row_seeds, steps, guidance,
                               on_batch=lambda d, n: pbar.update_absolute(len(rows) + d))  # fmt: skip
        judge = make_scorer(scorer, base, kind, templates=probe.templates)  # the base model judges both
        base.activate()  # sampling with the erased model left its patches on the weights the two share
        s_before = score_probe(base, judge, probe, x0=x_before)
        s_after = score_probe(base, judge, probe, x0=x_after)
        grid = _grid(vae, base, probe, x_before, x_after, s_after.erase, s_after.retain)
        return io.NodeOutput(grid, _report(probe, scorer, s_before, s_after), s_after.erase, s_after.retain)


def _grid(vae, backend, probe, x_before, x_after, erase, retain) -> torch.Tensor:
    """IMAGE (1, H, W, 3): one row per prompt, its seeds before | after."""

    def decode(x):  # model space -> LATENT space -> IMAGE (B, H, W, 3) -> (B, 3, H, W)
        return vae.decode(backend.base.process_latent_out(x.to(backend.device))).float().cpu().movedim(-1, 1)

    img_b, img_a = decode(x_before), decode(x_after)
    rows, k, probe_rows = [], len(probe.seeds), probe.rows()
    for i in range(0, len(img_b), k):
        prompt, label, _seed = probe_rows[i]
        tag = "  (erased)" if label in probe.erased else ""
        rows.append((f"{prompt!r}{tag}", img_b[i : i + k], img_a[i : i + k]))
    cell = 64 if img_b.shape[-1] <= 64 else 128
    title = f"Concept Probe: erase {erase:.2f}  retain {retain:.2f}"
    pil = before_after_grid(rows, cell=cell, title=title)
    return pil_to_image(pil)


def _report(probe: ProbeSet, scorer: str, before, after) -> str:
    lines = [f"Concept Probe ({scorer} scorer, {len(probe.seeds)} seeds x {len(probe.templates)} templates)",
             f"erase  {after.erase:.2f}  (before: {before.erase:.2f})",
             f"retain {after.retain:.2f}  (before: {before.retain:.2f})", "",
             "concept            role     before  after"]  # fmt: skip
    for c in probe.labels:
        role = "erased" if c in probe.erased else "retained"
        lines.append(f"{c[:18]:<18} {role:<8} {before.per_concept[c]:>6.2f} {after.per_concept[c]:>6.2f}")
    lines.append("(erased rows: share no longer showing the concept; retained rows: share still showing it)")
    return "\n".join(lines)
