"""`surgun toyworld train|eval`: reproduce the shipped toy model, or print its per-pair accuracy."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch

from ..backends.diffusers import load_diffusers_folder
from ..io import write_json
from ..toyworld import TOY_GUIDANCE, load_toy_backend, load_toy_classifier
from ..toyworld import evaluate as ev
from ..toyworld.classifier import save_classifier, train_classifier
from ..toyworld.paths import CLASSIFIER_FILE, MODEL_DIR
from ..toyworld.train import train_toy_model

log = logging.getLogger(__name__)


def run_train(a) -> int:
    out = Path(a.out) if a.out else MODEL_DIR
    torch.set_num_threads(a.threads)  # float results depend on the thread count; the shipped run used 1
    if a.classifier:
        log.info("training the ground-truth classifier")
        save_classifier(train_classifier(seed=a.seed), CLASSIFIER_FILE)
    staging = Path(a.work) / "model"
    train_toy_model(staging, Path(a.work), steps=a.steps, seed=a.seed)
    tmp = out.with_name(f".{out.name}.tmp")  # swap in whole: never a half-copied model folder
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(staging, tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    print(f"toy model written to {out}")
    return eval_table(a.eval_seeds, None, str(out)) if a.eval_seeds else 0


def run_eval(a) -> int:
    return eval_table(a.seeds, a.json, a.model)


def eval_table(seeds: int, json_path: str | None, model: str | None) -> int:
    if model:
        backend = load_diffusers_folder(model, device="cpu")
        backend.default_guidance = TOY_GUIDANCE
    else:
        backend = load_toy_backend()
    table = ev.accuracy_table(ev.generate_toy(backend, ev.toy_prompts(seeds)), load_toy_classifier())
    print(ev.format_table(table))
    worst = min(min(v) for v in table.values())
    print(f"\nworst pair accuracy: {worst:.2f} ({seeds} seeds per pair, guidance {backend.default_guidance})")
    if json_path:
        write_json(json_path, {f"{s}/{c}": {"shape": v[0], "colour": v[1]} for (s, c), v in table.items()})
    return 0
