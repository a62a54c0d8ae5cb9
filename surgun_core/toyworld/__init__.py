"""The toy world (DESIGN.md section 3): shapes x colours, a tiny SD-shaped model, a ground-truth judge."""

from __future__ import annotations

from ..backends.diffusers import load_diffusers_folder
from ..errors import SurgUnError
from .classifier import load_classifier
from .paths import CLASSIFIER_FILE, MODEL_DIR, TOY_GUIDANCE


def load_toy_backend(device: str = "cpu", precision: str = "float32"):
    """The shipped toy model as a DiffusersBackend (the same code path as an SD1.5 folder)."""
    if not (MODEL_DIR / "model_index.json").is_file():
        raise SurgUnError(f"the toy model is missing from {MODEL_DIR}; run `surgun toyworld train` to build it")
    backend = load_diffusers_folder(MODEL_DIR, device=device, precision=precision)
    backend.default_guidance = TOY_GUIDANCE
    return backend


def load_toy_classifier():
    return load_classifier(CLASSIFIER_FILE)
