"""Key names of the original (LDM/SGM) single-file checkpoints that A1111, Forge and ComfyUI load, and the
mapping between them and diffusers' module names, for SD1.x/SD2.x/SDXL UNets, the KL VAE and CLIP.

diffusers' single_file_utils converts LDM -> diffusers on load; this module is the inverse, used to write a
single file (bake) and to find a LoRA's module inside a single file without loading it. The UNet map is
built from a layout (levels, resnets per level, which levels have attention) that comes either from a
diffusers UNet config or from the LDM keys themselves, so a file can be merged into without any config.

LDM UNet layout (L = layers_per_block, n = levels):
  input_blocks.0.0 = conv_in; input_blocks.{1 + i(L+1) + j}.{0 resnet | 1 attention} = down level i, layer j;
  input_blocks.{(i+1)(L+1)}.0.op = level i's downsampler; middle_block.{0,1,2} = resnet, attention, resnet;
  output_blocks.{i(L+1) + j}.{0 resnet | 1 attention} = up level i, layer j (L+1 layers per up level), and
  the level's upsampler is output_blocks.{i(L+1) + L}.{1, or 2 after an attention}.conv.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from ..errors import ConfigError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
# where each family keeps its text encoders: (prefix, layout); "hf" = transformers CLIP names under
# <prefix>text_model., "openclip" = open_clip's names (resblocks, fused in_proj)
TEXT_PREFIXES = {
    "sd1": {"text_encoder": ("cond_stage_model.transformer.", "hf")},
    "sd2": {"text_encoder": ("cond_stage_model.model.", "openclip")},
    "sdxl": {
        "text_encoder": ("conditioner.embedders.0.transformer.", "hf"),
        "text_encoder_2": ("conditioner.embedders.1.model.", "openclip"),
    },
}

_RESNET = (
    ("norm1.", "in_layers.0."),
    ("conv1.", "in_layers.2."),
    ("norm2.", "out_layers.0."),
    ("conv2.", "out_layers.3."),
    ("time_emb_proj.", "emb_layers.1."),
    ("conv_shortcut.", "skip_connection."),
)
_VAE_RESNET = (("conv_shortcut.", "nin_shortcut."),)
_VAE_ATTN = (("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."), ("to_out.0.", "proj_out."))


@dataclass(frozen=True)
class UNetLayout:
    """What the UNet key map depends on: per level, whether its down/up blocks hold attention."""

    layers: int  # resnets per down level (diffusers layers_per_block); up levels hold layers + 1
    down_attn: tuple[bool, ...]
    up_attn: tuple[bool, ...]

    @classmethod
    def from_config(cls, config: Mapping) -> UNetLayout:
        """From a diffusers UNet2DConditionModel config."""
        layers = config["layers_per_block"]
        if not isinstance(layers, int):
            raise ConfigError("model", f"layers_per_block {layers!r} varies per level; LDM checkpoints have one value")
        if config.get("mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DCrossAttn":
            raise ConfigError("model", f"mid block {config.get('mid_block_type')!r} has no LDM single-file layout")
        return cls(
            layers,
            tuple("CrossAttn" in t for t in config["down_block_types"]),
            tuple("CrossAttn" in t for t in config["up_block_types"]),
        )

    @classmethod
    def from_ldm_keys(cls, keys: Iterable[str], prefix: str = UNET_PREFIX) -> UNetLayout:
        """From the UNet keys of a single file: the first downsampler's index gives layers_per_block."""
        ins: dict[int, set[str]] = {}
        outs: dict[int, set[str]] = {}
        for k in keys:
            m = re.match(re.escape(prefix) + r"(input|output)_blocks\.(\d+)\.(\d+)\.(op\.)?", k)
            if m:
                part = "op" if m.group(4) else m.group(3)
                (ins if m.group(1) == "input" else outs).setdefault(int(m.group(2)), set()).add(part)
        if not ins or not outs:
            raise ConfigError("model", f"no {prefix}input_blocks/output_blocks keys: not an SD-family UNet")
        ops = sorted(i for i, parts in ins.items() if "op" in parts)
        layers = ops[0] - 1 if ops else max(ins)
        levels = len(ops) + 1
        down = tuple("1" in ins.get(1 + i * (layers + 1), set()) for i in range(levels))
        up = tuple("1" in outs.get(i * (layers + 1), set()) for i in range(levels))
        if len(outs) != levels * (layers + 1):
            raise ConfigError("model", f"{len(outs)} output blocks do not fit {levels} levels of {layers} layers")
        return cls(layers, down, up)

    def prefix_pairs(self) -> tuple[tuple[str, str, tuple[tuple[str, str], ...]], ...]:
        """(diffusers module prefix, LDM module prefix, renames inside it); prefixes end in '.', so at most
        one pair covers a key."""
        return _unet_pairs(self)


@functools.lru_cache(maxsize=8)
def _unet_pairs(layout: UNetLayout) -> tuple[tuple[str, str, tuple[tuple[str, str], ...]], ...]:
    L, R = layout.layers, _RESNET
    pairs = [("time_embedding.linear_1.", "time_embed.0.", ()), ("time_embedding.linear_2.", "time_embed.2.", ()),
             ("add_embedding.linear_1.", "label_emb.0.0.", ()), ("add_embedding.linear_2.", "label_emb.0.2.", ()),
             ("conv_in.", "input_blocks.0.0.", ()), ("conv_norm_out.", "out.0.", ()), ("conv_out.", "out.2.", ()),
             ("mid_block.resnets.0.", "middle_block.0.", R), ("mid_block.attentions.0.", "middle_block.1.", ()),
             ("mid_block.resnets.1.", "middle_block.2.", R)]  # fmt: skip
    levels = len(layout.down_attn)
    for i in range(levels):
        for j in range(L):
            k = 1 + i * (L + 1) + j
            pairs.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{k}.0.", R))
            if layout.down_attn[i]:
                pairs.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{k}.1.", ()))
        if i < levels - 1:
            pairs.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(i + 1) * (L + 1)}.0.op.", ()))
        for j in range(L + 1):
            k = i * (L + 1) + j
            pairs.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{k}.0.", R))
            if layout.up_attn[i]:
                pairs.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{k}.1.", ()))
        if i < levels - 1:
            up = f"output_blocks.{i * (L + 1) + L}.{2 if layout.up_attn[i] else 1}.conv."
            pairs.append((f"up_blocks.{i}.upsamplers.0.conv.", up, ()))
    return tuple(pairs)


def _convert(key: str, pairs, to_ldm: bool) -> str | None:
    """Map one key through (diffusers prefix, ldm prefix, renames) pairs; None if no pair covers it."""
    for diff, ldm, renames in pairs:
        src, dst = (diff, ldm) if to_ldm else (ldm, diff)
        if key.startswith(src):
            rest = key[len(src) :]
            for a, b in renames:
                a, b = (a, b) if to_ldm else (b, a)
                if rest.startswith(a):
                    rest = b + rest[len(a) :]
                    break
            return dst + rest
    return None


def unet_key_to_ldm(key: str, layout: UNetLayout) -> str | None:
    """'down_blocks.1.attentions.0.proj_in.weight' -> 'model.diffusion_model.input_blocks.4.1.proj_in.weight'."""
    out = _convert(key, layout.prefix_pairs(), to_ldm=True)
    return None if out is None else UNET_PREFIX + out


def ldm_key_to_unet(key: str, layout: UNetLayout) -> str | None:
    """The inverse of unet_key_to_ldm; None for keys outside the UNet or not covered by the layout."""
    if not key.startswith(UNET_PREFIX):
        return None
    return _convert(key[len(UNET_PREFIX) :], layout.prefix_pairs(), to_ldm=False)


def unet_to_ldm(state: Mapping[str, torch.Tensor], layout: UNetLayout) -> dict[str, torch.Tensor]:
    """A diffusers UNet state dict in LDM names (same tensors; every key must map)."""
    pairs = layout.prefix_pairs()
    out = {}
    for k, v in state.items():
        new = _convert(k, pairs, to_ldm=True)
        if new is None:
            raise ConfigError("model", f"UNet tensor {k!r} has no place in the LDM single-file layout")
        out[UNET_PREFIX + new] = v
    return out


def _vae_pairs(levels: int, layers: int) -> list[tuple[str, str, tuple[tuple[str, str], ...]]]:
    pairs = [("encoder.conv_norm_out.", "encoder.norm_out.", ()), ("decoder.conv_norm_out.", "decoder.norm_out.", ())]
    for part in ("encoder", "decoder"):
        pairs += [(f"{part}.mid_block.resnets.0.", f"{part}.mid.block_1.", _VAE_RESNET),
                  (f"{part}.mid_block.resnets.1.", f"{part}.mid.block_2.", _VAE_RESNET),
                  (f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.", _VAE_ATTN)]  # fmt: skip
    for i in range(levels):
        for j in range(layers):
            pairs.append((f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.", _VAE_RESNET))
        pairs.append((f"encoder.down_blocks.{i}.downsamplers.0.conv.", f"encoder.down.{i}.downsample.conv.", ()))
        up = levels - 1 - i  # LDM numbers decoder levels from the lowest resolution up
        for j in range(layers + 1):
            pairs.append((f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{up}.block.{j}.", _VAE_RESNET))
        pairs.append((f"decoder.up_blocks.{i}.upsamplers.0.conv.", f"decoder.up.{up}.upsample.conv.", ()))
    return pairs


def vae_to_ldm(state: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    """A diffusers AutoencoderKL state dict in LDM names; attention projections become 1x1 convs."""
    pairs = _vae_pairs(len(config["block_out_channels"]), int(config["layers_per_block"]))
    out = {}
    for k, v in state.items():
        new = _convert(k, pairs, to_ldm=True)
        new = k if new is None else new  # conv_in, conv_out, quant_conv, post_quant_conv keep their names
        if ".mid.attn_1." in new and new.endswith(".weight") and v.dim() == 2:
            v = v[:, :, None, None]  # (out, in) -> (out, in, 1, 1)
        out[VAE_PREFIX + new] = v
    return out


def clip_to_ldm(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """A transformers CLIPTextModel state dict under an LDM prefix (names unchanged below text_model.)."""
    return {prefix + "text_model." + k.removeprefix("text_model."): v for k, v in state.items()}


def open_clip_to_ldm(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """A transformers CLIPTextModel(WithProjection) state dict in open_clip names: q/k/v fused into in_proj,
    text_projection transposed (open_clip multiplies x @ P)."""
    state = {k.removeprefix("text_model."): v for k, v in state.items()}
    out = {}
    fixed = {"embeddings.token_embedding.weight": "token_embedding.weight",
             "embeddings.position_embedding.weight": "positional_embedding",
             "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}  # fmt: skip
    layer_renames = (("layer_norm1.", "ln_1."), ("layer_norm2.", "ln_2."), ("mlp.fc1.", "mlp.c_fc."),
                     ("mlp.fc2.", "mlp.c_proj."), ("self_attn.out_proj.", "attn.out_proj."))  # fmt: skip
    for k, v in state.items():
        if k in fixed:
            out[prefix + fixed[k]] = v
        elif k == "text_projection.weight":
            out[prefix + "text_projection"] = v.t().contiguous()
        elif m := re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)", k):
            block, rest = f"{prefix}transformer.resblocks.{m.group(1)}.", m.group(2)
            if q := re.fullmatch(r"self_attn\.q_proj\.(weight|bias)", rest):
                kind = q.group(1)
                parts = [state[f"encoder.layers.{m.group(1)}.self_attn.{p}_proj.{kind}"] for p in "qkv"]
                out[f"{block}attn.in_proj_{kind}"] = torch.cat(parts)
            elif not re.fullmatch(r"self_attn\.[kv]_proj\.(weight|bias)", rest):
                new = _convert(rest, [("", "", layer_renames)], to_ldm=True)
                out[block + new] = v
        elif k != "embeddings.position_ids":
            raise ConfigError("model", f"text encoder tensor {k!r} has no place in the open_clip layout")
    return out
