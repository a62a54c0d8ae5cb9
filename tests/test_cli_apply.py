"""`surgun apply`: a delta baked into a tiny single-file SD1.x checkpoint from the command line."""

import torch

from surgun_core.backends.diffusers import save_diffusers_folder
from surgun_core.backends.single_file import load_model, save_single_file
from surgun_core.cli import main
from surgun_core.lora import LoraDelta, LoRASet
from surgun_core.testing import tiny_sd1_backend


def _prediction(backend):
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return backend.predict(x, torch.tensor([400]), backend.encode(["a photo of a cat"]))


def test_apply_bakes_the_delta_into_a_single_file(tmp_path, capsys):
    base = tiny_sd1_backend()
    folder = save_diffusers_folder(base, tmp_path / "config")  # the tiny model's configs (not SD1.5's sizes)
    ckpt = save_single_file(base, tmp_path / "tiny-sd1.safetensors")
    lset = LoRASet(base.lora_targets(r"attn2\.to_(k|v)$"), rank=2, alpha=2.0)
    with torch.no_grad():
        for layer in lset.layers.values():
            layer.up.normal_(std=0.3, generator=torch.Generator().manual_seed(1))
    delta = lset.to_delta(base.lora_prefix, {"modelspec.architecture": f"{base.architecture}/lora"})
    delta_path = delta.save(tmp_path / "erase.safetensors")
    out = tmp_path / "merged.safetensors"
    rc = main(["apply", "--model", str(ckpt), "--model-config", str(folder), "--delta", str(delta_path),
               "--strength", "0.5", "--out", str(out)])  # fmt: skip
    assert rc == 0 and f"wrote {out}" in capsys.readouterr().out
    modules = base.attention_linears()
    attached = LoraDelta.load(delta_path, list(modules)).to_lora_set(modules, 0.5).attach()
    want = _prediction(base)
    attached.detach()
    torch.testing.assert_close(_prediction(load_model(out, device="cpu", config=folder)), want, atol=1e-4, rtol=0)


def test_apply_needs_an_existing_delta(tmp_path, capsys):
    rc = main(["apply", "--model", "toy", "--delta", str(tmp_path / "none.safetensors"), "--out", str(tmp_path / "o")])
    assert rc == 2 and "delta" in capsys.readouterr().err and not (tmp_path / "o").exists()
