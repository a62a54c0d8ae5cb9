"""Where the shipped toy model and its classifier live, and the model's architecture name.

No diffusers or transformers here: the judges and recipes need these names inside hosts that have neither
(the A1111 tab).
"""

from __future__ import annotations

from pathlib import Path

WEIGHTS_DIR = Path(__file__).parent / "weights"
MODEL_DIR = WEIGHTS_DIR / "model"
CLASSIFIER_FILE = WEIGHTS_DIR / "classifier.safetensors"
ARCHITECTURE = "surgun-toyworld-v1"
TOY_GUIDANCE = 4.0  # classifier-free guidance the toy model was tuned to sample with
