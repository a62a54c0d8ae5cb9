"""SurgUn's erase() on tiny SD1-, SDXL- and SANA-shaped models (random weights, built from configs):
a few steps with finite loss, a delta that loads back and reproduces the erased model, several concepts
in one delta, and a delta refused by a model of another architecture."""

import json

import pytest
import torch

from surgun_core.config import EraseConfig
from surgun_core.errors import DeltaMismatchError
from surgun_core.lora import LoraDelta
from surgun_core.surgun import erase
from surgun_core.testing import tiny_backend

FAST = dict(steps=3, images_per_concept=2, sample_steps=2, batch_size=2, distractors_per_step=2, templates=["a {}"],
            blocks="cross-attn-kv", calibrate=False)  # fmt: skip


@pytest.fixture(scope="module", params=["sd1", "sdxl", "sana"])
def backend(request):
    return tiny_backend(request.param)


def probe(backend):
    torch.manual_seed(0)
    x = torch.randn(2, *backend.latent_shape())
    t = backend.objective.sample_t(2, torch.Generator().manual_seed(1))
    return x, backend.objective.model_time(t), backend.encode(["a photo of a cat", "a red car"])


def test_erase_trains_and_delta_reloads(backend, tmp_path):
    x, t, cond = probe(backend)
    base = backend.predict(x, t, cond)
    cfg = EraseConfig(concepts=["cat", "dog"], distractors=["car", "tree"], use_retain=True, lr=1e-2, **FAST)
    result = erase(backend, cfg)
    erased = backend.predict(x, t, cond)
    result.lora.detach()
    assert result.steps_done == 3 and result.stopped is None
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in result.history)
    assert not torch.allclose(erased, base), "the LoRA should change the prediction"
    torch.testing.assert_close(backend.predict(x, t, cond), base, rtol=0, atol=0)  # detached: base again

    path = result.delta.save(tmp_path / "d.safetensors")
    modules = backend.attention_linears()
    delta = LoraDelta.load(path, list(modules))
    assert json.loads(delta.metadata["surgun.concepts"]) == ["cat", "dog"]  # several concepts, one delta
    assert delta.metadata["modelspec.architecture"] == f"{backend.architecture}/lora"
    assert delta.prefix == backend.lora_prefix
    lset = delta.to_lora_set(modules).attach()
    try:
        torch.testing.assert_close(backend.predict(x, t, cond), erased, rtol=1e-4, atol=1e-5)
        lset.strength = 0.5  # partial strength lands between base and erased
        half = backend.predict(x, t, cond)
        assert (half - base).abs().mean() < (erased - base).abs().mean()
    finally:
        lset.detach()


def test_delta_of_another_architecture_is_refused(tmp_path):
    sd1, sdxl = tiny_backend("sd1"), tiny_backend("sdxl")
    result = erase(sd1, EraseConfig(concepts=["cat"], distractors=["car"], **FAST))
    result.lora.detach()
    path = result.delta.save(tmp_path / "sd1.safetensors")
    modules = sdxl.attention_linears()
    with pytest.raises(DeltaMismatchError, match="stable-diffusion-v1"):
        LoraDelta.load(path, list(modules)).to_lora_set(modules)


def test_full_method_localizes_and_calibrates(backend):
    """blocks="auto" + calibration with the default scorer (the base model as a diffusion classifier)."""
    settings = {**FAST, "blocks": "auto", "calibrate": True, "steps": 4}
    cfg = EraseConfig(concepts=["cat"], distractors=["car", "tree"], **settings, localize_batches=1, probe_seeds=1,
                      probe_templates=["a {}"], probe_retained=1)  # fmt: skip
    result = erase(backend, cfg)
    try:
        assert result.localization.chosen and result.localization.groups
        # checkpoints every steps/5 (>= 1), measured latest first: the first that fits ships, alone with the later
        # ones; the scan also stops at the first that does not erase (4 steps erase nothing: the last alone)
        cal = result.calibration
        steps = [r["step"] for r in cal.curve]
        assert steps == list(range(steps[0], 5))  # a latest-first run of checkpoints, down to where it stopped
        fit = steps[0] == cal.chosen_step and "not scored" in cal.reason
        assert fit or steps[0] == 1 or cal.curve[0]["erase"] < cal.threshold, cal.curve
        assert result.delta.metadata["surgun.step_chosen"] == str(result.calibration.chosen_step)
        assert set(result.lora.names) <= set(backend.attention_linears())
    finally:
        result.lora.detach()


def test_gradient_checkpointing_gives_the_same_delta():
    """Recomputing activations in backward (the memory saver, on by default on CUDA) changes no gradient."""
    deltas = []
    for on in (False, True):
        backend = tiny_backend("sd1")
        result = erase(backend, EraseConfig(concepts=["cat"], distractors=["car"], **FAST, gradient_checkpointing=on))
        result.lora.detach()
        deltas.append(result.delta.state_dict())
        assert not any(getattr(m, "gradient_checkpointing", False) for m in backend.denoiser.modules())  # restored
    for k, v in deltas[0].items():
        torch.testing.assert_close(deltas[1][k], v, rtol=1e-4, atol=1e-6)
