"""The "text" retain anchor (engine/anchor.py): the LoRA's own output on every retain prompt token its layers read,
relative to theirs; refused on layers that read the image; no denoiser forward a step."""

import pytest
import torch

from surgun_core.engine.anchor import TextAnchor
from surgun_core.errors import ConfigError
from surgun_core.lora import LoRASet
from surgun_core.testing import tiny_backend

KV = r"attn2\.(to_k|to_v)$"
PROMPTS = ["a photo of a dog", "a red ring", "a drawing of a cat"]


def _lora(backend, pattern):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        lset = LoRASet(backend.lora_targets(pattern), rank=2, alpha=2.0).attach()
    for p in lset.parameters():  # a LoRA that is not zero
        torch.nn.init.normal_(p, std=0.05)
    return lset


def test_text_anchor_is_the_loras_output_on_the_prompts_tokens_over_the_layers():
    backend = tiny_backend("sd1")
    lset = _lora(backend, KV)
    m0 = backend.meter.snapshot()
    anchor = TextAnchor(backend, lset, PROMPTS, batch_size=2)
    assert sum(backend.meter.since(m0).values()) == 2 + len(PROMPTS)  # the check's two, then one a prompt, once
    assert len(anchor.inputs) == 1  # every cross-attention K and V reads the same text: one stored copy
    # by hand: a UNet's cross-attention K/V read the text encoder's output, whatever x_t and t
    u = backend.encode(PROMPTS)["encoder_hidden_states"].flatten(0, 1)
    num = sum((lset.layer(n)(u) ** 2).sum() for n in lset.names)
    with torch.no_grad():
        den = sum((lset.targets[n](u) ** 2).sum() for n in lset.names)
    value = anchor(lset)
    assert torch.allclose(value, num / den, rtol=1e-5)
    value.backward()  # differentiable in the LoRA's weights, through no denoiser forward
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lset.parameters())
    before = sum(backend.meter.since(m0).values())
    anchor(lset)
    assert sum(backend.meter.since(m0).values()) == before
    lset.detach()


def test_a_zero_lora_costs_nothing_and_a_larger_one_more():
    backend = tiny_backend("sd1")
    lset = _lora(backend, KV)
    anchor = TextAnchor(backend, lset, PROMPTS)
    small = anchor(lset).item()
    with torch.no_grad():
        for layer in lset.layers.values():
            layer.up.mul_(2)
    assert anchor(lset).item() == pytest.approx(4 * small, rel=1e-5)
    with torch.no_grad():
        for layer in lset.layers.values():
            layer.up.zero_()
    assert anchor(lset).item() == 0.0
    lset.detach()


@pytest.mark.parametrize("pattern", [r"attn1\.to_k$", r"attn2\.to_q$"])
def test_layers_that_read_the_image_are_refused_by_name(pattern):
    backend = tiny_backend("sd1")
    lset = _lora(backend, pattern)
    with pytest.raises(ConfigError) as e:
        TextAnchor(backend, lset, PROMPTS)
    assert e.value.field == "retain_anchor" and "attn" in str(e.value) and "'output'" in str(e.value)
    lset.detach()
