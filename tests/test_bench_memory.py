"""bench/memory.py on a tiny UNet: the measured training step is SurgUn's and trains the LoRA only."""

import importlib.util
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "memory.py"
TINY = dict(
    sample_size=8,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(8, 16),
    layers_per_block=1,
    cross_attention_dim=16,
    attention_head_dim=2,
    norm_num_groups=4,
)
TINY_XL = dict(
    TINY,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=4,
    projection_class_embeddings_input_dim=8 + 6 * 4,
)


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_memory", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _grads(bench, config, checkpointing, monkeypatch):
    torch.manual_seed(0)  # same random UNet and LoRA init for both runs
    backend = bench.build_backend(config, torch.device("cpu"), torch.float32)
    calls, real = [], torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(k) or real(*a, **k))
    lset = bench.training_step(backend, bench.make_inputs(backend, "training", 8), checkpointing=checkpointing)
    monkeypatch.undo()
    assert bool(calls) == checkpointing and all(k.get("use_reentrant") is False for k in calls)
    assert not any(p.requires_grad or p.grad is not None for p in backend.denoiser.parameters())
    assert not lset._handles  # detached: the model is left as it was
    return {n: lset.layer(n).up.grad.clone() for n in lset.names}


@pytest.mark.parametrize("config", [TINY, TINY_XL], ids=["sd1", "sdxl"])
def test_training_step_trains_lora_only_and_checkpointing_keeps_grads(bench, config, monkeypatch):
    with_ckpt = _grads(bench, config, True, monkeypatch)
    without = _grads(bench, config, False, monkeypatch)
    assert all(n.endswith(("attn2.to_k", "attn2.to_v")) for n in with_ckpt)
    assert any(g.abs().sum() > 0 for g in with_ckpt.values())
    for n in with_ckpt:
        torch.testing.assert_close(with_ckpt[n], without[n])


def test_inference_step_and_measure(bench):
    backend = bench.build_backend(TINY_XL, torch.device("cpu"), torch.float32)
    out = bench.inference_step(backend, bench.make_inputs(backend, "inference", 8))
    assert out.shape == (1, 4, 8, 8)
    r = bench.measure(TINY, 8, "training")  # in-process here: figures are the test process's, only shapes checked
    assert r["phase"] == "training" and r["peak_mb"] > 0 and r["base_mb"] > 0 and r["step_s"] >= 0
