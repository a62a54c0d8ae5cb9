"""The two-part backward of one training step equals autograd's gradient of the one-expression loss."""

import itertools

import pytest
import torch

from surgun_core.backends.base import cond_cat
from surgun_core.cache import ImageCache
from surgun_core.config import EraseConfig
from surgun_core.engine.anchor import TextAnchor
from surgun_core.engine.data import generate_concept_images
from surgun_core.engine.train import StepBatch, _same_template_table, surgun_backward, surgun_loss, train_delta
from surgun_core.lora import LoRASet
from surgun_core.testing import tiny_backend


def _batch(backend, g, B=2):
    shape = (B, *backend.latent_shape())
    x = lambda: torch.randn(shape, generator=g)  # noqa: E731
    c = backend.encode(["a photo of a cat"] * B)
    return StepBatch(x(), c, backend.objective.sample_t(B, g), x(), x(), x(), x(), backend.encode(["a dog"] * B), x())


@pytest.mark.parametrize("retain_rows", [2, 1])  # 1: a retain batch smaller than the target's (its first timestep)
def test_two_part_backward_equals_one_expression(retain_rows):
    backend = tiny_backend("sd1")
    cfg = EraseConfig(concepts=["cat"], w_retain=3.0)
    g = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        lset = LoRASet(backend.lora_targets(r"attn2\.(to_k|to_v)$"), rank=2, alpha=2.0).attach()
    for p in lset.parameters():  # a LoRA that is not zero, so every term has a gradient
        torch.nn.init.normal_(p, std=0.05)
    b = _batch(backend, g)
    b.x_R, b.noise_R = b.x_R[:retain_rows], b.noise_R[:retain_rows]
    b.c_R = backend.encode(["a dog"] * retain_rows)
    params = list(lset.parameters())

    L, *_ = surgun_backward(backend, cfg, lset, b)  # the loop's step: two backward passes
    two_part = [p.grad.clone() for p in params]

    for p in params:
        p.grad = None
    per = backend.loss(torch.cat([b.x_T, b.x_D]), cond_cat([b.c_T, b.c_T]), torch.cat([b.noise_T, b.noise_D]),
                       torch.cat([b.t, b.t]))  # fmt: skip
    L_T, L_D = per[:2].mean(), per[2:].mean()
    obj = backend.objective
    t_R = b.t[:retain_rows]
    x_t = obj.noisy(b.x_R, b.noise_R, t_R)
    tm = obj.model_time(t_R)
    with torch.no_grad(), lset.disabled():
        ref = backend.predict(x_t, tm, b.c_R).float()
    L_R = ((backend.predict(x_t, tm, b.c_R).float() - ref) ** 2).mean()
    L_one, _ = surgun_loss(cfg, L_T, L_D, L_R)  # DESIGN.md section 1 as one expression
    L_one.backward()
    assert torch.allclose(L, L_one.detach(), rtol=1e-5, atol=1e-7)
    for a, p in zip(two_part, params):
        assert torch.allclose(a, p.grad, rtol=1e-4, atol=1e-7), (a - p.grad).abs().max()
    assert any(a.abs().sum() > 0 for a in two_part)
    lset.detach()


def test_two_part_backward_with_the_text_anchor_equals_one_expression():
    backend = tiny_backend("sd1")
    cfg = EraseConfig(concepts=["cat"], w_retain=3.0, retain_anchor="text")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        lset = LoRASet(backend.lora_targets(r"attn2\.(to_k|to_v)$"), rank=2, alpha=2.0).attach()
    for p in lset.parameters():
        torch.nn.init.normal_(p, std=0.05)
    anchor = TextAnchor(backend, lset, ["a dog", "a red ring"])
    b = _batch(backend, torch.Generator().manual_seed(0))
    b.x_R = b.c_R = b.noise_R = None  # the text anchor draws no retain rows
    params = list(lset.parameters())
    m0 = backend.meter.snapshot()
    L, *_ = surgun_backward(backend, cfg, lset, b, anchor)
    assert sum(backend.meter.since(m0).values()) == 3 * 2 * len(b.x_T)  # target and distractor rows only
    two_part = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    per = backend.loss(torch.cat([b.x_T, b.x_D]), cond_cat([b.c_T, b.c_T]), torch.cat([b.noise_T, b.noise_D]),
                       torch.cat([b.t, b.t]))  # fmt: skip
    L_one, _ = surgun_loss(cfg, per[:2].mean(), per[2:].mean(), anchor(lset))
    L_one.backward()
    assert torch.allclose(L, L_one.detach(), rtol=1e-5, atol=1e-7)
    for a, p in zip(two_part, params):
        assert torch.allclose(a, p.grad, rtol=1e-4, atol=1e-7), (a - p.grad).abs().max()
    lset.detach()


def _step_sizes(backend, schedule: str) -> list[float]:
    """The LoRA's change at each step of an 8-step run (checkpoints every step)."""
    cfg = EraseConfig(concepts=["cat"], distractors=["dog"], templates=["a {}"], steps=8, lr=1e-2, batch_size=2,
                      images_per_concept=2, sample_steps=2, lr_schedule=schedule)  # fmt: skip
    res = train_delta(backend, cfg, r"attn2\.(to_k|to_v)$", cache=ImageCache(None), checkpoint_every=1)
    res.lora.detach()
    states = [s for _, s in res.checkpoints]
    return [sum(float((b[k] - a[k]).norm() ** 2) for k in a) ** 0.5 for a, b in itertools.pairwise(states)]


def test_cosine_schedule_ends_the_run_settled():
    backend = tiny_backend("sd1")
    cosine, constant = _step_sizes(backend, "cosine"), _step_sizes(backend, "constant")
    # Adam's steps are about lr long: cosine's last is cos-decayed to ~4% of its first, constant's is not
    assert cosine[-1] < 0.15 * cosine[0]
    assert constant[-1] > 0.3 * constant[0]


def test_training_stops_at_the_first_checkpoint_stop_at_accepts():
    backend = tiny_backend("sd1")
    cfg = EraseConfig(concepts=["cat"], distractors=["dog"], templates=["a {}"], steps=8, lr=1e-2, batch_size=2,
                      images_per_concept=2, sample_steps=2)  # fmt: skip
    asked = []

    def stop_at(lset):  # stands in for the erased model's verdict: "erased" at the second checkpoint it is asked
        asked.append({k: v.clone() for k, v in lset.snapshot().items()})
        return len(asked) == 2

    res = train_delta(backend, cfg, r"attn2\.(to_k|to_v)$", cache=ImageCache(None), checkpoint_every=3,
                      stop_at=stop_at)  # fmt: skip
    res.lora.detach()
    assert res.erased_at == res.steps_done == 6 and [s for s, _ in res.checkpoints] == [3, 6]
    assert len(res.history) == 6 and res.stopped is None
    for (_, kept), seen in zip(res.checkpoints, asked):  # asked with the LoRA of the checkpoint it just kept
        assert all(torch.equal(kept[k], seen[k]) for k in kept)


def test_the_verdict_is_not_asked_before_stop_check_from():
    backend = tiny_backend("sd1")
    cfg = EraseConfig(concepts=["cat"], distractors=["dog"], templates=["a {}"], steps=8, lr=1e-2, batch_size=2,
                      images_per_concept=2, sample_steps=2, stop_check_from=4)  # fmt: skip
    asked = []

    def stop_at(lset):  # "erased" whenever asked: training stops at the first checkpoint from step 4 on
        asked.append(True)
        return True

    res = train_delta(backend, cfg, r"attn2\.(to_k|to_v)$", cache=ImageCache(None), checkpoint_every=2,
                      stop_at=stop_at)  # fmt: skip
    res.lora.detach()
    assert res.erased_at == res.steps_done == 4 and [s for s, _ in res.checkpoints] == [2, 4] and len(asked) == 1


def _encoded(backend, monkeypatch) -> list[list[str]]:
    """Each call's prompts to the frozen text encoder (the loop's bank of conditioning is the last call)."""
    calls, encode = [], backend.encode

    def spy(prompts):
        calls.append(list(prompts))
        return encode(prompts)

    monkeypatch.setattr(backend, "encode", spy)
    return calls


@pytest.mark.parametrize("retain_templates", [None, ["a red {}", "a {} at night"]])
def test_retain_templates_write_the_anchor_prompts(retain_templates, monkeypatch):
    backend = tiny_backend("sd1")
    calls = _encoded(backend, monkeypatch)
    cfg = EraseConfig(concepts=["cat"], distractors=["dog", "bird"], templates=["a {}"], steps=2, batch_size=2,
                      images_per_concept=2, sample_steps=2, retain_templates=retain_templates)  # fmt: skip
    res = train_delta(backend, cfg, r"attn2\.(to_k|to_v)$", cache=ImageCache(None))
    res.lora.detach()
    assert res.steps_done == 2 and all(h["L_R"] >= 0 for h in res.history)
    drawn = {p for call in calls[:-1] for p in call}  # the sampler's prompts: training images (and its empty one)
    bank = set(calls[-1])
    assert drawn == {"", "a cat", "a dog", "a bird"}  # no image is drawn for the anchor's own prompts
    if retain_templates is None:  # the anchor: the distractors' images under their own prompts
        assert bank == {"a cat", "a dog", "a bird"}
    else:  # each distractor in each template, over the images drawn for "a dog" and "a bird"
        assert bank == {"a cat", "a red dog", "a dog at night", "a red bird", "a bird at night"}


def test_a_distractor_row_is_drawn_in_its_target_rows_phrasing():
    backend = tiny_backend("sd1")
    templates = ["a {}", "a photo of a {}", "a {} at night"]
    draw = lambda names, seed: generate_concept_images(backend, names, templates, 4, seed, 2, 1.0, ImageCache(None))  # noqa: E731
    X_T, X_D = draw(["cat"], 0), draw(["dog", "bird"], 1)
    table = _same_template_table(X_D, X_T)
    for i, prompt in enumerate(X_T.prompts):
        for w, name in enumerate(X_D.names):
            assert X_D.prompts[int(table[i, w])] == prompt.replace("cat", name)
    cfg = EraseConfig(concepts=["cat"], distractors=["dog", "bird"], templates=templates, steps=2, batch_size=2,
                      images_per_concept=3, sample_steps=2, distractor_same_template=True)  # fmt: skip
    res = train_delta(backend, cfg, r"attn2\.(to_k|to_v)$", cache=ImageCache(None))
    res.lora.detach()
    assert res.steps_done == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in res.history)
