"""The ComfyUI backend in-process, on tiny models: ComfyUI importable, no server, no downloads.

Needs a ComfyUI checkout and a Python with its requirements (ComfyUI needs torchvision):
COMFYUI_SRC=/tmp/comfyui/src /tmp/comfyui/.venv/bin/python -m pytest -q tests/comfyui/test_backend_inprocess.py
Skipped when COMFYUI_SRC is unset or ComfyUI does not import.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SRC = os.environ.get("COMFYUI_SRC", "")
if not SRC:
    pytest.skip("COMFYUI_SRC is not set (path of a ComfyUI checkout)", allow_module_level=True)
sys.path.insert(0, SRC)  # ComfyUI is not an installable package: its checkout is the import root
try:
    import comfy.cli_args

    if not torch.cuda.is_available():
        comfy.cli_args.args.cpu = True  # what `main.py --cpu` sets; model_management reads it at import
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.model_sampling
    import comfy.sd
    import comfy.supported_models
except ImportError as e:  # e.g. torchvision missing
    pytest.skip(f"ComfyUI at {SRC} does not import here: {e}", allow_module_level=True)

# a tiny SD1.5-shaped UNet (ComfyUI's openaimodel with comfy.ops layers), context 64 like the toy CLIP
TINY_SD15 = dict(in_channels=4, out_channels=4, model_channels=32, num_res_blocks=[1, 1], channel_mult=[1, 2],
                 transformer_depth=[1, 1], transformer_depth_output=[1, 1, 1, 1], transformer_depth_middle=1,
                 context_dim=64, use_linear_in_transformer=False, adm_in_channels=None, use_temporal_attention=False,
                 use_spatial_transformer=True, legacy=False, image_size=8, use_checkpoint=False,
                 use_temporal_resblock=False)  # fmt: skip


@pytest.fixture(scope="module")
def pack():
    os.environ["SURGUN_CACHE"] = ""
    name = "surgun_pack_inprocess"
    spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    assert mod.IN_COMFYUI
    return lambda sub: importlib.import_module(f"{name}.{sub}")


@pytest.fixture(scope="module")
def toy(pack):
    tm = pack("nodes.toy_model")
    with torch.inference_mode():  # as a node: ComfyUI runs every node under inference mode
        return tm.load_toy_model(), tm.load_toy_clip()


def _tiny_sd15():
    """Built and filled under inference mode, as Load Checkpoint does: its weights are inference tensors."""
    with torch.inference_mode():
        base = comfy.supported_models.SD15(TINY_SD15).get_model({})
        g = torch.Generator().manual_seed(0)
        sd = {k: torch.randn(v.shape, generator=g) * 0.05 for k, v in base.diffusion_model.state_dict().items()}
        base.diffusion_model.load_state_dict(sd)
    return comfy.model_patcher.ModelPatcher(base, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())  # fmt: skip


def test_toy_loss_equals_diffusers_backend(pack, toy):
    """Same x0, noise and timestep: the ComfyUI path gives the diffusers backend's eps loss exactly."""
    backend = pack("surgun_core.backends.comfy").ComfyBackend(*toy, image_size=16)
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


def test_flow_objective_is_velocity_loss(pack, toy):
    """With flow model_sampling (as ModelSamplingSD3 patches it): x_t = (1-s) x0 + s eps, target eps - x0."""
    model, clip = toy

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


def test_sd15_shaped_trains_through_comfy_ops_and_loads_back(pack, toy):
    comfy_backend = pack("surgun_core.backends.comfy")
    erase = pack("surgun_core.surgun").erase
    EraseConfig = pack("surgun_core.config").EraseConfig
    model = _tiny_sd15()
    assert next(model.model.diffusion_model.parameters()).is_inference()
    backend = comfy_backend.ComfyBackend(model, toy[1], image_size=64)
    assert backend.architecture == "stable-diffusion-v1"
    cfg = EraseConfig(concepts=["circle"], distractors=["square", "ring"], steps=3, images_per_concept=2,
                      sample_steps=2, batch_size=2)  # fmt: skip
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


def test_lora_hooks_fire_on_comfy_cast_path(pack, toy):
    """comfy.ops layers with comfy_cast_weights skip nn.Linear.forward; module hooks still run."""
    LoRASet = pack("surgun_core.lora").LoRASet
    backend = pack("surgun_core.backends.comfy").ComfyBackend(_tiny_sd15(), toy[1], image_size=64)
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


def test_delta_for_another_model_is_refused(pack, toy):
    comfy_backend = pack("surgun_core.backends.comfy")
    errors = pack("surgun_core.errors")
    sd = {"lora_unet_no_such_block.lora_down.weight": torch.zeros(2, 8),
          "lora_unet_no_such_block.lora_up.weight": torch.zeros(8, 2)}  # fmt: skip
    with pytest.raises(errors.DeltaMismatchError, match="another model"):
        comfy_backend.apply_delta(toy[0], sd, 1.0, source="other.safetensors")
