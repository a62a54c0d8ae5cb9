"""Attacks on an erasure and the audit (surgun_core.attacks, surgun_core.audit) on the toy world.

Small settings (10 sampler steps, few images and optimisation steps) keep each test to seconds; the slow test
erases circle with the toy recipe and shows that concept inversion brings it back (issue 13's finding).
"""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from surgun_core.attacks import ATTACKS, get_attack, run_attack
from surgun_core.attacks.inversion import PLACEHOLDER
from surgun_core.audit import audit_metadata, run_audit
from surgun_core.backends.base import Backend
from surgun_core.cache import ImageCache
from surgun_core.demo import toy_config
from surgun_core.errors import ConfigError, SurgUnError
from surgun_core.grid import save_png
from surgun_core.judges.scorers import ToyScorer
from surgun_core.lora import LoRASet
from surgun_core.registry import ATTACK_NAMES, BLOCK_PRESETS
from surgun_core.surgun import erase
from surgun_core.testing import tiny_sana_backend, tiny_sdxl_backend
from surgun_core.toyworld.world import photos

# 10 sampler steps (as the toy recipe's probe images), three of the five "a <colour> {}" prompts
FAST = {"sample_steps": 10, "prompts": ("a red {}", "a green {}", "a blue {}")}
SMALL = {
    "inversion": {**FAST, "images": 8, "steps": 20, "seeds_per_prompt": 2},
    "prefix": {**FAST, "steps": 10, "seeds_per_prompt": 2},
    "concept_vector": {**FAST, "strengths": (1.0, 3.0), "seeds_per_prompt": 2},
    "phrasings": {
        "sample_steps": 10,
        "seeds_per_prompt": 1,
        "phrasings": ("an image of a {a} {}", "{} {a}", "a {}, a"),
    },
}


@pytest.fixture(scope="module")
def scorer(toy_backend, toy_classifier):
    return ToyScorer(toy_backend, toy_classifier)


# ---- registry --------------------------------------------------------------------------------------------


def test_registry_names_every_attack_and_refuses_unknown_ones(toy_backend):
    assert tuple(ATTACKS) == ATTACK_NAMES
    with pytest.raises(ConfigError, match=r"unknown attack 'inverse'.*inversion, prefix, concept_vector, phrasings"):
        get_attack("inverse")
    with pytest.raises(ConfigError, match=r"no setting stepz.*steps"):
        get_attack("inversion").settings_for(toy_backend, {"stepz": 3})


def test_settings_are_scaled_to_the_toy_world(toy_backend):
    """The published defaults stay for real models; the toy world gets its own where they differ."""
    inv = get_attack("inversion")
    assert inv.defaults["lr"] == 0.01 and get_attack("prefix").defaults["prefix_tokens"] == 5
    toy = inv.settings_for(toy_backend, {"lr": 0.02})
    assert toy["steps"] == inv.toy["steps"] != inv.defaults["steps"] and toy["lr"] == 0.02


# ---- the text side: learned tokens -----------------------------------------------------------------------


def test_placeholder_with_the_word_embedding_encodes_like_the_word(toy_backend):
    b = toy_backend
    prompts = ["a red circle", "a photo of a green circle, painting", "circle in purple"]
    ref = b.encode(prompts)["encoder_hidden_states"]
    emb = b.word_embedding("circle").clone().requires_grad_(True)  # (1, d)
    cond = b.encode_with_tokens([p.replace("circle", "<c>") for p in prompts], {"<c>": emb})
    assert torch.allclose(cond["encoder_hidden_states"], ref, atol=1e-5)
    cond["encoder_hidden_states"].pow(2).sum().backward()
    assert emb.grad is not None and emb.grad.abs().sum() > 0
    # no placeholder: exactly encode(); a placeholder of k embeddings takes k positions
    assert torch.equal(b.encode_with_tokens(prompts, {})["encoder_hidden_states"], ref)
    two = torch.cat([b.word_embedding("red"), b.word_embedding("circle")])  # (2, d)
    got = b.encode_with_tokens(["a <rc> in purple"], {"<rc>": two})["encoder_hidden_states"]
    assert torch.allclose(got, b.encode(["a red circle in purple"])["encoder_hidden_states"], atol=1e-5)


def test_placeholder_past_the_end_of_the_prompt_is_refused(toy_backend):
    long = " ".join(["a photo of a"] * 4) + " <c>"  # 16 words before it: past the toy encoder's 16 tokens
    with pytest.raises(SurgUnError, match="learned token falls past the end"):
        toy_backend.encode_with_tokens([long], {"<c>": toy_backend.word_embedding("circle")})


def test_sdxl_learned_tokens_feed_both_encoders():
    """SDXL: a token's embedding is both encoders' columns side by side; the pooled projection follows too."""
    b = tiny_sdxl_backend()
    emb = b.word_embedding("cat")  # (1, d1 + d2)
    assert emb.shape[1] == sum(e.get_input_embeddings().embedding_dim for e in (b.text.encoder, b.text.encoder_2))
    ref = b.encode(["a photo of the cat"])
    got = b.encode_with_tokens(["a photo of the <x>"], {"<x>": emb})
    assert set(got) == set(ref)
    for k in ref:
        assert torch.allclose(got[k], ref[k], atol=1e-5), k


def test_backends_without_learned_tokens_say_so():
    class Bare(Backend):  # the Backend interface's default, as the A1111 backend has it for now
        architecture = "bare"

        def encode(self, prompts):
            raise NotImplementedError

        def predict(self, x_t, t, cond):
            raise NotImplementedError

        def latent_shape(self):
            return (3, 4, 4)

    with pytest.raises(SurgUnError, match="Bare backend cannot encode prompts with learned tokens"):
        Bare().encode_with_tokens(["a <x>"], {"<x>": torch.zeros(1, 4)})
    with pytest.raises(SurgUnError, match="SanaText cannot encode prompts with learned tokens"):
        tiny_sana_backend().encode_with_tokens(["a <x>"], {"<x>": torch.zeros(1, 4)})


# ---- each attack finds the concept on the base model (its control) ---------------------------------------


@pytest.mark.parametrize("name", ATTACK_NAMES)
def test_attack_on_the_base_model_finds_the_concept(name, toy_backend, scorer):
    res, control = run_attack(name, toy_backend, "circle", "object", scorer, settings=SMALL[name])
    assert control is None and res.model == "base"  # no judge context: the backend is the base model already
    # the toy model draws a circle for about a third of "a <colour> object" prompts: an attack must do better
    assert res.recovery >= 0.75, (name, res.recovery, res.details)
    assert len(res.judged) == len(res.prompts) == len(res.seeds) == res.images.shape[0]
    assert res.images.shape[1:] == (3, 16, 16) and res.images.min() >= 0 and res.images.max() <= 1
    assert res.forwards > 0 and all(k.startswith(f"attacks/{name}/") for k in res.forwards_by_phase)
    if name == "inversion":  # the attacked prompts carry the learned token, never the word
        assert all(PLACEHOLDER in p and "circle" not in p for p in res.prompts)
        # the toy world's own images are inverted, not drawn; the classifier judges for free
        assert set(res.forwards_by_phase) == {"attacks/inversion/learning", "attacks/inversion/images"}
    if name == "phrasings":  # each phrasing's rate; "{a}" asked with all five colours, the others once
        assert set(res.details["rates"]) == set(SMALL[name]["phrasings"])
        assert len(res.prompts) == 5 + 5 + 1 and "a circle, a" in res.prompts


def test_inversion_inverts_the_worlds_images_on_the_toy_model(toy_backend, scorer):
    """Toy world: the world's own images of the concept, phrased with their colour, as textual inversion inverts
    photos; images_from="model" takes the base model's images from the training phrasings instead."""
    attack = get_attack("inversion")(toy_backend, "triangle", "object", scorer, settings=SMALL["inversion"])
    x0, phrasings = attack.concept_images(10)
    assert torch.equal(x0, photos("triangle", 10, attack.seeds(1)[0])[0])
    assert phrasings[:6] == ["a red {}", "a green {}", "a blue {}", "a yellow {}", "a purple {}", "a red {}"]
    colour = get_attack("inversion")(toy_backend, "yellow", "style", scorer, settings=SMALL["inversion"])
    assert colour.concept_images(2)[1] == ["a {} circle", "a {} square"]
    settings = {**SMALL["inversion"], "images_from": "model"}
    model = get_attack("inversion")(toy_backend, "triangle", "object", scorer, settings=settings, cache=ImageCache())
    before = toy_backend.meter.snapshot()
    x1, phrasings1 = model.concept_images(4)
    assert toy_backend.meter.since(before) == {"base images": 4 * 10 * 2}  # 4 images, 10 steps, guided: 2 rows
    assert x1.shape == (4, *x0.shape[1:]) and set(phrasings1) <= set(model.templates())
    with pytest.raises(ConfigError, match=r"images_from must be one of auto, model, not 'web'"):
        get_attack("inversion").settings_for(toy_backend, {"images_from": "web"})


@pytest.mark.parametrize("concept", ["triangle", "yellow"])
def test_inversion_finds_concepts_the_models_own_images_hid(concept, toy_backend, scorer):
    """Inverting the base model's own guided images found triangle in 12% of images (its loss on them is no
    lower under "triangle" than "square"); the world's images find it, and a colour, on the base model."""
    kind = "object" if concept == "triangle" else "style"
    prompts = ("a {} circle", "a {} square") if kind == "style" else FAST["prompts"]
    res, _ = run_attack("inversion", toy_backend, concept, kind, scorer,
                        settings={**SMALL["inversion"], "prompts": prompts, "steps": 100})  # fmt: skip
    assert res.recovery >= 0.9, res.details


# ---- reproducibility ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["inversion", "prefix"])
def test_same_seed_same_result(name, toy_backend, scorer):
    """Fresh caches: the base images are drawn again, so the whole attack repeats, not a cached copy of it."""
    settings = {**SMALL[name], "prompts": ("a red {}",), "steps": 5}
    runs = [run_attack(name, toy_backend, "circle", "object", scorer, seed=s, settings=settings,
                       cache=ImageCache())[0] for s in (3, 3, 4)]  # fmt: skip
    assert runs[0].recovery == runs[1].recovery and runs[0].judged == runs[1].judged
    assert torch.equal(runs[0].images, runs[1].images)
    assert not torch.equal(runs[0].images, runs[2].images)  # another seed is another attack


# ---- the audit ------------------------------------------------------------------------------------------


def _random_delta(backend, seed: int = 0):
    """A LoRA delta with nonzero weights (not an erasure: the audit's shape does not depend on what it does)."""
    lset = LoRASet(backend.lora_targets(BLOCK_PRESETS["cross-attn-kv"]))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lay in lset.layers.values():
            lay.up.copy_(0.05 * torch.randn(lay.up.shape, generator=g))
    return lset.to_delta(backend.lora_prefix)


def test_audit_report_json_header_and_grid(toy_backend, scorer, tmp_path):
    b = toy_backend
    names = ("concept_vector", "phrasings")
    x_ref = b.sample(["a red circle"], [5], steps=4)
    report = run_audit(b, _random_delta(b), "circle", "object", attacks=names, scorer=scorer,
                       settings={n: SMALL[n] for n in names})  # fmt: skip
    assert torch.equal(b.sample(["a red circle"], [5], steps=4), x_ref)  # the delta was detached after the audit
    d = json.loads(json.dumps(report.to_dict()))
    assert d["concept"] == "circle" and d["scorer"] == "toy" and list(d["attacks"]) == list(names)
    for name in names:
        a = d["attacks"][name]
        assert 0 <= a["recovery"] <= 1 and 0 <= a["control"] <= 1
        assert a["forwards"] == a["erased"]["forwards"] + a["base"]["forwards"] > 0 and a["seconds"] > 0
        assert a["erased"]["model"] == "erased" and a["base"]["model"] == "base"
        assert set(a["base"]["forwards_by_phase"]) <= {f"attacks/{name}/control/images"}
    assert d["attacks"]["concept_vector"]["settings"]["strengths"] == [1.0, 3.0]
    assert set(d["attacks"]["concept_vector"]["erased"]["details"]["rates"]) == {"strength 1", "strength 3"}
    assert d["max_recovery"] == max(a["recovery"] for a in d["attacks"].values())
    header = audit_metadata(report)
    assert list(header) == ["surgun.audit"]
    assert (
        json.loads(header["surgun.audit"])["attacks"]["phrasings"]["recovery"] == d["attacks"]["phrasings"]["recovery"]
    )
    save_png(report.grid(per_row=4), tmp_path / "audit.png")
    img = Image.open(tmp_path / "audit.png")
    assert img.height >= 2 * 64 and img.width > 2 * 4 * 64  # a row per attack, base images beside erased ones


def test_audit_refuses_unknown_attacks_before_any_work(toy_backend, scorer):
    before = toy_backend.meter.snapshot()
    with pytest.raises(ConfigError, match="unknown attack 'ringabell'"):
        run_audit(toy_backend, _random_delta(toy_backend), "circle", "object", attacks=("ringabell",), scorer=scorer)
    with pytest.raises(ConfigError, match="unknown attack 'prefx'"):
        run_audit(toy_backend, _random_delta(toy_backend), "circle", "object", attacks=("prefix",), scorer=scorer,
                  settings={"prefx": {}})  # fmt: skip
    with pytest.raises(ConfigError, match="the prefix attack has no setting stepz"):
        run_audit(toy_backend, _random_delta(toy_backend), "circle", "object", attacks=("phrasings",), scorer=scorer,
                  settings={"prefix": {"stepz": 3}})  # fmt: skip
    with pytest.raises(ConfigError, match="judge context"):  # no erasure to switch off, and no way to the base
        run_audit(toy_backend, None, "circle", "object", attacks=("phrasings",), scorer=scorer)
    assert toy_backend.meter.since(before) == {}


# ---- the finding of issue 13 ----------------------------------------------------------------------------


@pytest.mark.slow
def test_inversion_brings_an_erased_circle_back(toy_backend, scorer):
    """Erase circle with the toy recipe, then invert: the word no longer draws circles, a learned token does.

    Time: 60 erase steps at the recipe's learning rate held constant (the recipe's 120 decay on a cosine) and no
    calibration, on every level's cross-attention keys/values (what the demo trains; 40 steps, enough before the
    recipe anchored the other shapes beside each colour, left 0.70 of "a <colour> circle" drawn as circles);
    inversion with 300 steps on 24 images instead of the toy default (600 on 40), on 20 images. Measured at 40
    steps with the previous recipe: 0.60 and 0.55 (seeds 0 and 1) against 0.0 for the plain "a <colour> circle";
    an untrained token gives about 0.3 (see the report).
    """
    cfg = toy_config("circle", blocks="cross-attn-kv", calibrate=False, steps=60, lr_schedule="constant")
    result = erase(toy_backend, cfg, cache=ImageCache())
    try:
        plain, _ = run_attack("phrasings", toy_backend, "circle", "object", scorer, result.lora.disabled,
                              settings={"phrasings": ["a {a} {}"]}, control=False)  # fmt: skip
        res, _ = run_attack("inversion", toy_backend, "circle", "object", scorer, result.lora.disabled,
                            settings={"images": 24, "steps": 300, "seeds_per_prompt": 4}, control=False)  # fmt: skip
    finally:
        result.lora.detach()
    assert plain.recovery <= 0.1  # the erasure holds against the word itself
    assert res.recovery >= 0.4, res.details  # and falls to a token learned against it
