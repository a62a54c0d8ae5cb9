"""SurgUn Attack Audit as ComfyUI runs it, and what it needs from the ComfyUI backend: learned tokens through
ComfyUI's CLIP, images from prepared conditioning, one backend switching between the erased and the base MODEL.

In-process on the demo model: COMFYUI_SRC=/tmp/comfyui/src /tmp/comfyui/.venv/bin/python -m pytest -q \
    tests/comfyui/test_audit_inprocess.py
"""

from __future__ import annotations

import json

import pytest
import torch
from comfy_server import QUICK_ATTACKS
from comfy_tiny import StandInClip, tiny_model  # skips this module without ComfyUI

TINY = QUICK_ATTACKS  # every attack cut to seconds (comfy_server.py)


@pytest.fixture(scope="module")
def erased(pack, demo):
    """The demo model with 'circle' erased by SurgUn Train (40 steps: new phrasings bring it back in a few images,
    against all of them on the base model)."""
    model, clip, _ = demo
    with torch.inference_mode():
        out = pack("nodes.train_node").SurgUnTrain.execute(model, clip, "circle", "square\ntriangle\ncross\nring",
                                                           "object", 40, 0.05, 4, "cross-attn-kv", 4.0, 0,
                                                           calibration=False).result  # fmt: skip
    return out[0]


@pytest.fixture
def backend(pack, demo):
    return pack("nodes.train_node").comfy_backend(demo[0], demo[1], 4.0, vae=demo[2])


def _audit(pack, model, base, demo, attacks="all", settings=TINY, concept="circle"):
    node = pack("nodes.audit_node").SurgUnAttackAudit
    _, clip, vae = demo
    with torch.inference_mode():
        return node.execute(model, base, clip, vae, concept, "object", attacks, 0, json.dumps(settings)).result


# ---- learned tokens through ComfyUI's CLIP ------------------------------------------------------------------


def test_learned_token_with_the_word_embedding_encodes_like_the_word(backend):
    with torch.inference_mode():
        emb = backend.word_embedding("circle")  # (1, d): "circle" is one token of the toy vocabulary
        want = backend.encode(["a red circle in the style of blue"])["c_crossattn"]
        got = backend.encode_with_tokens(["a red <c> in the style of blue"], {"<c>": emb})["c_crossattn"]
        plain = backend.encode_with_tokens(["a red circle"], {"<c>": emb})["c_crossattn"]  # no placeholder in it
    assert emb.shape == (1, 64)
    assert torch.equal(got, want)
    assert torch.equal(plain, backend.encode(["a red circle"])["c_crossattn"])


def test_learned_tokens_encode_as_the_diffusers_backend_does(pack, backend):
    """Two learned rows for one placeholder, random values: ComfyUI's embedding path gives what the diffusers toy
    backend's forward hook gives."""
    ref = pack("surgun_core.toyworld").load_toy_backend()
    tokens = {"<x>": torch.randn(2, 64, generator=torch.Generator().manual_seed(0)) * 0.3}
    with torch.no_grad():
        want = ref.encode_with_tokens(["a <x> in purple"], tokens)["encoder_hidden_states"]
    with torch.inference_mode():
        got = backend.encode_with_tokens(["a <x> in purple"], tokens)["c_crossattn"]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_gradients_reach_learned_tokens_through_comfy_clip_and_model(backend):
    with torch.inference_mode():
        start = backend.word_embedding("object")
    with torch.inference_mode(), backend.training():
        token = torch.nn.Parameter(start.clone())
        cond = backend.encode_with_tokens(["a red <c>"], {"<c>": token})
        x0, noise = torch.zeros(1, 3, 16, 16), torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
        (grad,) = torch.autograd.grad(backend.loss(x0, cond, noise, torch.tensor([2.0])).mean(), [token])
    assert grad.shape == (1, 64) and grad.abs().sum() > 0


def test_learned_tokens_need_a_clip_text_encoder(pack):
    backend = pack("surgun_core.backends.comfy").ComfyBackend(tiny_model("SD15"), StandInClip(), image_size=64)
    errors = pack("surgun_core.errors")
    with pytest.raises(errors.SurgUnError, match=r"SD1\.x or SDXL CLIP"):
        backend.word_embedding("object")
    with pytest.raises(errors.SurgUnError, match=r"SD1\.x or SDXL CLIP"):
        backend.encode_with_tokens(["a <x>"], {"<x>": torch.zeros(1, 64)})


def test_too_long_a_prompt_with_learned_tokens_is_refused(pack, backend):
    with torch.inference_mode(), pytest.raises(pack("surgun_core.errors").SurgUnError, match="longer than"):
        backend.encode_with_tokens(["a <x> " + "red " * 20], {"<x>": torch.zeros(1, 64)})  # the toy reads 16


# ---- images from prepared conditioning, two MODELs in one backend -----------------------------------------


def test_images_from_prepared_conditioning_are_comfy_samplers_images(backend):
    """The sampler written out for prepared conditioning (attacks' learned tokens, concept vectors) draws what
    ComfyUI's own ddim sampler draws from the same prompts and seeds, and the cost meter counts both alike:
    ComfyUI's sampler calls the model itself (counted at its model function wrapper), 2 images x 10 steps x
    (cond + uncond) = 40 sample-forwards each way."""
    prompts, seeds = ["a red circle", "a blue square"], [1, 2]
    meter = backend.meter
    with torch.inference_mode():
        with meter.phase("comfy"):
            want = backend.sample(prompts, seeds, 10, 4.0)
        with meter.phase("prepared"):
            got = backend.sample(prompts, seeds, 10, 4.0, cond=backend.encode(prompts))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    assert meter.counts["comfy"] == meter.counts["prepared"] == 40
    assert "model_function_wrapper" not in backend.patcher.model_options  # counted on a clone: the MODEL as it was


def test_as_model_runs_the_base_model_then_the_erased_one_again(pack, demo, erased):
    model, clip, _ = demo
    backend = pack("nodes.train_node").comfy_backend(erased, clip, 4.0)
    x, sigma = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([3.0])
    with torch.inference_mode():
        cond = backend.encode(["a red circle"])
        backend.activate()
        on_erased = backend.predict(x, sigma, cond)
        with backend.as_model(model):
            on_base = backend.predict(x, sigma, cond)
            assert backend.patcher is model
        after = backend.predict(x, sigma, cond)
    assert backend.patcher is erased
    assert (on_erased - on_base).abs().max() > 1e-3  # the erasure changed the model's prediction
    torch.testing.assert_close(after, on_erased)  # and its patches are back on the shared weights
    other = tiny_model("SD15")  # another kind of model cannot be the base of this one
    with pytest.raises(pack("surgun_core.errors").ConfigError, match="base_model"), backend.as_model(other):
        pass


# ---- the node -------------------------------------------------------------------------------------------------


def test_audit_of_the_base_model_against_itself_recovers_what_the_control_does(pack, demo):
    model = demo[0]
    grid, report, recovery = _audit(pack, model, model, demo)
    data = json.loads(report)
    assert list(data["attacks"]) == ["inversion", "prefix", "concept_vector", "phrasings"]
    for name, a in data["attacks"].items():  # the same attack on the same model with the same seeds
        assert a["recovery"] == a["control"], (name, a)
        assert a["erased"]["details"] == a["base"]["details"], name
    assert data["scorer"] == "toy" and recovery == data["max_recovery"]
    assert grid.dim() == 4 and grid.shape[0] == 1 and grid.shape[-1] == 3


def test_audit_of_an_erased_model(pack, demo, erased):
    model = demo[0]
    grid, report, recovery = _audit(pack, erased, model, demo, attacks="phrasings, inversion")
    data = json.loads(report)
    core = pack("surgun_core.audit").AuditReport("circle", "object", 0, "toy", "a", "f").to_dict()
    assert set(data) == set(core)  # the core's audit JSON, as `surgun audit` writes it
    assert list(data["attacks"]) == ["phrasings", "inversion"] and data["concept"] == "circle"
    phr = data["attacks"]["phrasings"]
    assert phr["control"] == 1.0 and phr["recovery"] < 0.75, phr  # the erasure holds against new phrasings
    assert phr["erased"]["model"] == "erased" and phr["base"]["model"] == "base"
    assert 0.0 <= recovery <= 1.0 and recovery == max(a["recovery"] for a in data["attacks"].values())
    assert data["worst_attack"] in data["attacks"]
    # IMAGE: (1, H, W, 3) in [0, 1], a title and a row per attack of 64-pixel cells (toy images scaled up)
    assert grid.dim() == 4 and grid.shape[0] == 1 and grid.shape[-1] == 3 and grid.dtype == torch.float32
    assert grid.shape[1] > 2 * 64 and grid.shape[2] > 2 * 64 and grid.min() >= 0 and grid.max() <= 1
    # the base model's fingerprint, not the erased model's patched weights
    assert data["base_fingerprint"] == json.loads(_audit(pack, model, model, demo, "phrasings")[1])["base_fingerprint"]


def test_audit_node_refuses_bad_widgets_before_any_work(pack, demo):
    errors = pack("surgun_core.errors")
    model = demo[0]
    for kwargs, field in [({"concept": " "}, "concept"), ({"attacks": "ringabell"}, "attacks"),
                          ({"settings": {"phrasings": {"stepz": 1}}}, "attack_settings")]:  # fmt: skip
        with pytest.raises(errors.ConfigError) as e:
            _audit(pack, model, model, demo, **kwargs)
        assert e.value.field == field
