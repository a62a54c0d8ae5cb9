"""The SurgUn gradio UI: one builder for the A1111/Forge tab and `surgun ui` (gradio 3.41, 4.40 and current).

Only the components and event arguments these three share are used; `_on` drops an event keyword a
version lacks. API endpoints: `erase` (the Train button) and `probe` (the Probe button), so scripts can
drive the tab with gradio_client.
"""

from __future__ import annotations

import inspect
import logging
import threading
import time

import gradio as gr

from surgun_core.concepts import KINDS
from surgun_core.errors import Cancelled, SurgUnError
from surgun_core.registry import ATTACK_NAMES

from .presets import PRESETS
from .session import EraseOutcome, EraseRequest, EraseSession, Host

log = logging.getLogger(__name__)

PHASES = {"before": "before images", "images": "training images", "localize": "localizing blocks",
          "train": "training", "calibrate": "calibrating", "after": "after images"}  # fmt: skip
INTRO = ("Erase a concept (an object, a style) from **{model}**. Training pushes the concept's images apart "
         "from its prompt while other concepts under the same prompt stay put; the LoRA it saves undoes the "
         "concept wherever it is loaded.")  # fmt: skip


AUDIT_INTRO = ("Each attack tries to make the erased model draw the concept again: a learned word (concept "
               "inversion), a learned prompt prefix, the concept's direction added to other prompts, and new "
               "phrasings. The same attack on the base model is the control. Takes minutes.")  # fmt: skip


def _on(listener, fn, inputs, outputs, **kwargs):
    """listener(fn, inputs, outputs, **kwargs), less the keywords this gradio version does not know."""
    params = inspect.signature(listener).parameters
    return listener(fn, inputs, outputs, **{k: v for k, v in kwargs.items() if k in params})


def build_ui(host: Host, session: EraseSession | None = None) -> gr.Blocks:
    """The whole UI as one gr.Blocks (A1111 puts it in a tab; `surgun ui` launches it)."""
    session = session or EraseSession(host)
    with gr.Blocks(analytics_enabled=False, title="SurgUn") as ui:
        gr.Markdown(INTRO.format(model=host.name))
        with gr.Row():
            with gr.Column(scale=1):
                concepts = gr.Textbox(label="Concept(s) to erase", lines=2, placeholder="one per line or comma, "
                                      "e.g. circle", elem_id="surgun_concepts")  # fmt: skip
                distractors = gr.Textbox(
                    label="Distractors (optional)",
                    lines=2,
                    elem_id="surgun_distractors",
                    placeholder="other concepts that must survive; empty: a built-in list",
                )
                with gr.Row():
                    kind = gr.Dropdown(list(KINDS), value="object", label="Kind", elem_id="surgun_kind")
                    preset = gr.Radio(list(PRESETS), value="balanced", label="Preset", elem_id="surgun_preset")
                with gr.Accordion("Advanced", open=False):
                    with gr.Row():
                        steps = gr.Number(value=0, precision=0, label="Steps (0: preset)", elem_id="surgun_steps")
                        lr = gr.Number(value=0, label="Learning rate (0: preset)")
                        rank = gr.Number(value=0, precision=0, label="LoRA rank (0: preset)")
                    with gr.Row():
                        blocks = gr.Textbox(
                            value="auto",
                            label="Blocks: auto, a preset or a regular expression",
                            elem_id="surgun_blocks",
                        )
                        guidance = gr.Number(value=0, label="Guidance (0: preset)")
                        seed = gr.Number(value=0, precision=0, label="Seed")
                    calibrate = gr.Checkbox(
                        value=True, label="Calibrate (ship the best checkpoint)", elem_id="surgun_calibrate"
                    )
                    robust = gr.Checkbox(value=False, label="Robust (train against a token that brings the concept "
                                         "back; slower)", elem_id="surgun_robust")  # fmt: skip
                lora_name = gr.Textbox(label="LoRA file name (empty: surgun-<concept>)", elem_id="surgun_lora_name")
                with gr.Row():
                    train = gr.Button("Train", variant="primary", elem_id="surgun_train")
                    stop = gr.Button("Stop", elem_id="surgun_stop")
                status = gr.Markdown("Ready.", elem_id="surgun_status")
            with gr.Column(scale=1):
                gallery = gr.Gallery(label="Before / after (same prompt and seed)", columns=4,
                                     elem_id="surgun_gallery")  # fmt: skip
                scores = gr.JSON(label="Erase and retain scores (probe set, judged by the base model)",
                                 elem_id="surgun_scores")  # fmt: skip
                curve = gr.Image(label="Calibration curve", type="pil", interactive=False, elem_id="surgun_curve")
                lora_path = gr.Textbox(label="Saved LoRA", interactive=False, elem_id="surgun_lora_path")
                snippet = gr.Textbox(label="Prompt snippet (copy into your prompt)", interactive=False,
                                     elem_id="surgun_snippet")  # fmt: skip
        with gr.Accordion("Probe: any prompt before and after", open=True):
            with gr.Row():
                probe_prompt = gr.Textbox(label="Prompt", elem_id="surgun_probe_prompt", scale=3)
                probe_seed = gr.Number(value=0, precision=0, label="Seed")
                strength = gr.Slider(-1.0, 2.0, value=1.0, step=0.05, label="LoRA strength")
            probe_lora = gr.Textbox(label="LoRA file (empty: the latest erase)", elem_id="surgun_probe_lora")
            probe_btn = gr.Button("Probe", elem_id="surgun_probe")
            with gr.Row():
                probe_before = gr.Image(label="before", type="pil", interactive=False, elem_id="surgun_probe_before")
                probe_after = gr.Image(label="after", type="pil", interactive=False, elem_id="surgun_probe_after")
            probe_scores = gr.JSON(label="What the judge sees", elem_id="surgun_probe_scores")
        with gr.Accordion("Audit: try to bring the concept back (attacks from the literature)", open=False):
            gr.Markdown(AUDIT_INTRO)
            with gr.Row():
                audit_lora = gr.Textbox(label="LoRA file (empty: the latest erase)", elem_id="surgun_audit_lora",
                                        scale=3)  # fmt: skip
                audit_attacks = gr.CheckboxGroup(list(ATTACK_NAMES), value=list(ATTACK_NAMES), label="Attacks",
                                                 elem_id="surgun_audit_attacks")  # fmt: skip
                audit_seed = gr.Number(value=0, precision=0, label="Seed")
            audit_btn = gr.Button("Audit", elem_id="surgun_audit")
            audit_status = gr.Markdown("", elem_id="surgun_audit_status")
            audit_grid = gr.Image(label="Attacked images: base model (left) | erased model (right)", type="pil",
                                  interactive=False, elem_id="surgun_audit_grid")  # fmt: skip
            audit_report = gr.JSON(label="Audit report (recovery: share of attacked images judged as the concept)",
                                   elem_id="surgun_audit_report")  # fmt: skip

        form = [concepts, distractors, kind, preset, steps, lr, rank, blocks, calibrate, guidance, seed, lora_name,
                robust]  # fmt: skip
        outputs = [status, gallery, scores, curve, lora_path, snippet]
        _on(train.click, erase_handler(session), form, outputs, api_name="erase")
        _on(stop.click, lambda: session.stop(), None, None, queue=False, api_name="stop")
        _on(probe_btn.click, probe_handler(session), [probe_prompt, probe_seed, strength, probe_lora],
            [probe_before, probe_after, probe_scores], api_name="probe")  # fmt: skip
        _on(audit_btn.click, audit_handler(session), [audit_lora, audit_attacks, audit_seed],
            [audit_status, audit_grid, audit_report], api_name="audit")  # fmt: skip
    return ui


def erase_handler(session: EraseSession):
    """The Train button: a generator that streams progress, then the results (the `erase` endpoint)."""

    def run(concepts, distractors, kind, preset, steps, lr, rank, blocks, calibrate, guidance, seed, lora_name,
            robust=False):  # fmt: skip
        request = EraseRequest(concepts or "", distractors or "", kind or "object", preset or "balanced",
                               int(steps or 0), float(lr or 0), int(rank or 0), blocks or "auto", bool(calibrate),
                               float(guidance or 0), int(seed or 0), lora_name or "", bool(robust))  # fmt: skip
        try:
            request.to_config(session.host)  # a bad form fails now, with the field named
            request.file_name()
        except SurgUnError as e:
            raise gr.Error(str(e)) from None
        state = {"phase": "starting", "done": 0, "total": 0}
        box: dict = {}

        def progress(phase, done, total, stats):
            state.update(phase=phase, done=done, total=total)

        def work():
            try:
                box["out"] = session.erase(request, progress)
            except BaseException as e:
                box["error"] = e

        worker = threading.Thread(target=work, name="surgun-erase", daemon=True)
        started = time.time()
        # answer at once: gradio 3 serves each step of a generator as its own HTTP call, with a timeout
        yield "**starting**", None, None, None, "", ""
        worker.start()
        while worker.is_alive():
            worker.join(1.0)
            yield _status(state, started, session), None, None, None, "", ""
        err = box.get("error")
        if isinstance(err, Cancelled):
            stopped = f"**Stopped** after {time.time() - started:.0f} s: {err}."
            yield stopped, None, None, None, "", ""
            return
        if isinstance(err, SurgUnError):
            raise gr.Error(str(err))
        if err is not None:
            log.exception("erase failed", exc_info=err)
            raise gr.Error(f"{type(err).__name__}: {err}")
        out: EraseOutcome = box["out"]
        yield _done(out), out.gallery, out.scores, out.curve, str(out.lora_path), out.snippet

    return run


def _status(state: dict, started: float, session: EraseSession) -> str:
    if session.cancelled():
        return "Stopping at the next step..."
    phase = PHASES.get(state["phase"], state["phase"])
    count = f" {state['done']}/{state['total']}" if state["total"] else ""
    return f"**{phase}**{count}, {time.time() - started:.0f} s"


def _done(out: EraseOutcome) -> str:
    s = out.scores
    # where training ended, worded as `surgun erase` and ComfyUI's Train report word it (EraseResult.notes)
    note = f" ({'; '.join(n.removeprefix('note: ') for n in s['notes'])})" if s.get("notes") else ""
    return (f"**Done** in {s['seconds']:.0f} s{note}: erase {s['erase']:.2f}, retain {s['retain']:.2f} "
            f"(step {s['chosen_step']} of {s['steps']}). Saved `{out.lora_path.name}`.")  # fmt: skip


def probe_handler(session: EraseSession):
    def run(prompt, seed, strength, lora_file):
        try:
            out = session.probe(prompt or "", int(seed or 0), float(1.0 if strength is None else strength),
                                (lora_file or "").strip() or None)  # fmt: skip
        except SurgUnError as e:
            raise gr.Error(str(e)) from None
        return out["before"], out["after"], out["scores"]

    return run


def audit_handler(session: EraseSession):
    """The Audit button: a generator that streams the attack being run, then the grid and the report."""

    def run(lora_file, attacks, seed):
        state = {"phase": "audit", "done": 0, "total": 0, "attack": ""}
        box: dict = {}

        def progress(phase, done, total, stats):
            state.update(phase=phase, done=done, total=total, attack=stats.get("attack", state["attack"]))

        def work():
            try:
                box["out"] = session.audit((lora_file or "").strip() or None, list(attacks or []) or None,
                                           int(seed or 0), progress)  # fmt: skip
            except BaseException as e:
                box["error"] = e

        worker = threading.Thread(target=work, name="surgun-audit", daemon=True)
        started = time.time()
        yield "**starting the audit**", None, None  # at once: gradio 3 serves each step as an HTTP call
        worker.start()
        while worker.is_alive():
            worker.join(1.0)
            yield (f"**attack {state['attack'] or '...'}** ({state['done']}/{state['total']}), "
                   f"{time.time() - started:.0f} s"), None, None  # fmt: skip
        err = box.get("error")
        if isinstance(err, Cancelled):
            yield f"**Stopped**: {err}.", None, None
            return
        if isinstance(err, SurgUnError):
            raise gr.Error(str(err))
        if err is not None:
            log.exception("audit failed", exc_info=err)
            raise gr.Error(f"{type(err).__name__}: {err}")
        out = box["out"]
        rep = out["report"]
        yield (f"**Done** in {time.time() - started:.0f} s: worst attack {rep['worst_attack']} brings back "
               f"{rep['max_recovery']:.0%} of the concept."), out["grid"], rep  # fmt: skip

    return run


def launch(host: Host, address: str = "127.0.0.1", port: int = 7860, share: bool = False) -> None:
    """`surgun ui`: serve the UI (blocks until the server is stopped)."""
    host.backend()  # load the model before serving: the first request must not wait for it
    ui = build_ui(host)
    ui.queue()
    ui.launch(server_name=address, server_port=port, share=share, inbrowser=False)
