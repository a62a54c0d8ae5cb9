"""Benchmark baselines (ESD-x, ESD-u, UCE, CA) on the shipped toy model: each erases, restore() is exact.

Short runs need overrides: the paper defaults (1e-5 x 1000 steps for ESD, 100 steps for CA) are sized for
Stable Diffusion, so the tests raise lr and shrink the run until a few seconds visibly act on the toy model.
"""

import pytest
import torch

from surgun_core.benchmark.baselines import BASELINES, run_baseline
from surgun_core.errors import Cancelled, ConfigError, SurgUnError
from surgun_core.objectives import FlowObjective
from surgun_core.toyworld.world import COLOURS, OBJECT_TEMPLATES, SHAPES

TEMPLATES = [t.replace("{s}", "{}") for t in OBJECT_TEMPLATES]
PRESERVE = [s for s in SHAPES if s != "circle"]
QUICK = {
    "uce": {},  # closed form: the paper defaults already act
    # ESD-x on the toy model only bites with a stronger negative guidance in a run this short
    "esd-x": {"iterations": 40, "lr": 3e-3, "ddim_steps": 10, "negative_guidance": 3.0},
    "esd-u": {"iterations": 30, "lr": 3e-4, "ddim_steps": 10},
    "ca": {"iterations": 30, "lr": 3e-3, "n_images": 16, "sample_steps": 10, "batch_size": 4},
}


def circle_share(backend, clf) -> float:
    """Share of 'a {colour} circle' images (5 colours x 2 seeds) the toy classifier calls a circle."""
    prompts = [f"a {c} circle" for c in COLOURS for _ in range(2)]
    seeds = [1000 + k for _ in COLOURS for k in range(2)]
    shapes, _ = clf.predict(backend.generate(prompts, seeds, steps=10) * 2 - 1)
    return sum(s == "circle" for s in shapes) / len(shapes)


def snapshot(backend):
    return {k: v.clone() for k, v in backend.denoiser.state_dict().items()}


def max_diff(backend, ref) -> float:
    return max((v - ref[k]).abs().max().item() for k, v in backend.denoiser.state_dict().items())


@pytest.fixture(scope="module")
def base_share(toy_backend, toy_classifier):
    return circle_share(toy_backend, toy_classifier)


@pytest.mark.parametrize("name", list(QUICK))
def test_baseline_erases_circle_and_restores_exactly(toy_backend, toy_classifier, base_share, name):
    ref = snapshot(toy_backend)
    flags = {n: p.requires_grad for n, p in toy_backend.denoiser.named_parameters()}
    phases = set()
    result = run_baseline(
        name, toy_backend, "circle", templates=TEMPLATES, preserve=PRESERVE, anchor="square", seed=0,
        progress=lambda phase, done, total, stats: phases.add(phase), **QUICK[name],
    )  # fmt: skip
    try:
        assert max_diff(toy_backend, ref) > 0  # the erase edited the denoiser in place
        assert {n: p.requires_grad for n, p in toy_backend.denoiser.named_parameters()} == flags
        after = circle_share(toy_backend, toy_classifier)
    finally:
        result.restore()
    assert base_share >= 0.8, base_share
    assert after <= base_share - 0.4, (name, base_share, after)
    assert max_diff(toy_backend, ref) == 0
    assert result.name == name and result.seconds > 0 and result.peak_mem_mb > 0
    assert result.settings["edited_parameters"] > 0
    assert phases == ({"edit"} if name == "uce" else {"train", "images"} if name == "ca" else {"train"})


def test_esd_x_and_u_train_disjoint_parameter_sets(toy_backend):
    from surgun_core.benchmark.baselines.esd import trained_names

    x, u = set(trained_names(toy_backend.denoiser, "x")), set(trained_names(toy_backend.denoiser, "u"))
    assert x and u and not x & u
    assert all(".attn2." in n for n in x)
    assert not any(n.startswith(("time_embedding.", "conv_out.", "conv_norm_out.")) for n in u)


def test_settings_record_paper_defaults(toy_backend):
    result = run_baseline("uce", toy_backend, "circle", templates=TEMPLATES, preserve=PRESERVE)
    result.restore()
    s = result.settings
    assert (s["lamb"], s["erase_scale"], s["preserve_scale"]) == (0.5, 1.0, 0.2)  # 0.2 = 1 / (1 + 4 preserved)
    assert s["erase_texts"][0] == "circle" and s["preserve_texts"][0] == ""


def test_cancel_restores_weights(toy_backend):
    ref = snapshot(toy_backend)
    calls = {"n": 0}

    def cancel():
        calls["n"] += 1
        return calls["n"] > 3

    with pytest.raises(Cancelled):
        run_baseline("esd-x", toy_backend, "circle", templates=TEMPLATES, preserve=[], iterations=10, lr=1e-2,
                     ddim_steps=4, cancel=cancel)  # fmt: skip
    assert max_diff(toy_backend, ref) == 0
    assert not any(p.requires_grad for p in toy_backend.denoiser.parameters())


def test_unknown_method_lists_the_valid_names(toy_backend):
    with pytest.raises(ConfigError) as e:
        run_baseline("esd-z", toy_backend, "circle", templates=TEMPLATES, preserve=[])
    assert e.value.field == "methods"
    assert all(n in str(e.value) for n in BASELINES) and set(BASELINES) == {"esd-x", "esd-u", "uce", "ca"}


def test_bad_settings_fail_loudly(toy_backend, monkeypatch):
    ref = snapshot(toy_backend)
    with pytest.raises(ConfigError, match="ddim_step"):
        run_baseline("esd-u", toy_backend, "circle", templates=TEMPLATES, preserve=[], ddim_step=5)
    with pytest.raises(ConfigError) as e:
        run_baseline("ca", toy_backend, "circle", templates=TEMPLATES, preserve=[])
    assert e.value.field == "anchor"
    with pytest.raises(ConfigError) as e:
        run_baseline("uce", toy_backend, "circle", templates=TEMPLATES, preserve=[], iterations=5)
    assert e.value.field == "iterations"
    monkeypatch.setattr(toy_backend, "objective", FlowObjective())
    with pytest.raises(SurgUnError, match="flow"):
        run_baseline("esd-x", toy_backend, "circle", templates=TEMPLATES, preserve=[])
    assert max_diff(toy_backend, ref) == 0


def test_uce_pairs_the_concepts_last_word_with_the_guides_start_token(toy_backend):
    from surgun_core.benchmark.baselines.uce import erase_tokens, last_word_index

    L = toy_backend.encode(["a"])["encoder_hidden_states"].shape[1]
    assert last_word_index(toy_backend, ["a red circle", "circle", " ", ""], L) == [3, 1, 0, 0]
    ce, cg = erase_tokens(toy_backend, ["a red circle"], " ")
    emb = toy_backend.encode(["a red circle", " "])["encoder_hidden_states"]
    torch.testing.assert_close(ce, emb[0, 3:])  # "circle", end token, padding
    torch.testing.assert_close(cg, emb[1, : L - 3])  # start token, end token, padding
