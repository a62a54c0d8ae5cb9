"""Robust mode (engine/robust.py): the adversary, how its prompts enter the batch, and its cost."""

import pytest
import torch

from surgun_core.backends.base import cond_cat
from surgun_core.cache import ImageCache
from surgun_core.config import EraseConfig
from surgun_core.demo import toy_config
from surgun_core.engine.data import generate_concept_images
from surgun_core.engine.robust import PLACEHOLDER, Adversary
from surgun_core.engine.train import StepBatch, surgun_backward, surgun_loss, train_delta
from surgun_core.errors import ConfigError
from surgun_core.lora import LoRASet
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
    mixed, rows = adv.mix(cond, idx)
    assert rows == 2  # robust_share 0.5 of 4 rows: the last 2, a prompt group of their own in the loss
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


def test_an_extension_goes_on_from_the_adversarys_last_tokens(toy_backend, monkeypatch):
    cfg = toy_config("circle", robust=True, robust_every=2, robust_steps=3, steps=2, batch_size=2,
                     images_per_concept=2, blocks="cross-attn-kv", calibrate=False)  # fmt: skip
    pattern, cache = cfg.block_pattern, ImageCache(None)
    first = train_delta(toy_backend, cfg, pattern, cache=cache)
    first.lora.detach()
    word = toy_backend.word_embedding("circle").float().mean(0, keepdim=True)
    learned = first.adversary[PLACEHOLDER]
    assert not torch.allclose(learned, word.expand_as(learned))  # the attacker moved off the word
    seen = []
    real = Adversary.refresh

    def spy(self, step, first_step=0):
        seen.append({k: v.clone() for k, v in self.tokens.items()})
        return real(self, step, first_step)

    monkeypatch.setattr(Adversary, "refresh", spy)  # a spy: the real refresh runs
    more = train_delta(toy_backend, cfg, pattern, cache=cache, init_state=first.lora.snapshot(),
                       first_step=first.steps_done, init_adversary=first.adversary)  # fmt: skip
    more.lora.detach()
    assert torch.equal(seen[0][PLACEHOLDER], learned)  # its first refresh starts where the last run's ended


def test_the_adversarys_rows_are_a_group_of_their_own_in_the_loss(toy_backend):
    """With adversary rows the target/distractor part is taken per prompt group, each with its own contrast and
    cap: the gradient equals autograd's of the groups' losses weighted by their rows, and differs from the loss
    over the batch mean (where the erased plain rows reach the cap and hide the adversary's from the contrast)."""
    cfg = toy_config("circle", robust=True, use_retain=False, contrast_cap=0.01)
    g = torch.Generator().manual_seed(0)
    x = lambda: torch.randn(4, *toy_backend.latent_shape(), generator=g)  # noqa: E731
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        lset = LoRASet(toy_backend.lora_targets(r"attn2\.(to_k|to_v)$"), rank=2, alpha=2.0).attach()
    try:
        for p in lset.parameters():
            torch.nn.init.normal_(p, std=0.05)
        c = toy_backend.encode(["a circle", "a circle", "a <x>", "a ring"])
        b = StepBatch(x(), c, toy_backend.objective.sample_t(4, g), x(), x(), x(), adversary_rows=2)
        params = list(lset.parameters())
        surgun_backward(toy_backend, cfg, lset, b)
        got = [p.grad.clone() for p in params]
        for p in params:
            p.grad = None
        per = toy_backend.loss(torch.cat([b.x_T, b.x_D]), cond_cat([c, c]), torch.cat([b.noise_T, b.noise_D]),
                               torch.cat([b.t, b.t]))  # fmt: skip
        zero, halves = torch.zeros(()), (slice(0, 2), slice(2, 4))
        one_mean = torch.autograd.grad(surgun_loss(cfg, per[:4].mean(), per[4:].mean(), zero)[0], params,
                                       retain_graph=True)  # fmt: skip
        want = sum(0.5 * surgun_loss(cfg, per[:4][h].mean(), per[4:][h].mean(), zero)[0] for h in halves)
        want.backward()
        for a, p in zip(got, params):
            torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-7)
        assert any(not torch.allclose(a, o) for a, o in zip(got, one_mean))
    finally:
        lset.detach()
