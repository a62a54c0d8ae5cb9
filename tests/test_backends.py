"""The diffusers backend on tiny SD1 (eps and v), SDXL and SANA models built from configs (no downloads).

Each family: conditioning shapes, prediction and loss, deterministic sampling, LoRA targets, a short LoRA
training run whose delta file reloads to the same prediction, and a model-folder round trip.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from surgun_core.backends.diffusers import DiffusersBackend, load_diffusers_folder
from surgun_core.backends.text import ClipText
from surgun_core.errors import ConfigError
from surgun_core.lora import LoraDelta, LoRASet
from surgun_core.objectives import DiffusionObjective, FlowObjective
from surgun_core.testing import save_tiny_folder, tiny_backend, tiny_sdxl_backend

VARIANTS = {
    "sd1": ("sd1", {}),
    "sd1-v": ("sd1", {"prediction_type": "v_prediction"}),
    "sdxl": ("sdxl", {}),
    "sana": ("sana", {}),
}
PROMPTS = ["a photo of a cat", "a red car in the style of painting"]


def make(variant: str) -> DiffusersBackend:
    kind, kwargs = VARIANTS[variant]
    return tiny_backend(kind, **kwargs)


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request):
    return request.param


@pytest.fixture(scope="module")
def backend(variant):
    return make(variant)


def batch(b: DiffusersBackend, seed: int = 0):
    """x0, noise, objective time t, x_t and model time for 2 samples."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(2, *b.latent_shape(), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    t = b.objective.sample_t(2, g)
    return x0, noise, t, b.objective.noisy(x0, noise, t), b.objective.model_time(t)


def test_encode_shapes(backend, variant):
    cond = backend.encode(PROMPTS)
    if backend.family == "sd1":
        assert {k: tuple(v.shape) for k, v in cond.items()} == {"encoder_hidden_states": (2, 16, 32)}
    elif backend.family == "sdxl":
        shapes = {k: tuple(v.shape) for k, v in cond.items()}
        assert shapes == {"encoder_hidden_states": (2, 16, 24 + 32), "text_embeds": (2, 16), "time_ids": (2, 6)}
        assert cond["time_ids"][0].tolist() == [16, 16, 0, 0, 16, 16]  # (orig h, w, crop top, left, target h, w)
    else:
        assert {k: tuple(v.shape) for k, v in cond.items()} == {
            "encoder_hidden_states": (2, 16, 32),
            "encoder_attention_mask": (2, 16),
        }
        mask = cond["encoder_attention_mask"]
        assert not mask.is_floating_point()
        assert 0 < mask[0].sum() < mask[1].sum() < 16  # right-padded, longer prompt has more tokens
        assert mask[0, 0] == 1 and mask[0, -1] == 0
    assert all(torch.isfinite(v.float()).all() for v in cond.values())


def test_sdxl_text_is_both_penultimate_states_and_pooled_projection():
    b = tiny_sdxl_backend()
    text = b.text
    cond = b.encode(PROMPTS)
    states = []
    for tok, enc in ((text.tokenizer, text.encoder), (text.tokenizer_2, text.encoder_2)):
        ids = tok(PROMPTS, padding="max_length", max_length=16, truncation=True, return_tensors="pt").input_ids
        out = enc(ids, output_hidden_states=True)
        states.append(out.hidden_states[-2])
    torch.testing.assert_close(cond["encoder_hidden_states"], torch.cat(states, -1))
    torch.testing.assert_close(cond["text_embeds"], out.text_embeds)
    # force_zeros_for_empty_prompt: the empty (unconditional) prompt is all zeros, as in the SDXL pipeline.
    empty = b.encode(["", "a cat"])
    assert empty["encoder_hidden_states"][0].abs().sum() == 0 and empty["text_embeds"][0].abs().sum() == 0
    assert empty["encoder_hidden_states"][1].abs().sum() > 0


def test_wrong_text_side_is_refused():
    b = tiny_sdxl_backend()
    with pytest.raises(ConfigError, match="sdxl text encoders"):
        DiffusersBackend(b.denoiser, ClipText(b.text.tokenizer, b.text.encoder), b.scheduler_config, vae=b.vae)


def test_predict_and_loss(backend):
    x0, noise, t, x_t, mt = batch(backend)
    cond = backend.encode(PROMPTS)
    with torch.no_grad():
        pred = backend.predict(x_t, mt, cond)
        loss = backend.loss(x0, cond, noise, t)
    assert pred.shape == x0.shape == (2, *backend.latent_shape())
    assert loss.shape == (2,) and torch.isfinite(loss).all()
    want = ((pred - backend.objective.target(x0, noise, t)) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(loss, want)


def test_objective_and_model_time(backend, variant):
    if backend.family == "sana":
        assert isinstance(backend.objective, FlowObjective) and backend.objective.shift == 3.0
        seen = {}
        handle = backend.denoiser.register_forward_pre_hook(
            lambda _m, _a, kw: seen.update(t=kw["timestep"]), with_kwargs=True
        )
        try:
            _, _, t, x_t, mt = batch(backend)
            with torch.no_grad():
                backend.predict(x_t, mt, backend.encode(PROMPTS))
        finally:
            handle.remove()
        torch.testing.assert_close(seen["t"], t * 1000)  # sigma * num_train_timesteps * timestep_scale (1)
    else:
        assert isinstance(backend.objective, DiffusionObjective)
        assert backend.objective.prediction_type == ("v_prediction" if variant == "sd1-v" else "epsilon")


def test_sample_is_deterministic_per_seed(backend):
    a = backend.sample(PROMPTS, [1, 2], steps=2)
    assert a.shape == (2, *backend.latent_shape()) and torch.isfinite(a).all()
    assert torch.equal(a, backend.sample(PROMPTS, [1, 2], steps=2))
    # The same image with a different batch around it: equal up to float rounding (batched BLAS kernels
    # differ in summation order, and guidance 5 amplifies that to ~1e-5).
    alone = backend.sample(PROMPTS[:1], [1], steps=2)
    torch.testing.assert_close(alone[0], a[0], atol=1e-4, rtol=1e-3)
    assert not torch.allclose(backend.sample(PROMPTS[:1], [3], steps=2)[0], a[0])
    img = backend.decode(a)
    assert img.shape == (2, 3, backend.image_size(), backend.image_size())
    assert img.min() >= 0 and img.max() <= 1


def test_lora_targets_are_cross_attention(backend):
    linears = backend.attention_linears()
    assert linears
    hits = backend.lora_targets(r"attn2\.")
    assert hits and set(hits) < set(linears)
    modules = dict(backend.denoiser.named_modules())
    for name in hits:
        attn = modules[name[: name.index("attn2") + len("attn2")]]
        assert attn.is_cross_attention, name
    n_blocks = sum(1 for n in modules if n.endswith("attn2"))
    assert len(hits) == 4 * n_blocks  # to_q, to_k, to_v, to_out.0 per transformer block
    with pytest.raises(ConfigError, match="matches no attention layer"):
        backend.lora_targets(r"no_such_block")


def test_lora_trains_disables_and_reloads(variant, tmp_path):
    b = make(variant)
    x0, noise, t, x_t, mt = batch(b)
    cond = b.encode(PROMPTS)
    with torch.no_grad():
        base = b.predict(x_t, mt, cond)
    lset = LoRASet(b.lora_targets(r"attn2\."), rank=2, alpha=2.0).attach()
    opt = torch.optim.Adam(lset.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        loss = b.loss(x0, cond, noise, t).mean()
        loss.backward()
        assert torch.isfinite(loss)
        grads = [p.grad for p in lset.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert any(g.abs().sum() > 0 for g in grads)
        opt.step()
    with torch.no_grad():
        trained = b.predict(x_t, mt, cond)
        with lset.disabled():
            assert torch.equal(b.predict(x_t, mt, cond), base)
    assert not torch.allclose(trained, base)

    path = lset.to_delta(b.lora_prefix).save(tmp_path / "d.safetensors")
    assert all(k.startswith(b.lora_prefix + "_") for k in load_file(str(path)))
    lset.detach()
    delta = LoraDelta.load(path, list(b.attention_linears()))
    assert set(delta.weights) == set(lset.names)
    loaded = delta.to_lora_set(b.attention_linears()).attach()
    try:
        with torch.no_grad():
            torch.testing.assert_close(b.predict(x_t, mt, cond), trained, atol=1e-6, rtol=1e-5)
    finally:
        loaded.detach()


@pytest.mark.parametrize("kind,kwargs", [*VARIANTS.values(), ("sana", {"vae": False})], ids=[*VARIANTS, "sana-pixel"])
def test_model_folder_round_trip(kind, kwargs, tmp_path):
    b = tiny_backend(kind, **kwargs)
    path = save_tiny_folder(kind, tmp_path / "model", **kwargs)
    loaded = load_diffusers_folder(path, device="cpu")
    assert (loaded.family, type(loaded.text), type(loaded.vae)) == (b.family, type(b.text), type(b.vae))
    assert type(loaded.objective) is type(b.objective)
    assert loaded.objective.prediction_type == b.objective.prediction_type
    assert loaded.fingerprint() == b.fingerprint()
    prompts = [PROMPTS[0], ""]  # the empty prompt too: SDXL zeroes it, and must still after reloading
    c1, c2 = b.encode(prompts), loaded.encode(prompts)
    assert c1.keys() == c2.keys()
    for k in c1:
        torch.testing.assert_close(c1[k], c2[k], atol=0, rtol=0)
    x0, _, _, x_t, mt = batch(b)
    with torch.no_grad():
        torch.testing.assert_close(loaded.predict(x_t, mt, c2), b.predict(x_t, mt, c1), atol=0, rtol=0)
        torch.testing.assert_close(loaded.decode(x0), b.decode(x0), atol=0, rtol=0)
