"""The ComfyUI backend on tiny SDXL-, SD3- and Flux-shaped ComfyUI models (comfy.supported_models configs).

Each family trains a few SurgUn steps through ComfyBackend (SD3 and Flux: CONST model_sampling, the flow
path), and its delta loads back through comfy.sd.load_lora_for_models with every key consumed and changes
the model's output. Run as test_backend_inprocess.py; skipped without ComfyUI (comfy_tiny.py).
"""

from __future__ import annotations

import logging

import pytest
import torch
from comfy_tiny import comfy, mm, stand_in_clip, tiny_model  # skips this module without ComfyUI

# family -> (architecture, flow?, blocks preset, what every LoRA module name must contain)
FAMILIES = {
    "SDXL": ("stable-diffusion-xl-v1-base", False, "cross-attn-kv", ".transformer_blocks.0.attn2.to_"),
    "SD3": ("stable-diffusion-3-medium", True, "dit-attn", "joint_blocks."),
    "Flux": ("flux-1-dev", True, "dit-attn", "double_blocks.0."),
}


def _backend(pack, family):
    backend = pack("surgun_core.backends.comfy").ComfyBackend(tiny_model(family), stand_in_clip(family), image_size=64)
    arch, flow, _, _ = FAMILIES[family]
    assert backend.architecture == arch and backend.objective.flow == flow
    return backend


def _probe(backend):
    """A fixed input for comparing model outputs: x_t (1, C, 8, 8), a mid sigma, one prompt's conditioning."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, *backend.latent_shape(), generator=g)
    return x, backend.objective.sigmas[len(backend.objective.sigmas) // 2].view(1), backend.encode(["a circle"])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_trains_and_loads_back_through_comfy(pack, family, tmp_path, caplog):
    EraseConfig = pack("surgun_core.config").EraseConfig
    erase = pack("surgun_core.surgun").erase
    backend = _backend(pack, family)
    model = backend.patcher
    _, _, blocks, name_part = FAMILIES[family]
    cfg = EraseConfig(concepts=["circle"], distractors=["square", "ring"], steps=2, images_per_concept=2,
                      sample_steps=2, batch_size=2, blocks=blocks, calibrate=False)  # fmt: skip
    with torch.inference_mode(), backend.training():  # as the Train node runs it
        result = erase(backend, cfg)
        result.lora.detach()
    names = list(result.delta.weights)
    assert names and all(name_part in n for n in names), names
    assert all(up.abs().sum() > 0 for _, up, _ in result.delta.weights.values()), "a LoRA got no gradient"
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in result.history)

    # the saved file back through ComfyUI's own loader: every key consumed, one patch per module
    sd, meta = pack("surgun_core.lora").read_safetensors(result.delta.save(tmp_path / "erase.safetensors"))
    assert meta["modelspec.architecture"] == FAMILIES[family][0] + "/lora"
    with caplog.at_level(logging.WARNING):
        patched, _ = comfy.sd.load_lora_for_models(model, None, sd, 1.0, 0)
    unused = [r.getMessage() for r in caplog.records if "not loaded" in r.getMessage().lower()]
    assert not unused, unused
    assert set(patched.patches) == {f"diffusion_model.{n}.weight" for n in names}

    # ... and the patched model's output changes; unpatched again, it is the base's output
    x, sigma, cond = _probe(backend)
    outs = []
    for mp in (model, patched, model):
        mm.load_models_gpu([mp], force_full_load=True)
        with torch.no_grad():
            outs.append(backend.predict(x, sigma, cond))
    assert (outs[1] - outs[0]).abs().max() > 1e-6
    torch.testing.assert_close(outs[2], outs[0])


@pytest.mark.parametrize("family", ["SD3", "Flux"])
def test_flow_loss_is_the_velocity_loss(pack, family):
    """CONST models: x_t = (1 - s) x0 + s eps and the loss is |v - (eps - x0)|^2, v the raw network output."""
    backend = _backend(pack, family)
    ms = backend.objective.ms
    g = torch.Generator().manual_seed(1)
    shape = (2, *backend.latent_shape())
    x0, eps = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    s = backend.objective.sigmas[[100, 800]]
    with torch.no_grad(), backend.training():
        cond = backend.encode(["a circle", "a ring"])
        got = backend.loss(x0, cond, eps, s)
        x_t = (1 - s.view(-1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1) * eps
        extra = {k: v for k, v in cond.items() if k != "c_crossattn"}  # y (pooled); Flux: guidance
        v = backend.denoiser(x_t, ms.timestep(s), context=cond["c_crossattn"], **extra)
        want = ((v - (eps - x0)) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["SD3", "Flux"])
def test_dit_presets_and_the_unet_default(pack, family):
    """The UNet default matches nothing in a DiT and says which presets do; dit-text-qkv is the text stream."""
    BLOCK_PRESETS = pack("surgun_core.registry").BLOCK_PRESETS
    backend = _backend(pack, family)
    with pytest.raises(pack("surgun_core.errors").ConfigError, match=r"presets that fit this model: .*dit-attn"):
        backend.lora_targets(BLOCK_PRESETS["cross-attn-kv"])
    text = list(backend.lora_targets(BLOCK_PRESETS["dit-text-qkv"]))
    assert text and all(n.endswith(".qkv") and ("context_block" in n or "txt_attn" in n) for n in text), text
    assert set(text) < set(backend.lora_targets(BLOCK_PRESETS["dit-attn"]))


def test_rope_backward_matches_reference(pack):
    """comfy_kitchen's RoPE ops get a backward (ComfyUI 0.8 + comfy-kitchen 0.2.x have none); it equals
    the gradient of the plain-torch rotation (ComfyUI's own fallback, comfy/ldm/flux/math.py)."""
    import comfy.ldm.flux.math as flux_math

    fams = pack("surgun_core.backends.comfy_families")
    if fams._kitchen_op("apply_rope") is None:
        pytest.skip("comfy-kitchen is not installed: ComfyUI uses its plain-torch RoPE, which has a backward")
    fams.ensure_rope_backward()
    g = torch.Generator().manual_seed(0)
    pe = flux_math.rope(torch.arange(6.0).view(1, 6), 8, 10000).unsqueeze(1)  # (1, 1, tokens, 4, 2, 2)
    q, k, w = (torch.randn(2, 3, 5, 8, generator=g) for _ in range(3))  # 5 tokens: freqs are trimmed to them

    def reference(x):  # out = R x per pair (2j, 2j+1)
        f = pe[:, :, : x.shape[2]]
        x_ = x.reshape(*x.shape[:-1], -1, 1, 2)
        return (f[..., 0] * x_[..., 0] + f[..., 1] * x_[..., 1]).reshape(x.shape)

    grads = []
    for fn in (lambda a, b: flux_math.apply_rope(a, b, pe), lambda a, b: (reference(a), reference(b)),
               lambda a, b: (fams._kitchen_op("apply_rope1")(a, pe), reference(b))):  # fmt: skip
        a, b = q.clone().requires_grad_(), k.clone().requires_grad_()
        oa, ob = fn(a, b)
        ((oa * w).sum() + (ob * w).sum()).backward()
        grads.append((a.grad, b.grad))
    for ga, gb in grads[::2]:
        torch.testing.assert_close(ga, grads[1][0])
        torch.testing.assert_close(gb, grads[1][1])
