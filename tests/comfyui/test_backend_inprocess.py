"""The ComfyUI backend in-process, on tiny models: ComfyUI importable, no server, no downloads.

Needs a ComfyUI checkout and a Python with its requirements (ComfyUI needs torchvision):
COMFYUI_SRC=/tmp/comfyui/src /tmp/comfyui/.venv/bin/python -m pytest -q tests/comfyui/test_backend_inprocess.py
Skipped when COMFYUI_SRC is unset or ComfyUI does not import (comfy_tiny.py). SDXL, SD3 and Flux:
test_backend_families.py.
"""

from __future__ import annotations

import pytest
import torch
from comfy_tiny import comfy, tiny_model  # skips this module without ComfyUI


def test_toy_loss_equals_diffusers_backend(pack, demo):
    """Same x0, noise and timestep: the ComfyUI path gives the diffusers backend's eps loss exactly."""
    backend = pack("surgun_core.backends.comfy").ComfyBackend(*demo[:2], image_size=16)
    ref = pack("surgun_core.toyworld").load_toy_backend()
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1, torch.randn(2, 3, 16, 16, generator=g)
    t = torch.tensor([100, 700])
    a = ref.objective.alphas_cumprod[t]
    sigma = ((1 - a) / a).sqrt()
    prompts = ["a red circle", "a square"]
    with torch.no_grad():
        want = ref.loss(x0, ref.encode(prompts), eps, t)
        got = backend.loss(x0, backend.encode(prompts), eps, sigma)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_flow_objective_is_velocity_loss(pack, demo):
    """With flow model_sampling (as ModelSamplingSD3 patches it): x_t = (1-s) x0 + s eps, target eps - x0."""
    model, clip = demo[:2]

    class FlowSampling(comfy.model_sampling.ModelSamplingDiscreteFlow, comfy.model_sampling.CONST):
        pass

    flow = model.clone()
    ms = FlowSampling(flow.model.model_config)
    ms.set_parameters(shift=3.0, multiplier=1000)
    flow.add_object_patch("model_sampling", ms)
    backend = pack("surgun_core.backends.comfy").ComfyBackend(flow, clip, image_size=16)
    assert backend.objective.flow
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1, torch.randn(2, 3, 16, 16, generator=g)
    s = torch.tensor([0.3, 0.8])
    with torch.no_grad(), backend.training():
        cond = backend.encode(["a circle", "a ring"])
        got = backend.loss(x0, cond, eps, s)
        x_t = (1 - s.view(-1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1) * eps
        raw = flow.model.diffusion_model(x_t, ms.timestep(s), context=cond["c_crossattn"])
        want = ((raw - (eps - x0)) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_sd15_shaped_trains_through_comfy_ops_and_loads_back(pack, demo):
    comfy_backend = pack("surgun_core.backends.comfy")
    erase = pack("surgun_core.surgun").erase
    EraseConfig = pack("surgun_core.config").EraseConfig
    model = tiny_model("SD15")
    assert next(model.model.diffusion_model.parameters()).is_inference()
    backend = comfy_backend.ComfyBackend(model, demo[1], image_size=64)
    assert backend.architecture == "stable-diffusion-v1"
    cfg = EraseConfig(concepts=["circle"], distractors=["square", "ring"], steps=3, images_per_concept=2,
                      sample_steps=2, batch_size=2, blocks="cross-attn-kv", calibrate=False)  # fmt: skip
    with torch.inference_mode(), backend.training():
        result = erase(backend, cfg)
        result.lora.detach()
    names = list(result.delta.weights)
    assert names and all(".attn2.to_" in n for n in names), names
    assert all(up.abs().sum() > 0 for _, up, _ in result.delta.weights.values()), "a LoRA got no gradient"
    # back through ComfyUI's own loader: every key maps, and the patches change the weights
    patched, _ = comfy.sd.load_lora_for_models(model, None, result.delta.state_dict(), 1.0, 0.0)
    assert len(patched.patches) == len(names)
    ours = comfy_backend.apply_delta(model, result.delta, 1.0)
    assert set(ours.patches) == set(patched.patches)


def test_lora_hooks_fire_on_comfy_cast_path(pack, demo):
    """comfy.ops layers with comfy_cast_weights skip nn.Linear.forward; module hooks still run."""
    LoRASet = pack("surgun_core.lora").LoRASet
    backend = pack("surgun_core.backends.comfy").ComfyBackend(tiny_model("SD15"), demo[1], image_size=64)
    with torch.inference_mode(), backend.training():
        lset = LoRASet(backend.lora_targets(r"attn2\."), 2, 2.0).attach()
        for layer in lset.layers.values():
            torch.nn.init.normal_(layer.up, std=0.1)
        for mod in lset.targets.values():
            mod.comfy_cast_weights = True
        x, s, cond = torch.randn(1, 4, 8, 8), torch.tensor([1.0]), backend.encode(["a circle"])
        on = backend.predict(x, s, cond)
        with lset.disabled():
            off = backend.predict(x, s, cond)
        on.sum().backward()
        lset.detach()
    assert (on - off).abs().max() > 0
    assert all(layer.up.grad is not None for layer in lset.layers.values())


def test_delta_for_another_model_is_refused(pack, demo):
    comfy_backend = pack("surgun_core.backends.comfy")
    errors = pack("surgun_core.errors")
    sd = {"lora_unet_no_such_block.lora_down.weight": torch.zeros(2, 8),
          "lora_unet_no_such_block.lora_up.weight": torch.zeros(8, 2)}  # fmt: skip
    with pytest.raises(errors.DeltaMismatchError, match="another model"):
        comfy_backend.apply_delta(demo[0], sd, 1.0, source="other.safetensors")


def test_apply_delta_node_with_and_without_clip(pack, demo, tmp_path):
    """Apply Unlearning Delta: MODEL and CLIP out as LoraLoader gives them; without CLIP, the CLIP output is None."""
    import folder_paths

    node = pack("nodes.delta_nodes").SurgUnApplyDelta
    model, clip = demo[:2]
    targets = pack("surgun_core.backends.comfy").ComfyBackend(model, clip, image_size=16).lora_targets(r"attn2\.to_k$")
    g = torch.Generator().manual_seed(0)
    weights = {n: (torch.randn(2, m.in_features, generator=g), torch.randn(m.out_features, 2, generator=g), 2.0)
               for n, m in targets.items()}  # fmt: skip
    delta = pack("surgun_core.lora").LoraDelta(weights)
    folder_paths.add_model_folder_path("loras", str(tmp_path), is_default=True)
    delta.save(tmp_path / "erase.safetensors")
    want_model, want_clip = comfy.sd.load_lora_for_models(model, clip, delta.state_dict(), 0.5, 0.5)
    with torch.inference_mode():  # as ComfyUI runs nodes
        m1, c1 = node.execute(model, 0.5, delta=delta).result
        m2, c2 = node.execute(model, 0.5, delta_file="erase.safetensors", clip=clip).result
    assert c1 is None
    assert set(m1.patches) == set(m2.patches) == set(want_model.patches) and len(m1.patches) == len(targets)
    assert c2 is not clip and c2.patcher.is_clone(clip.patcher)  # a clone, as LoraLoader returns
    assert c2.patcher.patches == want_clip.patcher.patches == {}  # no text-encoder keys in a SurgUn delta
    with torch.inference_mode():
        tokens = clip.tokenize("a red circle")
        torch.testing.assert_close(c2.encode_from_tokens(tokens), clip.encode_from_tokens(tokens))
    with pytest.raises(pack("surgun_core.errors").SurgUnError, match="both a delta input and delta_file"):
        node.execute(model, 1.0, delta=delta, delta_file="erase.safetensors", clip=clip)
