"""`surgun apply`: bake a delta into a checkpoint (a single .safetensors file or a diffusers folder)."""

from __future__ import annotations

from pathlib import Path

from ..apply import apply_delta_to_checkpoint
from ..errors import ConfigError
from ..toyworld.paths import MODEL_DIR
from .common import TOY_MODEL


def run(a) -> int:
    if not Path(a.delta).is_file():
        raise ConfigError("delta", f"{a.delta} does not exist; give the erasure LoRA (.safetensors) to merge")
    model = MODEL_DIR if a.model == TOY_MODEL else Path(a.model)
    out = apply_delta_to_checkpoint(model, a.delta, a.strength, a.out, config=a.model_config)
    kind = "single-file checkpoint" if out.suffix == ".safetensors" else "diffusers folder"
    print(f"wrote {out} ({kind}): {Path(a.delta).name} merged at strength {a.strength:g}")
    return 0
