"""Robust mode (engine/robust.py): the adversary, how its prompts enter the batch, and its cost."""

import pytest
import torch

from surgun_core.cache import ImageCache
from surgun_core.config import EraseConfig
from surgun_core.demo import toy_config
from surgun_core.engine.data import generate_concept_images
from surgun_core.engine.robust import PLACEHOLDER, Adversary
from surgun_core.errors import ConfigError
from surgun_core.surgun import erase


@pytest.mark.parametrize("share", [0, 1.5, "half"])
def test_robust_share_is_checked(share):
    with pytest.raises(ConfigError) as e:
        EraseConfig(concepts=["circle"], robust=True, robust_share=share)
    assert e.value.field == "robust_share"


def test_the_adversary_starts_as_the_concept_and_stands_in_for_it(toy_backend):
    cfg = toy_config("circle", robust=True, images_per_concept=2)
    images = generate_concept_images(toy_backend, ["circle"], ["a {}", "a photo of a {}"], 2, 0, 2, 4.0,
                                     ImageCache(None))  # fmt: skip
    adv = Adversary(toy_backend, cfg, images)
    assert all(PLACEHOLDER in p and "circle" not in p for p in adv.prompts)
    idx = torch.tensor([0, 1, 0, 1])
    cond = toy_backend.encode([images.prompts[i] for i in idx])
    mixed = adv.mix(cond, idx)
    for k, v in cond.items():  # the first half as given; the second half under the adversary's prompt, which
        assert torch.equal(mixed[k][:2], v[:2])  # starts as the concept's own word: the same conditioning
        torch.testing.assert_close(mixed[k][2:], v[2:], atol=1e-5, rtol=0)


def test_a_robust_erase_meters_its_adversary(toy_backend):
    cfg = toy_config("circle", robust=True, robust_every=2, robust_steps=3, steps=4, batch_size=2,
                     images_per_concept=2, blocks="cross-attn-kv", calibrate=False)  # fmt: skip
    result = erase(toy_backend, cfg, cache=ImageCache(None))
    try:
        # 2 refreshes (steps 0 and 2) x 3 Adam steps x 2 rows, each a forward with a backward (3)
        assert result.forwards_by_phase["training/adversary"] == 2 * 3 * 2 * 3
        assert result.delta.metadata["surgun.config"].count('"robust": true') == 1
    finally:
        result.lora.detach()
