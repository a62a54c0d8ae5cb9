"""Single-file checkpoints (backends/single_file.py, ldm_keys.py) and baking a delta into one (apply.py).

Tiny SD1/SDXL models are written in the real A1111/ComfyUI key layout and loaded back offline (a socket
guard fails any connection attempt); the real families' configs and key maps are checked on meta tensors.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import surgun_core.apply as apply_mod
from surgun_core.apply import apply_delta_to_checkpoint
from surgun_core.backends.diffusers import load_diffusers_folder, save_diffusers_folder
from surgun_core.backends.ldm_keys import (
    UNET_PREFIX,
    UNetLayout,
    clip_to_ldm,
    open_clip_to_ldm,
    unet_to_ldm,
    vae_to_ldm,
)
from surgun_core.backends.single_file import (
    CONFIGS,
    clip_tokenizer,
    inspect_checkpoint,
    load_model,
    load_tensors,
    save_single_file,
)
from surgun_core.errors import ConfigError, DeltaMismatchError
from surgun_core.lora import LoraDelta, LoRASet
from surgun_core.testing import tiny_sd1_backend, tiny_sdxl_backend


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to reach a model hub fails the test."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[1:] or kwargs}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """For sd1 and sdxl: (backend, its diffusers folder (the config), its single file)."""
    root = tmp_path_factory.mktemp("tiny")
    out = {}
    for kind, make in (("sd1", tiny_sd1_backend), ("sdxl", tiny_sdxl_backend)):
        backend = make()
        folder = save_diffusers_folder(backend, root / kind)
        out[kind] = (backend, folder, save_single_file(backend, root / f"{kind}.safetensors"))
    return out


def fake_checkpoint(path: Path, shapes: dict[str, tuple[int, ...]], metadata=None, fill=None) -> Path:
    """A safetensors file of zero tensors (or `fill`ed ones) with these names and shapes."""
    tensors = {k: torch.zeros(s, dtype=torch.float16) for k, s in shapes.items()}
    tensors.update(fill or {})
    save_file(tensors, str(path), metadata=metadata)
    return path


ATTN2 = UNET_PREFIX + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"
SD2_NORM = UNET_PREFIX + "output_blocks.11.1.transformer_blocks.0.norm1.bias"
HEADERS = {
    "sd1": {ATTN2: (4, 768), "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight": (77, 4)},
    "sd2": {ATTN2: (4, 1024), "cond_stage_model.model.token_embedding.weight": (8, 4)},
    "sdxl": {ATTN2: (4, 2048), "conditioner.embedders.1.model.positional_embedding": (77, 4)},
    "sd3": {UNET_PREFIX + "joint_blocks.0.x_block.attn.qkv.weight": (12, 4), "text_encoders.clip_l.x": (2,)},
    "flux": {"double_blocks.0.img_attn.qkv.weight": (12, 4), "img_in.weight": (4, 4)},
}


@pytest.mark.parametrize("family", list(HEADERS))
def test_family_detected_from_header(tmp_path, family):
    info = inspect_checkpoint(fake_checkpoint(tmp_path / "m.safetensors", HEADERS[family]))
    assert info.family == family
    if family in ("sd3", "flux"):
        assert info.prediction_type == "flow"


@pytest.mark.parametrize(("width", "family"), [(768, "sd1"), (1024, "sd2"), (2048, "sdxl")])
def test_unet_only_file_detected_by_cross_attention_width(tmp_path, width, family):
    assert inspect_checkpoint(fake_checkpoint(tmp_path / "u.safetensors", {ATTN2: (4, width)})).family == family


def test_prediction_type_rules(tmp_path):
    sd2 = HEADERS["sd2"]
    eps = inspect_checkpoint(fake_checkpoint(tmp_path / "a.safetensors", {**sd2, SD2_NORM: (320,)}))
    assert (eps.prediction_type, eps.architecture) == ("epsilon", "stable-diffusion-v2-512")
    spread = torch.linspace(-1, 1, 320).half()  # std 0.58 > 0.09: ComfyUI's sign of a 768-v model
    v = inspect_checkpoint(fake_checkpoint(tmp_path / "b.safetensors", sd2, fill={SD2_NORM: spread}))
    assert (v.prediction_type, v.architecture, v.prediction_rule) == (
        "v_prediction", "stable-diffusion-v2-768-v", "SD2 norm1.bias std")  # fmt: skip
    said = fake_checkpoint(tmp_path / "c.safetensors", sd2, metadata={"modelspec.prediction_type": "v"})
    assert inspect_checkpoint(said).prediction_type == "v_prediction"
    vpred = fake_checkpoint(tmp_path / "d.safetensors", {**HEADERS["sdxl"], "v_pred": (0,)})
    assert inspect_checkpoint(vpred).prediction_type == "v_prediction"
    assert inspect_checkpoint(vpred, prediction_type="epsilon").prediction_type == "epsilon"


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_sd3_and_flux_are_refused_naming_what_is_missing(tmp_path, family):
    path = fake_checkpoint(tmp_path / f"{family}.safetensors", HEADERS[family])
    with pytest.raises(ConfigError, match="T5 tokenizer") as e:
        load_model(path)
    assert {"sd3": "SD3", "flux": "Flux"}[family] in str(e.value) and "not in the file" in str(e.value)
    assert "ComfyUI" in str(e.value)


def test_unknown_layout_names_what_was_found(tmp_path):
    path = fake_checkpoint(tmp_path / "llm.safetensors", {"model.layers.0.weight": (2, 2), "lm_head.weight": (2, 2)})
    with pytest.raises(ConfigError, match=r"unknown checkpoint layout: found .*SD1\.x") as e:
        load_model(path)
    assert "model.layers.* (1)" in str(e.value) and "lm_head.weight (1)" in str(e.value)


def test_pickles_are_refused(tmp_path):
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": {}}, ckpt)
    with pytest.raises(ConfigError, match=r"pickle.*can run code.*Convert it to \.safetensors"):
        load_model(ckpt)
    disguised = tmp_path / "model.safetensors"
    disguised.write_bytes(ckpt.read_bytes())
    with pytest.raises(ConfigError, match="is a pickle"):
        load_model(disguised)


def test_missing_path_and_foreign_folder(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_model(tmp_path / "nope.safetensors")
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "readme.txt").write_text("hi")
    with pytest.raises(ConfigError, match=r"without model_index\.json \(found: readme\.txt\).*diffusers folder"):
        load_model(tmp_path / "stuff")


def test_truncated_file_is_one_clear_line(tiny, tmp_path):
    data = tiny["sd1"][2].read_bytes()
    for n, cut in (("half", len(data) // 2), ("head", 20)):
        path = tmp_path / f"{n}.safetensors"
        path.write_bytes(data[:cut])
        with pytest.raises(ConfigError, match=r"not a readable safetensors file.*truncated") as e:
            load_model(path)
        assert "\n" not in str(e.value) and e.value.__cause__ is None and e.value.__suppress_context__


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_single_file_round_trip(tiny, kind):
    """tiny diffusers model -> single file (LDM keys) -> load_model: same weights, same predictions."""
    base, folder, path = tiny[kind]
    info = inspect_checkpoint(path)
    assert info.family == kind and any(k.startswith("first_stage_model.encoder.down.0.block.0.") for k in info.shapes)
    loaded = load_model(path, device="cpu", config=folder)
    for a, b in ((base.denoiser, loaded.denoiser), (base.vae, loaded.vae), (base.text, loaded.text)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    prompts = ["a photo of a cat", ""]
    ca, cb = base.encode(prompts), loaded.encode(prompts)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500])
    torch.testing.assert_close(loaded.predict(x, t, cb), base.predict(x, t, ca), atol=1e-5, rtol=0)
    assert loaded.fingerprint() == base.fingerprint() and loaded.architecture == base.architecture


def test_shipped_config_mismatch_says_what_to_do(tiny):
    """Without config=, the shipped (released-size) config is used; a tiny file does not fit it, clearly."""
    with pytest.raises(ConfigError, match=r"its UNet does not fit the config \(time_embedding.linear_1.weight is "
                       r"\[32, 8\], the config wants \[1280, 320\]\); the shipped sd1 config") as e:  # fmt: skip
        load_model(tiny["sd1"][2], device="cpu")
    assert "low_cpu_mem_usage" not in str(e.value) and e.value.__cause__ is None


def test_missing_tensors_are_named(tiny, tmp_path):
    tensors = load_tensors(tiny["sd1"][2])
    gone = UNET_PREFIX + "out.2.weight"  # conv_out
    del tensors[gone]
    path = tmp_path / "holed.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(ConfigError, match=r"1 UNet tensors are missing, e\.g\. model\.diffusion_model\.out\.2\.weight"):
        load_model(path, device="cpu", config=tiny["sd1"][1])


def test_sd2_layout_round_trip_with_open_clip_text(tiny, tmp_path):
    """An SD2-layout file (open_clip text encoder under cond_stage_model.model.) loads, v-prediction from metadata."""
    base, folder, _ = tiny["sd1"]
    ldm = unet_to_ldm(base.denoiser.state_dict(), UNetLayout.from_config(base.denoiser.config))
    ldm.update(vae_to_ldm(base.vae.state_dict(), base.vae.config))
    ldm.update(open_clip_to_ldm(base.text.encoder.state_dict(), "cond_stage_model.model."))
    path = tmp_path / "sd2.safetensors"
    save_file({k: v.contiguous() for k, v in ldm.items()}, str(path), metadata={"modelspec.prediction_type": "v"})
    loaded = load_model(path, device="cpu", config=folder)
    assert loaded.architecture == "stable-diffusion-v2-768-v" and loaded.objective.prediction_type == "v_prediction"
    plain = tmp_path / "sd2_eps.safetensors"  # no metadata: the given config's scheduler (epsilon) decides
    save_file({k: v.contiguous() for k, v in ldm.items()}, str(plain))
    eps = load_model(plain, device="cpu", config=folder)
    assert (eps.architecture, eps.objective.prediction_type) == ("stable-diffusion-v2-512", "epsilon")
    sa, sb = base.text.encoder.state_dict(), loaded.text.encoder.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_shipped_tokenizers_are_clips():
    tok = clip_tokenizer(CONFIGS / "sd1" / "tokenizer")
    assert len(tok) == 49408 and tok.model_max_length == 77
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    tok_2 = clip_tokenizer(CONFIGS / "sdxl" / "tokenizer_2")  # open_clip pads with "!" (id 0)
    assert tok_2("a cat", padding="max_length", max_length=6).input_ids == [49406, 320, 2368, 49407, 0, 0]


def _meta_model(cls, config):
    with torch.device("meta"):
        return cls.from_config(config) if hasattr(cls, "from_config") else cls(config)


# parameters of the released models' networks (UNet, VAE, text encoder(s)), as counted on their weights
PARAMS = {"sd1": (859_520_964, 83_653_863, [123_060_480]), "sd2": (865_910_724, 83_653_863, [340_387_840]),
          "sdxl": (2_567_463_684, 83_653_863, [123_060_480, 694_659_840])}  # fmt: skip


@pytest.mark.parametrize("family", list(PARAMS))
def test_shipped_configs_and_key_maps_fit_the_real_models(family):
    """On meta tensors: the shipped configs build networks of the released sizes, and our diffusers -> LDM maps
    are inverted exactly by diffusers' own LDM -> diffusers converters."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sfu
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = {p.parent.name: json.loads(p.read_text()) for p in (CONFIGS / family).glob("*/config.json")}
    unet = _meta_model(UNet2DConditionModel, cfg["unet"])
    vae = _meta_model(AutoencoderKL, cfg["vae"])
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert (n(unet), n(vae)) == PARAMS[family][:2]

    ldm = unet_to_ldm(unet.state_dict(), UNetLayout.from_config(cfg["unet"]))
    assert UNetLayout.from_ldm_keys(ldm) == UNetLayout.from_config(cfg["unet"])
    back = sfu.convert_ldm_unet_checkpoint(ldm, cfg["unet"])
    assert {k: v.shape for k, v in back.items()} == {k: v.shape for k, v in unet.state_dict().items()}
    vae_ldm = vae_to_ldm(vae.state_dict(), cfg["vae"])
    back = sfu.convert_ldm_vae_checkpoint(vae_ldm, cfg["vae"])
    assert {k: v.shape for k, v in back.items()} == {k: v.shape for k, v in vae.state_dict().items()}

    attn2 = sorted(k.split(".transformer_blocks")[0] for k in ldm if k.endswith("attn2.to_k.weight"))
    if family == "sd1":
        assert sfu.CHECKPOINT_KEY_NAMES["v1"] in ldm
        want = [f"input_blocks.{i}.1" for i in (1, 2, 4, 5, 7, 8)] + ["middle_block.1"]
        want += [f"output_blocks.{i}.1" for i in range(3, 12)]  # DESIGN.md section 5
        assert attn2 == sorted(UNET_PREFIX + w for w in want)
    if family == "sdxl":
        assert sum(k.endswith("attn2.to_k.weight") for k in ldm) == 70
    for i, sub in enumerate(sorted(k for k in cfg if k.startswith("text_encoder"))):
        te_cls = CLIPTextModelWithProjection if sub == "text_encoder_2" else CLIPTextModel
        te = _meta_model(te_cls, CLIPTextConfig(**cfg[sub]))
        assert n(te) == PARAMS[family][2][i]
    if family == "sd1":
        te_ldm = clip_to_ldm(te.state_dict(), "cond_stage_model.transformer.")
        assert sfu.CHECKPOINT_KEY_NAMES["clip"] in te_ldm
    if family == "sdxl":  # text_encoder_2 through open_clip's fused in_proj and back
        te_ldm = open_clip_to_ldm(te.state_dict(), "conditioner.embedders.1.model.")
        assert sfu.CHECKPOINT_KEY_NAMES["xl_base"] in te_ldm
        back = sfu.convert_open_clip_checkpoint(te, te_ldm, prefix="conditioner.embedders.1.model.")
        assert {k: v.shape for k, v in back.items()} == {k: v.shape for k, v in te.state_dict().items()}


# ---- apply: baking a delta into a checkpoint -------------------------------------------------------------


def make_delta(backend, path: Path, pattern: str = r"attn2\.to_(k|v)$", seed: int = 1) -> Path:
    """A delta over `pattern`'s layers with non-zero up weights, in diffusers module names."""
    lset = LoRASet(backend.lora_targets(pattern), rank=2, alpha=2.0)
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for layer in lset.layers.values():
            layer.up.copy_(torch.randn(layer.up.shape, generator=g) * 0.3)
    meta = {"modelspec.architecture": f"{backend.architecture}/lora", "surgun.concepts": json.dumps(["cat"]),
            "surgun.base_fingerprint": backend.fingerprint()}  # fmt: skip
    return lset.to_delta(backend.lora_prefix, meta).save(path)


def attached_prediction(backend, delta_path: Path, strength: float) -> torch.Tensor:
    """The base model's prediction with the delta attached as LoRA layers (not merged)."""
    modules = backend.attention_linears()
    lset = LoraDelta.load(delta_path, list(modules)).to_lora_set(modules, strength).attach()
    try:
        return predict_fixed(backend)
    finally:
        lset.detach()


def predict_fixed(backend) -> torch.Tensor:
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return backend.predict(x, torch.tensor([400]), backend.encode(["a photo of a cat", "a dog"]))


def test_apply_to_single_file_equals_attached_lora(tiny, tmp_path):
    base, folder, path = tiny["sd1"]
    delta = make_delta(base, tmp_path / "erase_cat.safetensors")
    out = apply_delta_to_checkpoint(path, delta, 0.7, tmp_path / "merged.safetensors")
    merged = load_model(out, device="cpu", config=folder)
    torch.testing.assert_close(predict_fixed(merged), attached_prediction(base, delta, 0.7), atol=1e-4, rtol=0)
    before, after = load_tensors(path), load_tensors(out)
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(UNET_PREFIX) and ".attn2.to_" in k for k in changed)
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    assert (meta["surgun.merged_delta"], meta["surgun.merged_strength"]) == ("erase_cat.safetensors", "0.7")
    assert json.loads(meta["surgun.concepts"]) == ["cat"] and meta["surgun.base_fingerprint"] == base.fingerprint()
    assert meta["modelspec.architecture"] == "stable-diffusion-v1" and len(json.loads(meta["surgun.merged"])) == 1


def test_apply_delta_in_ldm_names_as_comfyui_writes_it(tiny, tmp_path):
    """The ComfyUI/A1111 backends name modules input_blocks.N.1...; the same weights merge the same way."""
    base, _, path = tiny["sd1"]
    delta_path = make_delta(base, tmp_path / "d.safetensors")
    names = apply_mod.backend_linears(base)
    by_module = {id(m): n for n, m in names.items() if not n.startswith(("down_blocks", "up_blocks", "mid_block"))}
    delta = LoraDelta.load(delta_path, list(names))
    ldm_delta = LoraDelta({by_module[id(names[n])]: w for n, w in delta.weights.items()}, metadata=delta.metadata)
    assert all(n.startswith(("input_blocks", "output_blocks", "middle_block")) for n in ldm_delta.weights)
    ldm_path = ldm_delta.save(tmp_path / "ldm.safetensors")
    a = load_tensors(apply_delta_to_checkpoint(path, delta_path, 1.0, tmp_path / "a.safetensors"))
    b = load_tensors(apply_delta_to_checkpoint(path, ldm_path, 1.0, tmp_path / "b.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_apply_from_diffusers_folder_sdxl(tiny, tmp_path):
    base, folder, _ = tiny["sdxl"]
    delta = make_delta(base, tmp_path / "d.safetensors", pattern=r"attn[12]\.to_q$")
    want = attached_prediction(base, delta, -0.5)
    single = apply_delta_to_checkpoint(folder, delta, -0.5, tmp_path / "xl.safetensors")
    assert inspect_checkpoint(single).family == "sdxl"
    got = predict_fixed(load_model(single, device="cpu", config=folder))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    out = apply_delta_to_checkpoint(folder, delta, -0.5, tmp_path / "xl_folder")
    torch.testing.assert_close(predict_fixed(load_diffusers_folder(out, device="cpu")), want, atol=1e-4, rtol=0)
    merged = json.loads((out / "model_index.json").read_text())["_surgun_merged"]
    assert merged["surgun.merged_strength"] == "-0.5" and merged["surgun.base_fingerprint"] == base.fingerprint()


def test_apply_merges_flux_style_file_by_ldm_name(tmp_path):
    """Files outside the SD UNet layout (ComfyUI's Flux/SD3 checkpoints) merge by their own module names."""
    key = UNET_PREFIX + "double_blocks.0.img_attn.qkv.weight"
    w = torch.randn(12, 8).half()
    path = fake_checkpoint(tmp_path / "flux.safetensors", {"vae.decoder.x": (3,)}, fill={key: w})
    down, up = torch.randn(2, 8), torch.randn(12, 2)
    delta = LoraDelta(
        {"double_blocks.0.img_attn.qkv": (down, up, 1.0)}, metadata={"modelspec.architecture": "flux-1-dev/lora"}
    )
    out = apply_delta_to_checkpoint(path, delta.save(tmp_path / "d.safetensors"), 2.0, tmp_path / "o.safetensors")
    got = load_tensors(out)
    assert got[key].dtype == torch.float16 and torch.equal(got["vae.decoder.x"], torch.zeros(3, dtype=torch.float16))
    torch.testing.assert_close(got[key].float(), (w.float() + 2.0 * 0.5 * up @ down).half().float())


def test_apply_refuses_a_delta_of_another_model(tiny, tmp_path):
    xl_delta = make_delta(tiny["sdxl"][0], tmp_path / "xl.safetensors")
    out = tmp_path / "o.safetensors"
    with pytest.raises(DeltaMismatchError, match=r"xl\.safetensors"):
        apply_delta_to_checkpoint(tiny["sd1"][2], xl_delta, 1.0, out)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["xl.safetensors"]


def test_apply_out_rules(tiny, tmp_path):
    base, _, path = tiny["sd1"]
    delta = make_delta(base, tmp_path / "d.safetensors")
    with pytest.raises(ConfigError, match=r"out: .*\.safetensors"):
        apply_delta_to_checkpoint(path, delta, 1.0, tmp_path / "m.ckpt")
    with pytest.raises(ConfigError, match="is the model itself"):
        apply_delta_to_checkpoint(path, delta, 1.0, path)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("")
    with pytest.raises(ConfigError, match="already exists"):
        apply_delta_to_checkpoint(path, delta, 1.0, tmp_path / "taken")


def test_apply_failure_midway_leaves_nothing(tiny, tmp_path, monkeypatch):
    base, folder, path = tiny["sd1"]
    work = tmp_path / "work"
    work.mkdir()
    delta = make_delta(base, tmp_path / "d.safetensors")

    def half_written(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(apply_mod, "save_file", half_written)
    with pytest.raises(OSError, match="disk full"):
        apply_delta_to_checkpoint(path, delta, 1.0, work / "m.safetensors")
    assert list(work.iterdir()) == []

    def folder_half_written(backend, out):
        (Path(out) / "unet").mkdir(parents=True)
        raise OSError("disk full")

    monkeypatch.setattr(apply_mod, "save_diffusers_folder", folder_half_written)
    with pytest.raises(OSError, match="disk full"):
        apply_delta_to_checkpoint(folder, delta, 1.0, work / "merged")
    assert list(work.iterdir()) == []
