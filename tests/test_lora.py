"""LoRA math of surgun_core.lora on tiny modules: layer delta, hooks, strength, disable, detach, merge."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from surgun_core.errors import ConfigError
from surgun_core.lora import LoraDelta, LoRALayer, LoRASet


class Tiny(nn.Module):
    """Three Linear layers of different shapes (transposes show up), with dotted names like a UNet's."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.ModuleDict({"to_q": nn.Linear(6, 5), "to_out": nn.Sequential(nn.Linear(5, 4))})
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, 6) -> (B, T, 3)
        h = torch.tanh(self.attn["to_q"](x))
        h = torch.tanh(self.attn["to_out"](h))
        return self.head(h)


def linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def randomize(lset: LoRASet, seed: int = 0) -> LoRASet:
    """Give every layer a nonzero `up` (a fresh one is zero) as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lay in lset.layers.values():
            lay.up.copy_(torch.randn(lay.up.shape, generator=g))
    return lset


@pytest.fixture
def model() -> Tiny:
    torch.manual_seed(0)
    return Tiny().requires_grad_(False)


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(2, 3, 6, generator=torch.Generator().manual_seed(1))  # (B, T, in)


@pytest.mark.parametrize(("rank", "alpha"), [(1, 1.0), (3, 1.5), (4, 16.0)])
def test_delta_weight_is_alpha_over_rank_times_up_down(rank, alpha):
    lay = LoRALayer(6, 5, rank, alpha)
    with torch.no_grad():
        lay.up.normal_()
    assert lay.rank == rank and lay.scale == pytest.approx(alpha / rank)
    expected = (alpha / rank) * lay.up @ lay.down
    assert lay.delta_weight().shape == (5, 6)
    torch.testing.assert_close(lay.delta_weight(), expected)
    xs = torch.randn(2, 3, 6)
    torch.testing.assert_close(lay(xs), xs @ expected.t())  # forward applies the same delta


def test_fresh_layer_is_zero():
    lay = LoRALayer(6, 5, 4, 4.0)
    assert torch.count_nonzero(lay.up) == 0 and torch.count_nonzero(lay.down) > 0
    assert torch.count_nonzero(lay.delta_weight()) == 0


@pytest.mark.parametrize("strength", [1.0, 0.5, 2.0, -1.0])
def test_hooked_linear_is_base_plus_strength_times_delta(strength, x):
    torch.manual_seed(0)
    lin = nn.Linear(6, 5)
    base = lin(x)
    lset = randomize(LoRASet({"lin": lin}, rank=2, alpha=3.0)).attach()
    lset.strength = strength
    dw = lset.layer("lin").delta_weight()
    torch.testing.assert_close(lin(x), base + strength * x @ dw.t())


def test_strength_scales_the_change_linearly_and_negative_subtracts(x):
    torch.manual_seed(0)
    lin = nn.Linear(6, 5)
    base = lin(x)
    lset = randomize(LoRASet({"lin": lin}, rank=2, alpha=2.0)).attach()
    full = lin(x) - base
    assert full.abs().max() > 1e-2
    lset.strength = 0.5
    torch.testing.assert_close(lin(x) - base, 0.5 * full)
    lset.strength = -1.0
    torch.testing.assert_close(lin(x) - base, -full)


def test_zero_strength_and_disabled_give_the_base_output_exactly(model, x):
    base = model(x)
    lset = randomize(LoRASet(linears(model))).attach()
    assert not torch.allclose(model(x), base)
    with lset.disabled():
        assert torch.equal(model(x), base)
    assert not torch.allclose(model(x), base)  # enabled again after the block
    lset.strength = 0.0
    assert torch.equal(model(x), base)


def test_disabled_restores_state_after_an_exception(model, x):
    lset = randomize(LoRASet(linears(model))).attach()
    with pytest.raises(RuntimeError), lset.disabled():
        raise RuntimeError("boom")
    assert lset.enabled
    with lset.disabled(), lset.disabled():  # nesting keeps the outer state
        pass
    assert lset.enabled


def test_fresh_set_changes_nothing(model, x):
    base = model(x)
    LoRASet(linears(model), rank=4, alpha=4.0).attach()
    assert torch.equal(model(x), base)


def test_detach_removes_the_hooks(model, x):
    base = model(x)
    lset = randomize(LoRASet(linears(model)))
    lset.attach()
    lset.attach()  # a second attach must not add the delta twice
    assert all(len(m._forward_hooks) == 1 for m in linears(model).values())
    hooked = model(x)
    lset.detach()
    assert all(len(m._forward_hooks) == 0 for m in linears(model).values())
    assert torch.equal(model(x), base)
    lset.attach()
    torch.testing.assert_close(model(x), hooked)


def test_hooks_leave_the_model_state_dict_alone(model):
    keys = set(model.state_dict())
    LoRASet(linears(model)).attach()
    assert set(model.state_dict()) == keys


def test_hook_sees_input_passed_by_keyword(x):
    torch.manual_seed(0)
    lin = nn.Linear(6, 5)
    lset = randomize(LoRASet({"lin": lin}, rank=2, alpha=2.0)).attach()
    torch.testing.assert_close(lin(input=x), lin(x))
    torch.testing.assert_close(
        lin(x), nn.functional.linear(x, lin.weight) + lin.bias + x @ lset.layer("lin").delta_weight().t()
    )


@pytest.mark.parametrize("strength", [1.0, 0.5, -1.0])
def test_merge_into_a_copy_matches_the_hooked_model(model, x, strength):
    merged = copy.deepcopy(model)
    lset = randomize(LoRASet(linears(model), rank=3, alpha=1.5)).attach()
    lset.strength = strength
    hooked = model(x)
    lset.to_delta("lora_unet").merge_into(linears(merged), strength=strength)
    assert not merged.attn["to_q"]._forward_hooks  # the copy is plain: the delta is in its weights
    torch.testing.assert_close(merged(x), hooked, atol=1e-6, rtol=1e-5)
    with lset.disabled():
        assert not torch.allclose(merged(x), model(x))


def test_delta_to_lora_set_reproduces_the_set(model, x):
    lset = randomize(LoRASet(linears(model), rank=3, alpha=1.5)).attach()
    hooked = model(x)
    lset.detach()
    delta = lset.to_delta("lora_unet")
    other = copy.deepcopy(model)
    base = other(x)
    again = delta.to_lora_set(linears(other), strength=0.5).attach()
    assert again.strength == 0.5
    assert not any(p.requires_grad for p in again.parameters())
    half = other(x)
    assert not torch.allclose(half, base) and not torch.allclose(half, hooked)
    again.strength = 1.0
    torch.testing.assert_close(other(x), hooked)


def test_delta_with_mixed_ranks_and_alphas():
    torch.manual_seed(0)
    mods = {"a": nn.Linear(6, 5), "b": nn.Linear(5, 4)}
    weights = {
        "a": (torch.randn(2, 6), torch.randn(5, 2), 1.0),
        "b": (torch.randn(3, 5), torch.randn(4, 3), 6.0),
    }
    lset = LoraDelta(weights).to_lora_set(mods)
    for name, (down, up, alpha) in weights.items():
        torch.testing.assert_close(lset.layer(name).delta_weight(), alpha / down.shape[0] * up @ down)


def test_training_reaches_up_and_leaves_the_base_frozen(model, x):
    before = copy.deepcopy(model.state_dict())
    lset = LoRASet(linears(model), rank=2, alpha=2.0).attach()
    target = torch.randn(2, 3, 3, generator=torch.Generator().manual_seed(2))
    opt = torch.optim.SGD(lset.parameters(), lr=0.1)
    losses = []
    for _ in range(5):
        loss = ((model(x) - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(torch.count_nonzero(lay.up) > 0 for lay in lset.layers.values())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_snapshot_and_restore(model, x):
    lset = randomize(LoRASet(linears(model))).attach()
    snap = lset.snapshot()
    out = model(x)
    randomize(lset, seed=5)
    assert not torch.allclose(model(x), out)
    lset.restore(snap)
    torch.testing.assert_close(model(x), out)


def test_empty_target_set_is_refused():
    with pytest.raises(ConfigError, match="matched nothing"):
        LoRASet({})
