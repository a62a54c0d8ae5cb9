"""What differs between ComfyUI model families, for the ComfyUI backend (DESIGN.md section 5).

Used by backends/comfy.py; imports nothing of ComfyUI itself (model classes are recognised by name), so
only comfy.py imports ComfyUI (tests/test_comfy_isolation.py).

ComfyUI's model code is written for inference. Training a LoRA through it works as is for the SD1.5/SDXL
UNets and SD3's MMDiT; Flux (comfy.model_base.Flux; its subclasses Flux2 and Chroma get the same
treatment, untested) needs two things autograd otherwise refuses:
1. RoPE. With comfy-kitchen installed (ComfyUI's requirements.txt installs it), comfy/ldm/flux/math.py
   takes `apply_rope` from it: a torch custom op (comfy_kitchen::apply_rope) registered without a backward,
   so loss.backward() fails with "no autograd formula was registered". `ensure_rope_backward` registers one
   through torch.library.register_autograd, the extension point PyTorch gives for exactly this, and only
   where the op has none. The rotation is linear in q and k, so its backward is the same kernel with every
   2x2 rotation transposed; the forward is left untouched.
2. In-place residuals. Flux blocks add residuals in place (`img += ...`, `x += ...` in
   comfy/ldm/flux/layers.py) into tensors that LayerNorm saved for backward, so autograd raises "modified
   by an inplace operation". `saved_copies` stores a copy of every saved activation instead (saved-tensor
   hooks, a public autograd API), so later in-place adds cannot change what backward reads. Weights are
   leaves and stay shared, not copied; the copies cost up to the saved activations' memory once more.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch

from ..errors import SurgUnError

log = logging.getLogger(__name__)

# modelspec.architecture per ComfyUI model config class (comfy/supported_models.py)
ARCHITECTURES = {
    "SD15": "stable-diffusion-v1",
    "SD20": "stable-diffusion-v2-768-v",
    "SDXL": "stable-diffusion-xl-v1-base",
    "SD3": "stable-diffusion-3-medium",
    "Flux": "flux-1-dev",
    "FluxSchnell": "flux-1-schnell",
}
# default training-image size (pixels) per ComfyUI model config class
IMAGE_SIZES = {"SD15": 512, "SD20": 768, "SDXL": 1024, "SD3": 1024, "Flux": 1024, "FluxSchnell": 1024}

# comfy.model_base classes (and their subclasses) whose diffusion model adds residuals in place
_INPLACE_RESIDUAL_MODELS = {"Flux"}
# comfy_kitchen RoPE ops in the interleaved layout (pairs 2k, 2k+1), as comfy/ldm/flux/math.py uses them
_ROPE_OPS = ("apply_rope", "apply_rope1")
_rope_checked: set[str] = set()


def mutates_saved_activations(base) -> bool:
    """True for models whose forward changes, in place, activations autograd saved (see `saved_copies`)."""
    return any(
        c.__module__ == "comfy.model_base" and c.__name__ in _INPLACE_RESIDUAL_MODELS for c in type(base).__mro__
    )


def _pack(t: torch.Tensor) -> torch.Tensor:
    # activations (made by autograd-recorded ops) are copied; leaves (weights, inputs) are kept as they are
    return t.clone() if t.grad_fn is not None else t


@contextlib.contextmanager
def saved_copies(enabled: bool = True) -> Iterator[None]:
    """Within this block, autograd keeps copies of the activations it saves (when grad is enabled)."""
    if not (enabled and torch.is_grad_enabled()):
        yield
        return
    with torch.autograd.graph.saved_tensors_hooks(_pack, lambda t: t):
        yield


def ensure_rope_backward() -> list[str]:
    """Give comfy_kitchen's interleaved RoPE ops a backward where they lack one. Returns the ops it fixed."""
    fixed = []
    for name in _ROPE_OPS:
        if name in _rope_checked:
            continue
        op = _kitchen_op(name)
        if op is not None and not _has_backward(op, name):
            torch.library.register_autograd(
                f"comfy_kitchen::{name}", _rope_backward(op, name), setup_context=_save_freqs
            )
            if not _has_backward(op, name):
                raise SurgUnError(f"comfy_kitchen::{name} still has no backward after registering one; training "
                                  "through it is not possible: uninstall comfy-kitchen or update SurgUn")  # fmt: skip
            log.info(
                "SurgUn: registered a backward for comfy_kitchen::%s (it had none; needed to train RoPE models)", name
            )
            fixed.append(name)
        _rope_checked.add(name)
    return fixed


def _kitchen_op(name: str):
    try:
        return getattr(torch.ops.comfy_kitchen, name)
    except (AttributeError, RuntimeError):  # comfy-kitchen not installed, or an older one without this op
        return None


def _has_backward(op, name: str) -> bool:
    """Probe: one rotation of one pair, backward through the op."""
    with torch.inference_mode(False), torch.enable_grad():
        q, k = (torch.ones(1, 1, 1, 2, requires_grad=True) for _ in range(2))  # (B, heads, tokens, head_dim)
        freqs = torch.eye(2).view(1, 1, 1, 1, 2, 2)  # (B, 1, tokens, head_dim / 2, 2, 2)
        out = op(q, k, freqs) if name == "apply_rope" else (op(q, freqs),)
        try:
            sum(o.sum() for o in out).backward()
        except RuntimeError:
            return False
    return q.grad is not None


def _save_freqs(ctx, inputs, output) -> None:
    ctx.save_for_backward(inputs[-1])


def _rope_backward(op, name: str):
    """out = R x per pair, R a 2x2 matrix from freqs_cis[..., :, :]; so dx = R^T dout (freqs get no grad:
    they come from token positions, never from trained weights)."""

    def backward(ctx, *grads):
        (freqs,) = ctx.saved_tensors
        freqs_t = freqs.transpose(-1, -2).contiguous()
        if name == "apply_rope":
            gq, gk = op(grads[0].contiguous(), grads[1].contiguous(), freqs_t)
            return gq, gk, None
        return op(grads[0].contiguous(), freqs_t), None

    return backward
