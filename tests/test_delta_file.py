"""The delta file (DESIGN.md section 4): kohya keys, metadata, round trip, bad inputs, and diffusers reading it."""

from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import surgun_core.lora as lora_mod
from surgun_core.errors import ConfigError, DeltaFormatError, DeltaMismatchError
from surgun_core.lora import LoraDelta, LoRASet, kohya_key, read_safetensors


class TinyA(nn.Module):
    """Module names shaped like a UNet's attention layers (dots, digits, underscores, to_out.0)."""

    def __init__(self, width: int = 6, ctx: int = 5) -> None:
        super().__init__()
        self.down_blocks = nn.ModuleList([nn.ModuleDict({"attn2": nn.ModuleDict({})})])
        attn = self.down_blocks[0]["attn2"]
        attn["to_q"] = nn.Linear(width, 4, bias=False)
        attn["to_k"] = nn.Linear(ctx, 4, bias=False)
        attn["to_out"] = nn.Sequential(nn.Linear(4, width))


class TinyB(nn.Module):
    """Another architecture: different module names."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(6, 4), nn.Linear(4, 6)])


def linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def random_delta(model: nn.Module, metadata=None, rank: int = 2, alpha: float = 1.0, seed: int = 0) -> LoraDelta:
    torch.manual_seed(seed)
    lset = LoRASet(linears(model), rank=rank, alpha=alpha)
    with torch.no_grad():
        for lay in lset.layers.values():
            lay.up.normal_()
    return lset.to_delta("lora_unet", metadata)


META = {
    "modelspec.architecture": "tiny-a",
    "modelspec.title": "erase circle",
    "surgun.concepts": ["circle"],
    "surgun.step": 120,
    "surgun.curve": {"steps": [40, 80], "erase": [0.5, 0.9]},
    "surgun.strength_hint": 0.5,
}


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ---- key format and round trip ------------------------------------------------------------------------------


def test_kohya_key():
    name = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    assert kohya_key("lora_unet", name) == "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
    assert kohya_key("lora_unet", "mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0") == (
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0"
    )


def test_file_holds_exactly_the_kohya_tensors(tmp_path):
    delta = random_delta(TinyA(), META, rank=2, alpha=1.0)
    path = delta.save(tmp_path / "d.safetensors")
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        alpha = f.get_tensor("lora_unet_down_blocks_0_attn2_to_out_0.alpha")
        down = f.get_tensor("lora_unet_down_blocks_0_attn2_to_k.lora_down.weight")
        up = f.get_tensor("lora_unet_down_blocks_0_attn2_to_k.lora_up.weight")
    stems = ["down_blocks_0_attn2_to_q", "down_blocks_0_attn2_to_k", "down_blocks_0_attn2_to_out_0"]
    assert keys == {f"lora_unet_{s}{suf}" for s in stems for suf in (".lora_down.weight", ".lora_up.weight", ".alpha")}
    assert alpha.shape == () and alpha.item() == 1.0  # a scalar, as kohya writes it
    assert down.shape == (2, 5) and up.shape == (4, 2)  # down (rank, in), up (out, rank)
    assert files_in(tmp_path) == ["d.safetensors"]  # no temp file left behind


def test_save_load_round_trip(tmp_path):
    model = TinyA()
    delta = random_delta(model, META, rank=3, alpha=1.5)
    path = delta.save(tmp_path / "sub" / "erase.safetensors")
    assert path == tmp_path / "sub" / "erase.safetensors"
    back = LoraDelta.load(path, list(linears(model)))
    assert back.prefix == "lora_unet"
    assert set(back.weights) == set(delta.weights) == set(linears(model))
    for name, (down, up, alpha) in delta.weights.items():
        d2, u2, a2 = back.weights[name]
        assert torch.equal(d2, down) and torch.equal(u2, up)
        assert a2 == alpha == 1.5
    # Strings stay as they are; everything else is JSON-encoded and decodes to the value saved.
    assert set(back.metadata) == set(META)
    assert all(isinstance(v, str) for v in back.metadata.values())
    assert back.metadata["modelspec.architecture"] == "tiny-a"
    assert back.metadata["modelspec.title"] == "erase circle"
    for k in ("surgun.concepts", "surgun.step", "surgun.curve", "surgun.strength_hint"):
        assert json.loads(back.metadata[k]) == META[k]
    _, raw_meta = read_safetensors(path)
    assert raw_meta == back.metadata


def test_missing_alpha_means_alpha_equals_rank(tmp_path):
    """kohya convention: no .alpha tensor -> alpha = rank (scale 1)."""
    model = TinyA()
    sd = random_delta(model, rank=3, alpha=1.5).state_dict()
    sd = {k: v for k, v in sd.items() if not k.endswith(".alpha")}
    save_file(sd, str(tmp_path / "noalpha.safetensors"))
    back = LoraDelta.load(tmp_path / "noalpha.safetensors", list(linears(model)))
    assert all(alpha == 3.0 for _, _, alpha in back.weights.values())


def test_valid_file_whose_header_length_starts_with_0x80_is_not_called_a_pickle(tmp_path):
    """Regression: read_safetensors once sniffed byte 0 == 0x80 as a pickle, but byte 0 is the low byte of the
    header length, which is 0x80 for one valid file in 32 (headers are padded to 8 bytes)."""
    model = TinyA()
    delta = random_delta(model, META)
    path = tmp_path / "d.safetensors"
    for n in range(512):  # 8 more characters add 8 to the padded header length
        delta.metadata = {**META, "pad": "x" * n}
        delta.save(path)
        if path.read_bytes()[0] == 0x80:
            break
    else:
        pytest.fail("no padding gave a header length with low byte 0x80")
    back = LoraDelta.load(path, list(linears(model)))
    assert back.metadata["pad"] == "x" * n


# ---- bad inputs ---------------------------------------------------------------------------------------------


def test_truncated_file(tmp_path):
    model = TinyA()
    path = random_delta(model, META).save(tmp_path / "cut.safetensors")
    data = path.read_bytes()
    for size in (len(data) // 2, len(data) - 4, 5):  # half; only the last tensor bytes; inside the header size
        path.write_bytes(data[:size])
        with pytest.raises(DeltaFormatError, match=r"cut\.safetensors.*truncated.*copy or download it again"):
            LoraDelta.load(path, list(linears(model)))


class _Marker:
    """Unpickling this creates a folder: proves that a pickle is never unpickled."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def __reduce__(self):
        return (os.mkdir, (str(self.folder),))


@pytest.mark.parametrize("zip_format", [True, False], ids=["torch-zip", "legacy-pickle"])
@pytest.mark.parametrize("name", ["delta.pt", "delta.safetensors"])
def test_pickle_is_refused_without_being_loaded(tmp_path, name, zip_format):
    model = TinyA()
    sd = random_delta(model).state_dict()
    marker = tmp_path / "unpickled"
    path = tmp_path / name
    torch.save({**sd, "x": _Marker(marker)}, path, _use_new_zipfile_serialization=zip_format)
    with pytest.raises(DeltaFormatError, match=rf"{re.escape(name)}: is a pickle.*only loads \.safetensors"):
        LoraDelta.load(path, list(linears(model)))
    assert not marker.exists()
    # The marker really fires when unpickled, so the assertion above means something.
    with path.open("rb") as f:
        if zip_format:
            torch.load(f, weights_only=False)
        else:
            torch.load(f, weights_only=False, pickle_module=pickle)
    assert marker.exists()


def test_missing_file(tmp_path):
    with pytest.raises(DeltaFormatError, match=r"nope\.safetensors: no such file; give the path"):
        LoraDelta.load(tmp_path / "nope.safetensors", ["a"])
    assert files_in(tmp_path) == []


def test_keys_of_another_architecture(tmp_path):
    path = random_delta(TinyA(), META).save(tmp_path / "for_a.safetensors")
    with pytest.raises(DeltaMismatchError, match=r"for_a\.safetensors.*architecture 'tiny-a'.*model it was trained on"):
        LoraDelta.load(path, list(linears(TinyB())))


def test_same_names_other_shapes(tmp_path):
    path = random_delta(TinyA(width=6), META).save(tmp_path / "w6.safetensors")
    wide = TinyA(width=8)
    mods = linears(wide)
    before = {k: v.clone() for k, v in wide.state_dict().items()}
    delta = LoraDelta.load(path, list(mods))  # names match, so it loads ...
    for apply in (lambda: delta.to_lora_set(mods), lambda: delta.merge_into(mods)):
        with pytest.raises(
            DeltaMismatchError,
            match=r"w6\.safetensors: .*expects a Linear (6->4|4->6) but the model has (8->4|4->8).*tiny-a",
        ):
            apply()  # ... but applying it is refused
    assert all(torch.equal(v, before[k]) for k, v in wide.state_dict().items())  # nothing merged
    assert all(not m._forward_hooks for m in mods.values())


def test_module_missing_from_the_given_modules():
    delta = random_delta(TinyA(), META)
    mods = linears(TinyA())
    mods.pop("down_blocks.0.attn2.to_q")
    with pytest.raises(DeltaMismatchError, match=r"no module 'down_blocks\.0\.attn2\.to_q'.*tiny-a"):
        delta.merge_into(mods)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda sd: {**sd, "model.diffusion_model.out.weight": torch.zeros(2)}, r"is not a LoRA key.*kohya"),
        (lambda sd: {k: v for k, v in sd.items() if "to_q.lora_up" not in k}, r"lacks its lora_down or lora_up"),
        (lambda sd: {"x" + k: v for k, v in sd.items()}, r"lacks a kohya 'lora_<part>_' prefix"),
        (lambda sd: {**sd, "lora_te_foo.lora_down.weight": torch.zeros(1, 2)}, r"share one 'lora_<part>_' prefix"),
        (
            lambda sd: {**sd, "lora_unet_down_blocks_0_attn2_to_q.lora_up.weight": torch.zeros(4, 7)},
            r"inconsistent shapes",
        ),
    ],
    ids=["non-lora-key", "missing-up", "no-prefix", "two-prefixes", "rank-mismatch"],
)
def test_malformed_lora_tensors(tmp_path, edit, message):
    model = TinyA()
    path = tmp_path / "bad.safetensors"
    save_file(edit(random_delta(model).state_dict()), str(path))
    with pytest.raises(DeltaFormatError, match=rf"bad\.safetensors: .*{message}"):
        LoraDelta.load(path, list(linears(model)))


@pytest.mark.parametrize("name", ["delta.pt", "delta.ckpt", "delta", "delta.safetensors.tmp"])
def test_save_needs_a_safetensors_name(tmp_path, name):
    target = tmp_path / "out" / name
    with pytest.raises(ConfigError, match=r"end in \.safetensors") as info:
        random_delta(TinyA()).save(target)
    assert info.value.field == "out"
    assert name in str(info.value)
    assert files_in(tmp_path) == []  # not even the folder


def test_failed_save_leaves_no_file(tmp_path, monkeypatch):
    # A mock is justified here: a real mid-write failure (full disk, killed process) cannot be produced
    # portably in a test, and the property under test is lora.py's cleanup, not safetensors itself.
    def failing_save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\x00" * 64)  # the temp file exists, half written
        raise OSError(28, "No space left on device")

    delta = random_delta(TinyA(), META)
    monkeypatch.setattr(lora_mod, "save_file", failing_save_file)
    with pytest.raises(OSError, match="No space left"):
        delta.save(tmp_path / "d.safetensors")
    assert files_in(tmp_path) == []

    # Over an earlier delta, a failed save keeps the earlier file intact.
    monkeypatch.undo()
    path = random_delta(TinyA(), META, seed=1).save(tmp_path / "d.safetensors")
    old = path.read_bytes()
    monkeypatch.setattr(lora_mod, "save_file", failing_save_file)
    with pytest.raises(OSError):
        delta.save(path)
    assert files_in(tmp_path) == ["d.safetensors"] and path.read_bytes() == old


# ---- diffusers reads our file -------------------------------------------------------------------------------

ATTN2 = r"attn2\.(to_q|to_k|to_v|to_out\.0)$"


def tiny_pipeline(folder: Path):
    """A StableDiffusionPipeline of ~40k parameters, built from configs (nothing downloaded)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from surgun_core.toyworld.tokenizer import build_tokenizer_files

    torch.manual_seed(0)
    build_tokenizer_files(["a", "photo", "of", "cat", "dog"], folder / "tokenizer")
    tok = CLIPTokenizer.from_pretrained(str(folder / "tokenizer"))
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            max_position_embeddings=16, projection_dim=16, eos_token_id=tok.eos_token_id,
            bos_token_id=tok.bos_token_id, pad_token_id=tok.eos_token_id,
        )
    )  # fmt: skip
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 8), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=4,
    )  # fmt: skip
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,), latent_channels=4, norm_num_groups=4,
        sample_size=8, layers_per_block=1,
    )  # fmt: skip
    sched = DDIMScheduler(num_train_timesteps=1000, steps_offset=1, clip_sample=False)
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=sched, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip


def test_diffusers_load_lora_weights_reads_our_file(tmp_path):
    pytest.importorskip("peft", reason="diffusers needs peft for load_lora_weights")
    pipe = tiny_pipeline(tmp_path)
    unet = pipe.unet
    targets = {n: m for n, m in unet.named_modules() if re.search(ATTN2, n)}
    assert len(targets) == 16 and any(n.startswith("mid_block.") for n in targets)
    lset = LoRASet(targets, rank=2, alpha=1.0)  # alpha != rank: the file's alpha must be honoured
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for lay in lset.layers.values():
            lay.up.copy_(0.5 * torch.randn(lay.up.shape, generator=g))
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([500, 20])
    ctx = torch.randn(2, 5, 16, generator=g)  # (B, tokens, cross_attention_dim)

    def run() -> torch.Tensor:
        with torch.no_grad():
            return unet(x, t, encoder_hidden_states=ctx).sample

    def run_pipe() -> torch.Tensor:
        gen = torch.Generator().manual_seed(0)
        out = pipe("a photo of cat", height=8, width=8, num_inference_steps=2, guidance_scale=2.0,
                   generator=gen, output_type="latent")  # fmt: skip
        return out.images

    base, base_pipe = run(), run_pipe()
    lset.attach()
    ours, ours_half = run(), None
    ours_pipe = run_pipe()
    lset.strength = 0.5
    ours_half = run()
    lset.detach()
    assert torch.equal(run(), base)
    assert (ours - base).abs().max() > 1e-2

    path = lset.to_delta("lora_unet", META).save(tmp_path / "erase.safetensors")
    pipe.load_lora_weights(str(path))  # stock diffusers: kohya converter + peft

    # Every one of our modules got a diffusers/peft LoRA layer, and nothing else did.
    peft_wrapped = {n.removesuffix(".lora_A") for n, _ in unet.named_modules() if n.endswith(".lora_A")}
    assert peft_wrapped == set(targets)
    theirs = run()
    assert (theirs - base).abs().max() > 1e-2  # (a) it changes the UNet output
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)  # (b) exactly as our hooks do
    torch.testing.assert_close(run_pipe(), ours_pipe, atol=1e-4, rtol=1e-4)  # and so the whole pipeline
    assert not torch.allclose(ours_pipe, base_pipe, atol=1e-4)

    # Partial strength means the same thing in diffusers (adapter weight) as in SurgUn.
    (adapter,) = pipe.get_list_adapters()["unet"]
    pipe.set_adapters([adapter], adapter_weights=[0.5])
    torch.testing.assert_close(run(), ours_half, atol=1e-4, rtol=1e-4)
    pipe.unload_lora_weights()
    torch.testing.assert_close(run(), base)
