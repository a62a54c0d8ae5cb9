"""Single-file checkpoints (A1111/ComfyUI .safetensors, original LDM/SGM key layout): detect, load, write.

Detection reads only the safetensors header (names and shapes), plus one small tensor for SD2's prediction
type. Loading builds diffusers modules with diffusers' own LDM converters (`from_single_file` on the UNet and
VAE, `create_diffusers_clip_model_from_ldm` for CLIP) from configs that ship in backends/configs/<family>/,
so nothing is fetched from a model hub; CLIP's tokenizer comes from clip_vocab.py.

Prediction type, first rule that applies: the `prediction_type` argument; header metadata
modelspec.prediction_type ("v"/"v_prediction" or "epsilon"); a `v_pred` tensor in the file (the marker
v-prediction SDXL fine-tunes carry); the scheduler of a config folder the caller gave; for SD2, ComfyUI's
rule: std of output_blocks.11.1.transformer_blocks.0.norm1.bias above 0.09 means v (768-v, 768 px), else
epsilon (512 base, 512 px); otherwise epsilon. The key layout cannot tell v from epsilon, so an SD2 fine-tune
that moved that bias across 0.09 is misread: pass prediction_type then.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ..errors import ConfigError
from ..io import atomic_path
from .clip_vocab import CONFIGS, clip_tokenizer
from .diffusers import DiffusersBackend, load_diffusers_folder
from .ldm_keys import (
    TEXT_PREFIXES,
    UNET_PREFIX,
    UNetLayout,
    clip_to_ldm,
    ldm_key_to_unet,
    open_clip_to_ldm,
    unet_to_ldm,
    vae_to_ldm,
)
from .text import ClipText, SdxlText

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
LOADABLE = ("sd1", "sd2", "sdxl")
KNOWN = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL base", "sd3": "SD3", "flux": "Flux"}
SUPPORTED = "SD1.x, SD2.x (512 and 768-v) and SDXL base single files in the A1111/ComfyUI layout, or a diffusers folder"
SD2_V_KEY = UNET_PREFIX + "output_blocks.11.1.transformer_blocks.0.norm1.bias"


@dataclass
class CheckpointInfo:
    """What a single file's header says: its family, architecture and prediction type (and why)."""

    path: Path
    family: str  # sd1 | sd2 | sdxl | sd3 | flux
    architecture: str  # modelspec.architecture
    prediction_type: str  # epsilon | v_prediction | flow
    prediction_rule: str  # which rule decided it (module docstring)
    shapes: dict[str, tuple[int, ...]] = field(repr=False)
    metadata: dict[str, str] = field(repr=False)


def read_header(path: str | Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Tensor shapes and metadata from a .safetensors header; refuses pickles and broken files in one line."""
    path = _existing_file(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
            return shapes, dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise _unreadable(path, e) from None


def _existing_file(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise ConfigError("model", f"{path} does not exist; give a .safetensors checkpoint or a diffusers model folder")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise _pickle_error(path)
    if not path.is_file():
        raise ConfigError("model", f"{path} is not a file")
    return path


def _pickle_error(path: Path) -> ConfigError:
    return ConfigError(
        "model",
        f"{path.name} is a pickle checkpoint (.ckpt/.pt/.pth/.bin); SurgUn loads only .safetensors because "
        "loading a pickle can run code hidden in it. Convert it to .safetensors with a tool you trust "
        "(or download the .safetensors release of the model).",
    )


def _unreadable(path: Path, err: Exception) -> ConfigError:
    """A pickle in disguise gets the pickle message; anything else says the file is damaged or truncated."""
    with path.open("rb") as f:
        head = f.read(4)
    if head == b"PK\x03\x04" or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")):
        return _pickle_error(path)
    reason = str(err).splitlines()[0] if str(err) else type(err).__name__
    return ConfigError(
        "model", f"{path.name} is not a readable safetensors file ({reason}); it may be truncated: copy it again"
    )


def detect_family(shapes: dict[str, tuple[int, ...]]) -> str:
    """sd1 | sd2 | sdxl | sd3 | flux from key names (and the cross-attention width when no text encoder is in
    the file); a ConfigError naming what was found for anything else."""
    keys = shapes.keys()
    if _has(keys, UNET_PREFIX + "joint_blocks."):
        return "sd3"
    if _has(keys, "double_blocks.") or _has(keys, UNET_PREFIX + "double_blocks."):
        return "flux"
    if _has(keys, UNET_PREFIX + "input_blocks."):
        if _has(keys, "conditioner.embedders.1.model."):
            return "sdxl"
        if _has(keys, "conditioner.embedders.0.model."):
            raise ConfigError("model", f"an SDXL refiner (or SD2 in SGM layout) checkpoint is not supported; {_ok()}")
        if _has(keys, "cond_stage_model.transformer.text_model."):
            return "sd1"
        if _has(keys, "cond_stage_model.model."):
            return "sd2"
        context = {v[1] for k, v in shapes.items() if k.endswith("attn2.to_k.weight") and len(v) == 2}
        by_width = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
        if len(context) == 1 and next(iter(context)) in by_width:
            return by_width[next(iter(context))]
        raise ConfigError("model", f"an SD-style UNet with cross-attention width {sorted(context)}, no known; {_ok()}")
    found = Counter(".".join(k.split(".")[:2]) + (".*" if k.count(".") > 1 else "") for k in keys).most_common(6)
    listing = ", ".join(f"{p} ({n})" for p, n in found) or "no tensors"
    raise ConfigError("model", f"unknown checkpoint layout: found {listing}; {_ok()}")


def _has(keys, prefix: str) -> bool:
    return any(k.startswith(prefix) for k in keys)


def _ok() -> str:
    return f"SurgUn loads {SUPPORTED}"


def inspect_checkpoint(path: str | Path, prediction_type: str | None = None) -> CheckpointInfo:
    """Family, architecture and prediction type of a single-file checkpoint, from its header."""
    path = Path(path)
    shapes, meta = read_header(path)
    family = detect_family(shapes)
    pred, rule = _prediction(path, family, shapes, meta, prediction_type)
    return CheckpointInfo(path, family, architecture(family, pred), pred, rule, shapes, meta)


def architecture(family: str, prediction_type: str) -> str:
    """modelspec.architecture of a family (SD2's depends on its prediction type: 768-v or 512 base)."""
    if family == "sd2":
        return "stable-diffusion-v2-768-v" if prediction_type == "v_prediction" else "stable-diffusion-v2-512"
    return {"sd1": "stable-diffusion-v1", "sdxl": "stable-diffusion-xl-v1-base", "sd3": "stable-diffusion-3-medium",
            "flux": "flux-1-dev"}[family]  # fmt: skip


def _prediction(path: Path, family: str, shapes: dict, meta: dict, given: str | None) -> tuple[str, str]:
    if family in ("sd3", "flux"):
        return "flow", "family"
    if given:
        return given, "argument"
    said = meta.get("modelspec.prediction_type", "").lower()
    if said in ("v", "v_prediction", "v-prediction", "epsilon", "eps"):
        return ("v_prediction" if said.startswith("v") else "epsilon"), "metadata"
    if "v_pred" in shapes:
        return "v_prediction", "v_pred key"
    if family == "sd2" and SD2_V_KEY in shapes:
        try:
            with safe_open(str(path), framework="pt") as f:
                std = float(f.get_tensor(SD2_V_KEY).float().std(unbiased=False))
        except (SafetensorError, OSError, ValueError) as e:
            raise _unreadable(path, e) from None
        return ("v_prediction" if std > 0.09 else "epsilon"), "SD2 norm1.bias std"
    return "epsilon", "default"


def load_model(
    path: str | Path,
    device: str = "auto",
    precision: str = "float32",
    config: str | Path | None = None,
    prediction_type: str | None = None,
) -> DiffusersBackend:
    """A diffusers model folder, or a single .safetensors checkpoint (SD1.x, SD2.x, SDXL), as a Backend.

    `config`: a diffusers folder whose configs describe the checkpoint's networks (and tokenizers, where they
    hold vocab.json or tokenizer.json); default: the shipped configs of the detected family. Nothing is
    downloaded.
    """
    path = Path(path)
    if path.is_dir():
        if (path / "model_index.json").is_file():
            return load_diffusers_folder(path, device, precision)
        found = ", ".join(sorted(p.name for p in path.iterdir())[:8]) or "nothing"
        raise ConfigError("model", f"{path} is a folder without model_index.json (found: {found}); {_ok()}")
    info = inspect_checkpoint(path, prediction_type)
    if info.family not in LOADABLE:
        raise ConfigError("model", _unsupported(info))
    cfg_dir = _config_dir(config, info.family)
    sd = load_tensors(path)
    unet_kw = {}
    if config is None and info.family == "sd2" and info.prediction_type == "epsilon":
        unet_kw["sample_size"] = 64  # SD2 512-base; the shipped config is 768-v's (96 latents)
    unet = _component(
        path, "UNet", lambda: _diffusers_part("UNet2DConditionModel", sd, cfg_dir, "unet", **unet_kw), cfg_dir, sd
    )
    vae = _component(path, "VAE", lambda: _diffusers_part("AutoencoderKL", sd, cfg_dir, "vae"), cfg_dir, sd)
    text = _text_side(path, info.family, sd, cfg_dir)
    sched = json.loads((cfg_dir / "scheduler" / "scheduler_config.json").read_text())
    if config is None or info.prediction_rule not in ("SD2 norm1.bias std", "default"):
        sched["prediction_type"] = info.prediction_type  # else the given config's scheduler decides
    arch = architecture(info.family, sched.get("prediction_type", "epsilon"))
    log.info("%s: %s, %s (%s)", path.name, arch, sched.get("prediction_type"), info.prediction_rule)
    return DiffusersBackend(unet, text, sched, vae=vae, architecture=arch, device=device, precision=precision)


def _unsupported(info: CheckpointInfo) -> str:
    parts = {"text encoder CLIP-L": ("text_encoders.clip_l.",), "text encoder CLIP-G": ("text_encoders.clip_g.",),
             "text encoder T5-XXL": ("text_encoders.t5xxl.",), "VAE": ("first_stage_model.", "vae.")}  # fmt: skip
    present = [n for n, ps in parts.items() if any(k.startswith(ps) for k in info.shapes)]
    missing = [n for n in parts if n not in present and not (info.family == "flux" and "CLIP-G" in n)]
    return (
        f"{info.path.name} is a {KNOWN[info.family]} checkpoint (transformer"
        + "".join(f", {p}" for p in present)
        + (f"; not in the file: {', '.join(missing)}" if missing else "")
        + f"). Training on it through diffusers needs a {KNOWN[info.family]} transformer backend, which SurgUn "
        "does not have yet, and the T5 tokenizer (spiece.model), which is not shipped and cannot be downloaded "
        f"here. Erase {KNOWN[info.family]} models in ComfyUI with the SurgUn nodes (they use ComfyUI's own "
        f"loader), or give one of: {SUPPORTED}"
    )


def _config_dir(config: str | Path | None, family: str) -> Path:
    if config is None:
        return CONFIGS / family
    cfg = Path(config)
    if not (cfg / "model_index.json").is_file() or not (cfg / "unet" / "config.json").is_file():
        raise ConfigError("config", f"{cfg} is not a diffusers config folder (model_index.json, unet/config.json)")
    return cfg


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a .safetensors file; a damaged file raises one ConfigError line."""
    path = _existing_file(path)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise _unreadable(path, e) from None


def _component(path: Path, what: str, build, cfg_dir: Path, sd: dict | None = None):
    """Run a diffusers loader; shape mismatches and missing tensors become one ConfigError naming the part."""
    from diffusers.loaders.single_file_utils import SingleFileComponentError

    shipped = cfg_dir.parent == CONFIGS
    hint = (
        f"the shipped {cfg_dir.name} config describes the released model; for a model of other sizes pass "
        "config=<its diffusers folder>"
        if shipped
        else f"{cfg_dir} does not describe this checkpoint"
    )
    try:
        module = build()
        failed = any(p.is_meta for p in module.parameters())
    except (ValueError, RuntimeError, KeyError, OSError, SingleFileComponentError) as e:
        text = str(e).strip()
        m = re.search(r"(\S+) expected shape torch\.Size\((\[[^]]*\])\), but got torch\.Size\((\[[^]]*\])\)", text)
        if m:
            detail = f"{m.group(1)} is {m.group(3)}, the config wants {m.group(2)}"
            raise ConfigError("model", f"{path.name}: its {what} does not fit the config ({detail}); {hint}") from None
        failed, first = True, text.splitlines()[0][:200] if text else type(e).__name__
    if failed:  # diffusers leaves tensors the file lacks on the meta device (or fails moving them)
        missing = _missing_keys(what, sd or {}, cfg_dir)
        if missing:
            raise ConfigError(
                "model", f"{path.name}: {len(missing)} {what} tensors are missing, e.g. {missing[0]}; {hint}"
            )
        raise ConfigError("model", f"{path.name}: its {what} could not be loaded ({first}); {hint}")
    return module


def _missing_keys(what: str, sd: dict, cfg_dir: Path) -> list[str]:
    """The LDM keys the config's UNet or VAE needs that `sd` lacks (empty for other parts)."""
    import diffusers

    if what not in ("UNet", "VAE"):
        return []
    sub, cls = ("unet", "UNet2DConditionModel") if what == "UNet" else ("vae", "AutoencoderKL")
    cfg = json.loads((cfg_dir / sub / "config.json").read_text())
    with torch.device("meta"):
        state = getattr(diffusers, cls).from_config(cfg).state_dict()
    keys = unet_to_ldm(state, UNetLayout.from_config(cfg)) if what == "UNet" else vae_to_ldm(state, cfg)
    return [k for k in keys if k not in sd]


def _diffusers_part(cls_name: str, sd: dict, cfg_dir: Path, sub: str, **kw):
    import diffusers

    cls = getattr(diffusers, cls_name)
    return cls.from_single_file(sd, config=str(cfg_dir), subfolder=sub, local_files_only=True, **kw)


def _clip_part(cls_name: str, sd: dict, cfg_dir: Path, sub: str):
    import transformers
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm

    cls = getattr(transformers, cls_name)
    return create_diffusers_clip_model_from_ldm(cls, sd, subfolder=sub, config=str(cfg_dir), local_files_only=True)


def _text_side(path: Path, family: str, sd: dict, cfg_dir: Path):
    for sub, (prefix, _) in TEXT_PREFIXES[family].items():
        if not any(k.startswith(prefix) for k in sd):
            raise ConfigError("model", f"{path.name} holds no {sub} ({prefix}*); give a full checkpoint")
    te = _component(path, "text encoder", lambda: _clip_part("CLIPTextModel", sd, cfg_dir, "text_encoder"), cfg_dir)
    if family != "sdxl":
        return ClipText(clip_tokenizer(cfg_dir / "tokenizer"), te)
    te2 = _component(
        path,
        "text encoder 2",
        lambda: _clip_part("CLIPTextModelWithProjection", sd, cfg_dir, "text_encoder_2"),
        cfg_dir,
    )
    index = json.loads((cfg_dir / "model_index.json").read_text())
    return SdxlText(clip_tokenizer(cfg_dir / "tokenizer"), te, clip_tokenizer(cfg_dir / "tokenizer_2"), te2,
                    zero_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", True)))  # fmt: skip


# ---- writing ------------------------------------------------------------------------------------------------


def single_file_family(backend: DiffusersBackend) -> str:
    """sd1 | sdxl: the LDM layout `backend` can be written in; a ConfigError for anything else."""
    cross = getattr(backend.denoiser.config, "cross_attention_dim", None)
    if backend.family == "sd1" and (backend.architecture.startswith("stable-diffusion-v2") or cross == 1024):
        raise ConfigError(
            "out", "an SD2 diffusers model cannot be written as a single file (its text encoder lacks the last "
            "OpenCLIP layer the file needs); write a diffusers folder (an out path without .safetensors)"
        )  # fmt: skip
    if backend.family not in ("sd1", "sdxl") or backend.vae is None or type(backend.vae).__name__ != "AutoencoderKL":
        raise ConfigError(
            "out", f"a {backend.family} model without a KL VAE has no single-file layout A1111/ComfyUI read; write a "
            "diffusers folder (an out path without .safetensors)"
        )  # fmt: skip
    return backend.family


def backend_to_ldm(backend: DiffusersBackend) -> dict[str, torch.Tensor]:
    """Every tensor of an SD1.x or SDXL backend (UNet, VAE, text encoders) under its LDM single-file key."""
    family = single_file_family(backend)
    out = unet_to_ldm(backend.denoiser.state_dict(), UNetLayout.from_config(backend.denoiser.config))
    out.update(vae_to_ldm(backend.vae.state_dict(), backend.vae.config))
    encoders = {"text_encoder": backend.text.encoder, "text_encoder_2": getattr(backend.text, "encoder_2", None)}
    for sub, (prefix, layout) in TEXT_PREFIXES[family].items():
        to_ldm = clip_to_ldm if layout == "hf" else open_clip_to_ldm
        out.update(to_ldm(encoders[sub].state_dict(), prefix))
    return {k: v.detach().cpu().contiguous() for k, v in out.items()}


def save_single_file(backend: DiffusersBackend, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write an SD1.x/SDXL backend as one .safetensors checkpoint in the A1111/ComfyUI layout, atomically."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ConfigError("out", f"{path.name}: a single-file checkpoint must end in .safetensors")
    tensors = backend_to_ldm(backend)
    pred = "v" if backend.objective.prediction_type == "v_prediction" else backend.objective.prediction_type
    meta = {"modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": backend.architecture,
            "modelspec.prediction_type": pred, "modelspec.title": path.stem, **(metadata or {})}  # fmt: skip
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


def ldm_unet_names(shapes: dict[str, tuple[int, ...]]) -> dict[str, str]:
    """Module name -> LDM weight key for every 2-D (Linear) UNet weight of a single file, under both its LDM
    name (input_blocks.4.1....to_k, as ComfyUI/A1111 deltas use) and, for SD UNets, its diffusers name."""
    names = {}
    for k, shape in shapes.items():
        if k.startswith(UNET_PREFIX) and k.endswith(".weight") and len(shape) == 2:
            names[k[len(UNET_PREFIX) : -len(".weight")]] = k
    if any(k.startswith(UNET_PREFIX + "input_blocks.") for k in shapes):
        layout = UNetLayout.from_ldm_keys(shapes)
        for key in list(names.values()):
            diff = ldm_key_to_unet(key, layout)
            if diff is not None:
                names[diff.removesuffix(".weight")] = key
    return names
