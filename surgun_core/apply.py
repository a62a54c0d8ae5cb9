"""Bake a delta into a model: W += strength * (alpha / r) * up @ down, written as a new checkpoint.

Inputs: a single .safetensors checkpoint (A1111/ComfyUI layout) or a diffusers model folder; a kohya LoRA
delta (SurgUn's), whose module names may be diffusers' (down_blocks.1.attentions.0...to_k, from the diffusers
backend) or LDM's (input_blocks.4.1...to_k, from the ComfyUI and A1111 backends): both are recognised.

Output, by `out_path`:
- ends in .safetensors: one single-file checkpoint. From a single file, only the adapted UNet weights
  change (merged in float32, stored back in their own dtype); every other tensor and the header metadata
  are copied through, so the key layout is the input's (this also serves SD3/Flux files in ComfyUI's
  layout, merged by LDM module name). From a diffusers folder, SD1.x/SDXL are written in the LDM layout.
- no suffix: a diffusers model folder (float32), which must not exist yet or be empty.
Both are written under a temporary name in the target folder and renamed at the end, so a failure leaves
nothing behind. The header (or, for a folder, model_index.json's "_surgun_merged") records the merge:
surgun.merged_delta, surgun.merged_strength, surgun.concepts, surgun.base_fingerprint (of the model merged
into; Backend.fingerprint's value), surgun.delta_base_fingerprint, and surgun.merged, the list of all
merges so far.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from .backends.base import fingerprint_of
from .backends.diffusers import DiffusersBackend, save_diffusers_folder
from .backends.ldm_keys import UNET_PREFIX, UNetLayout, ldm_key_to_unet, unet_key_to_ldm
from .backends.single_file import (
    CheckpointInfo,
    inspect_checkpoint,
    ldm_unet_names,
    load_model,
    load_tensors,
    save_single_file,
    single_file_family,
)
from .errors import ConfigError, DeltaMismatchError
from .io import atomic_path
from .lora import LoraDelta

log = logging.getLogger(__name__)

_ARCH_FAMILIES = {"stable-diffusion-v1": "SD1.x", "stable-diffusion-v2": "SD2.x", "stable-diffusion-xl": "SDXL",
                  "stable-diffusion-3": "SD3", "flux": "Flux", "sana": "SANA"}  # fmt: skip


def apply_delta_to_checkpoint(
    model_path: str | os.PathLike,
    delta_path: str | os.PathLike,
    strength: float,
    out_path: str | os.PathLike,
    config: str | os.PathLike | None = None,
) -> Path:
    """Merge the delta at `strength` into the model and write the result to `out_path` (module docstring).

    `config`: for a single-file input written as a folder, the diffusers config folder load_model takes.
    Returns out_path. Raises DeltaMismatchError when the delta does not fit the model, ConfigError for bad paths.
    """
    model, out = Path(model_path), Path(out_path)
    if not math.isfinite(float(strength)):
        raise ConfigError("strength", f"{strength!r} is not a finite number; use e.g. 1.0 (or 0.5 to erase half way)")
    _check_out(model, out)
    if out.suffix == ".safetensors" and not model.is_dir():
        return _merge_file(inspect_checkpoint(model), Path(delta_path), float(strength), out)
    backend = load_model(model, device="cpu", config=None if model.is_dir() else config)
    if out.suffix == ".safetensors":
        single_file_family(backend)  # refuse a model without a single-file layout before merging
    base_fp = backend.fingerprint()
    modules = backend_linears(backend)
    delta = _load_delta(delta_path, modules, backend.architecture)
    delta.merge_into(modules, float(strength))
    meta = merge_metadata({}, delta, Path(delta_path).name, float(strength), base_fp)
    if out.suffix == ".safetensors":
        return save_single_file(backend, out, meta)
    return _save_folder(backend, out, meta)


def _check_out(model: Path, out: Path) -> None:
    if out.suffix not in ("", ".safetensors"):
        raise ConfigError(
            "out", f"{out.name}: end it in .safetensors for a single-file checkpoint, or give a folder name without "
            "a suffix for a diffusers folder"
        )  # fmt: skip
    if out.resolve() == model.resolve():
        raise ConfigError("out", f"{out} is the model itself; write the merged model under a new name")
    if out.suffix == "" and out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError("out", f"{out} already exists and is not an empty folder; choose a new folder name")


def backend_linears(backend: DiffusersBackend) -> dict[str, nn.Linear]:
    """The denoiser's Linear layers by diffusers name and, for SD UNets, also by LDM name (one module, two keys)."""
    linears = {n: m for n, m in backend.denoiser.named_modules() if isinstance(m, nn.Linear)}
    try:
        layout = UNetLayout.from_config(backend.denoiser.config) if backend.family in ("sd1", "sdxl") else None
    except ConfigError:  # a UNet without an LDM layout: its deltas can only use diffusers names
        layout = None
    if layout is not None:
        for name, mod in list(linears.items()):
            ldm = unet_key_to_ldm(name + ".weight", layout)
            if ldm is not None:
                linears[ldm[len(UNET_PREFIX) :].removesuffix(".weight")] = mod
    return linears


def _load_delta(delta_path, modules: dict[str, nn.Linear], architecture: str) -> LoraDelta:
    """Read the delta for these modules; refuse another architecture's delta before touching any weight."""
    delta = LoraDelta.load(delta_path, list(modules))
    made_for = delta.metadata.get("surgun.base_architecture") or delta.metadata.get("modelspec.architecture", "")
    made_for = made_for.removesuffix("/lora")
    want, have = _arch_family(made_for), _arch_family(architecture)
    if want and have and want != have:
        raise DeltaMismatchError(
            f"{delta.source}: was made for {want} ({made_for}) but the model is {have} ({architecture}); apply it "
            f"to a {want} model"
        )
    delta.check_shapes(modules)
    return delta


def _arch_family(architecture: str) -> str | None:
    return next((f for prefix, f in _ARCH_FAMILIES.items() if architecture.startswith(prefix)), None)


def merge_metadata(meta: dict[str, str], delta: LoraDelta, delta_name: str, strength: float, base_fp: str) -> dict:
    """`meta` plus the surgun.* keys saying what was merged (module docstring); all values are strings."""
    trained_on = delta.metadata.get("surgun.base_fingerprint", "")
    if trained_on and trained_on != base_fp:
        log.warning("%s was trained on base %s; merging it into %s", delta_name, trained_on, base_fp)
    concepts = delta.metadata.get("surgun.concepts", "[]")
    record = {"delta": delta_name, "strength": strength, "concepts": _json_or_text(concepts),
              "base_fingerprint": base_fp, "delta_base_fingerprint": trained_on}  # fmt: skip
    history = _json_or_text(meta.get("surgun.merged", "[]"))
    return {
        **meta,
        "surgun.merged_delta": delta_name,
        "surgun.merged_strength": repr(strength),
        "surgun.concepts": concepts,
        "surgun.base_fingerprint": base_fp,
        "surgun.delta_base_fingerprint": trained_on,
        "surgun.merged": json.dumps([*(history if isinstance(history, list) else []), record]),
    }


def _json_or_text(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _merge_file(info: CheckpointInfo, delta_path: Path, strength: float, out: Path) -> Path:
    """Single file -> single file, in its own key layout: only the adapted weights change."""
    names = ldm_unet_names(info.shapes)  # module name -> weight key
    # Shape-only stand-ins, so the delta is checked against the file before any tensor is read.
    with torch.device("meta"):
        fakes = {n: nn.Linear(info.shapes[k][1], info.shapes[k][0], bias=False) for n, k in names.items()}
    delta = _load_delta(delta_path, fakes, info.architecture)
    tensors = load_tensors(info.path)
    base_fp = file_fingerprint(info, tensors)
    for name, (down, up, alpha) in delta.weights.items():
        w = tensors[names[name]]
        tensors[names[name]] = (w.float() + strength * alpha / down.shape[0] * (up @ down)).to(w.dtype)
    meta = merge_metadata(info.metadata, delta, delta_path.name, strength, base_fp)
    meta.setdefault("modelspec.architecture", info.architecture)
    with atomic_path(out) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    log.info("merged %s (%d modules, strength %s) into %s", delta_path.name, len(delta.weights), strength, out)
    return out


def file_fingerprint(info: CheckpointInfo, tensors: dict[str, torch.Tensor]) -> str:
    """Backend.fingerprint of the model load_model would build from this file (diffusers UNet names for SD
    UNets; for other families, LDM names below model.diffusion_model.)."""
    unet = {k: v for k, v in tensors.items() if k.startswith(UNET_PREFIX)}
    if any(k.startswith(UNET_PREFIX + "input_blocks.") for k in unet):
        layout = UNetLayout.from_ldm_keys(unet)
        named = {ldm_key_to_unet(k, layout): v for k, v in unet.items()}
        if None not in named:
            return fingerprint_of(info.architecture, named)
    return fingerprint_of(info.architecture, {k[len(UNET_PREFIX) :]: v for k, v in unet.items()})


def _save_folder(backend: DiffusersBackend, out: Path, meta: dict[str, str]) -> Path:
    """save_diffusers_folder into a temporary sibling, then rename it to `out`."""
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save_diffusers_folder(backend, tmp)
        index = json.loads((tmp / "model_index.json").read_text())
        index["_surgun_merged"] = {k: v for k, v in meta.items() if k.startswith("surgun.")}
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
        if out.is_dir():
            out.rmdir()  # empty (checked before); rename cannot replace a folder on every platform
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
