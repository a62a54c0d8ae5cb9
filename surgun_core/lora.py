"""LoRA adapters on Linear layers, and the delta file (DESIGN.md section 4).

Adapters attach to a model with forward hooks, so module names and state_dict keys of the model never
change and the same adapters work on diffusers, ComfyUI and A1111 modules. `LoRASet.disabled()` turns them
off for the frozen-teacher passes. A delta file is a safetensors LoRA with kohya keys
(`lora_unet_<module path with _>.lora_down.weight / .lora_up.weight / .alpha`) that ComfyUI, A1111/Forge
and diffusers read, plus metadata in the header.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from .errors import ConfigError, DeltaFormatError, DeltaMismatchError
from .io import Written, atomic_path, write_failure

SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")


class LoRALayer(nn.Module):
    """delta_W = (alpha / rank) * up @ down; `up` starts at zero so a fresh layer changes nothing."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float) -> None:
        super().__init__()
        self.down = nn.Parameter(torch.empty(rank, in_features))
        self.up = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.down, a=5**0.5)
        self.register_buffer("alpha", torch.tensor(float(alpha)), persistent=True)

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.rank

    def delta_weight(self) -> torch.Tensor:
        return self.scale * (self.up @ self.down)  # (out, in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        down = self.down.to(x.dtype)
        up = self.up.to(x.dtype)
        return self.scale * ((x @ down.t()) @ up.t())


class LoRASet(nn.Module):
    """LoRA layers for a set of named Linear modules, attached with forward hooks."""

    def __init__(self, targets: dict[str, nn.Linear], rank: int = 4, alpha: float = 4.0) -> None:
        super().__init__()
        if not targets:
            raise ConfigError("blocks", "no Linear layer to adapt; the blocks pattern matched nothing")
        self.names = list(targets)
        self.targets = dict(targets)
        self.layers = nn.ModuleDict(
            {_key(n): LoRALayer(m.in_features, m.out_features, rank, alpha) for n, m in targets.items()}
        )
        self.enabled = True
        self.strength = 1.0
        self._handles: list = []

    def layer(self, name: str) -> LoRALayer:
        return self.layers[_key(name)]

    def attach(self) -> LoRASet:
        if self._handles:
            return self
        for name, mod in self.targets.items():
            layer = self.layer(name)
            device = next(mod.parameters()).device
            layer.to(device)
            self._handles.append(mod.register_forward_hook(self._hook(layer), with_kwargs=True))
        return self

    def _hook(self, layer: LoRALayer):
        def hook(_mod, args, kwargs, out):
            if not self.enabled or self.strength == 0:
                return out
            x = args[0] if args else kwargs["input"]
            return out + self.strength * layer(x)

        return hook

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """Run the frozen model: the adapters add nothing inside this block."""
        prev, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = prev

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.layers.state_dict().items()}

    def restore(self, snap: dict[str, torch.Tensor]) -> None:
        self.layers.load_state_dict(snap)

    def to_delta(self, prefix: str, metadata: dict[str, str] | None = None) -> LoraDelta:
        weights = {}
        for n in self.names:
            lay = self.layer(n)
            weights[n] = (lay.down.detach().float().cpu(), lay.up.detach().float().cpu(), float(lay.alpha))
        return LoraDelta(weights=weights, prefix=prefix, metadata=dict(metadata or {}))


def _key(name: str) -> str:
    return name.replace(".", "__")


def kohya_key(prefix: str, name: str) -> str:
    """'down_blocks.1.attentions.0...to_k' -> 'lora_unet_down_blocks_1_attentions_0_..._to_k'."""
    return f"{prefix}_{name.replace('.', '_')}"


@dataclass
class LoraDelta:
    """A trained erasure: per module name (down (r, in), up (out, r), alpha), and header metadata."""

    weights: dict[str, tuple[torch.Tensor, torch.Tensor, float]]
    prefix: str = "lora_unet"
    metadata: dict[str, str] = field(default_factory=dict)
    source: str = field(default="delta", repr=False, compare=False)  # the file it came from, for error messages

    def state_dict(self) -> dict[str, torch.Tensor]:
        sd = {}
        for name, (down, up, alpha) in self.weights.items():
            k = kohya_key(self.prefix, name)
            sd[k + ".lora_down.weight"] = down.contiguous()
            sd[k + ".lora_up.weight"] = up.contiguous()
            sd[k + ".alpha"] = torch.tensor(alpha, dtype=torch.float32)
        return sd

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically (temp file in the same folder, then rename): no half-written delta."""
        return self.write(path).path

    def write(self, path: str | os.PathLike) -> Written:
        """save(), also saying whether an existing file was replaced. A failed write (disk full, read-only
        mount) raises io.WriteError, one line naming the path and what to do, and leaves no file."""
        path = Path(path)
        if path.suffix != ".safetensors":
            raise ConfigError(
                "out", f"{str(path)!r}: a delta file must end in .safetensors; name it e.g. {path.stem}.safetensors"
            )
        meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in self.metadata.items()}
        writer = atomic_path(path)
        try:
            with writer as tmp:
                save_file(self.state_dict(), str(tmp), metadata=meta)
        except (OSError, SafetensorError) as e:  # safetensors reports I/O errors as SafetensorError
            raise write_failure(path, "out", e) from e
        return Written(path, writer.replaced)

    @classmethod
    def load(cls, path: str | os.PathLike, module_names: list[str]) -> LoraDelta:
        """Read a kohya-keyed LoRA file for a model whose adaptable modules are `module_names`."""
        tensors, meta = read_safetensors(path)
        return cls.from_state_dict(tensors, module_names, meta, source=Path(path).name)

    @classmethod
    def from_state_dict(cls, sd, module_names, metadata=None, source="delta") -> LoraDelta:
        groups: dict[str, dict[str, torch.Tensor]] = {}
        for k, v in sd.items():
            suf = next((s for s in SUFFIXES if k.endswith(s)), None)
            if suf is None:
                raise DeltaFormatError(
                    f"{source}: key {k!r} is not a LoRA key (expected <name>{'|'.join(SUFFIXES)}); this is not a "
                    "kohya LoRA file: give a delta saved by SurgUn or another kohya-format LoRA .safetensors"
                )
            groups.setdefault(k[: -len(suf)], {})[suf] = v
        if not groups:
            raise DeltaFormatError(f"{source}: holds no LoRA tensors; give a delta saved by SurgUn")
        # The prefix names the model part (lora_unet, lora_te, lora_te1, ...); kohya writes it before the
        # module path, which itself contains '_', so take the shortest 'lora_<letters/digits>_' match.
        prefixes = set()
        for k in groups:
            m = re.match(r"(lora_[a-z0-9]+?)_", k)
            if m is None:
                raise DeltaFormatError(
                    f"{source}: key {k!r} lacks a kohya 'lora_<part>_' prefix (such as lora_unet_); "
                    "give a kohya-format LoRA .safetensors"
                )
            prefixes.add(m.group(1))
        if len(prefixes) != 1:
            raise DeltaFormatError(
                f"{source}: keys must share one 'lora_<part>_' prefix, found {sorted(prefixes)}; SurgUn deltas "
                "adapt one model part only"
            )
        prefix = prefixes.pop()
        by_key = {kohya_key(prefix, n): n for n in module_names}
        weights = {}
        for k, parts in groups.items():
            if k not in by_key:
                arch = (metadata or {}).get("modelspec.architecture", "unknown")
                raise DeltaMismatchError(
                    f"{source}: key {k!r} matches no module of this model; the delta was made for "
                    f"architecture {arch!r}. Apply it to the model it was trained on."
                )
            if ".lora_down.weight" not in parts or ".lora_up.weight" not in parts:
                raise DeltaFormatError(f"{source}: {k} lacks its lora_down or lora_up tensor")
            down, up = parts[".lora_down.weight"].float(), parts[".lora_up.weight"].float()
            if down.dim() != 2 or up.dim() != 2 or up.shape[1] != down.shape[0]:
                raise DeltaFormatError(f"{source}: {k} has inconsistent shapes {tuple(down.shape)} / {tuple(up.shape)}")
            alpha = float(parts[".alpha"]) if ".alpha" in parts else float(down.shape[0])
            weights[by_key[k]] = (down, up, alpha)
        return cls(weights=weights, prefix=prefix, metadata=dict(metadata or {}), source=source)

    def check_shapes(self, modules: dict[str, nn.Linear], source: str | None = None) -> None:
        """Raise DeltaMismatchError unless every adapted module exists in `modules` with the same Linear shape."""
        source = source or self.source
        arch = self.metadata.get("modelspec.architecture", "unknown")
        for name, (down, up, _) in self.weights.items():
            m = modules.get(name)
            if m is None:
                raise DeltaMismatchError(
                    f"{source}: the model has no module {name!r}; the delta was made for architecture "
                    f"{arch!r}. Apply it to the model it was trained on."
                )
            if down.shape[1] != m.in_features or up.shape[0] != m.out_features:
                raise DeltaMismatchError(
                    f"{source}: {name} expects a Linear {down.shape[1]}->{up.shape[0]} but the model has "
                    f"{m.in_features}->{m.out_features}; this delta was trained on another model "
                    f"(architecture {arch!r}): apply it to that one"
                )

    def to_lora_set(self, modules: dict[str, nn.Linear], strength: float = 1.0) -> LoRASet:
        """LoRA layers holding this delta, for the named modules; attach() applies it at `strength`."""
        self.check_shapes(modules)
        if not self.weights:
            raise DeltaFormatError(f"{self.source}: holds no LoRA tensors; give a delta saved by SurgUn")
        first = next(iter(self.weights.values()))
        lset = LoRASet({n: modules[n] for n in self.weights}, rank=first[0].shape[0], alpha=first[2])
        for name, (down, up, alpha) in self.weights.items():
            lay = lset.layer(name)
            if lay.rank != down.shape[0]:
                lay.down = nn.Parameter(down.clone())
                lay.up = nn.Parameter(up.clone())
            else:
                lay.down.data.copy_(down)
                lay.up.data.copy_(up)
            lay.alpha.fill_(alpha)
        lset.strength = strength
        return lset.requires_grad_(False)

    @torch.no_grad()
    def merge_into(self, modules: dict[str, nn.Linear], strength: float = 1.0) -> None:
        """W += strength * (alpha / r) * up @ down, in place (permanent; use to_lora_set to toggle)."""
        self.check_shapes(modules)
        for name, (down, up, alpha) in self.weights.items():
            w = modules[name].weight
            w += (strength * alpha / down.shape[0] * (up @ down)).to(w)


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and header metadata of a safetensors file, refusing pickles and broken files clearly.

    Parsing a safetensors header never runs code, so the file is parsed first; only when that fails is it
    sniffed for a pickle. (Sniffing first misread valid files: the first byte is the low byte of the header
    length, which is 0x80 for one valid file in 32 since headers are padded to 8 bytes.)
    """
    path = Path(path)
    if not path.is_file():
        raise DeltaFormatError(f"{path}: no such file; give the path of a .safetensors delta")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        with path.open("rb") as f:
            head = f.read(4)
        # torch.save writes a zip archive (PK\x03\x04) since torch 1.6, a bare pickle (PROTO opcode 0x80 then
        # the protocol number) before that.
        if head == b"PK\x03\x04" or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")):
            raise DeltaFormatError(
                f"{path.name}: is a pickle (PyTorch .pt/.ckpt) file, not safetensors. SurgUn only loads "
                ".safetensors, because pickles can run code when loaded; convert it with a tool you trust, "
                "or retrain the delta."
            ) from e
        raise DeltaFormatError(
            f"{path.name}: not a readable safetensors file ({e}); it may be truncated: copy or download it again"
        ) from e
    return tensors, meta
