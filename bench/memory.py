"""Peak memory of ONE SurgUn LoRA training step against ONE inference step, on full-size UNets.

SD1.5- and SDXL-sized UNet2DConditionModels are built from their configs with random weights (nothing is
downloaded); text conditioning is random tensors of the right shape, so no text encoder is loaded.

  inference  one UNet forward under no_grad with classifier-free guidance: batch 2 (cond + uncond), 1 image
  training   one step of surgun_core.surgun.erase at batch 1: LoRA (rank 4) on attn2.to_k/to_v, base frozen,
             surgun.surgun_backward (the loop's own step: forwards for L_T and L_D, their backward, then the
             retain term's forward, LoRA on and off, and its backward), clip, AdamW step; gradient
             checkpointing (non-reentrant) on the UNet

Each measurement runs in a fresh subprocess. CUDA: torch.cuda.max_memory_allocated. CPU: peak resident set
(ru_maxrss); "+" figures are the increment over the resident set right after building the model and inputs.
glibc keeps freed heap memory, which inflates CPU peaks (about 2x on the training step); run with
MALLOC_MMAP_THRESHOLD_=131072 (children inherit it) to see the live peak instead.

    OMP_NUM_THREADS=1 python bench/memory.py [--models sd15,sdxl] [--sizes 64,128]
        [--dtype auto|float32|bfloat16|float16] [--device auto|cpu|cuda] [--json FILE]
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import resource
import subprocess
import sys
import time

import torch

from surgun_core.backends.base import resolve_device, resolve_dtype
from surgun_core.backends.diffusers import DiffusersBackend
from surgun_core.backends.text import TextEncoderAdapter
from surgun_core.config import EraseConfig
from surgun_core.engine.train import StepBatch, surgun_backward
from surgun_core.lora import LoRASet

log = logging.getLogger("bench.memory")

# As the unets of runwayml/stable-diffusion-v1-5 (859.5M parameters) and stabilityai/stable-diffusion-xl-base-1.0
# (2567.5M). attention_head_dim is a diffusers quirk: for SD1.5 it is the number of heads.
SD15 = dict(sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=768, attention_head_dim=8)  # fmt: skip
SDXL = dict(sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816)  # fmt: skip  # 1280 pooled text + 6 time ids x 256
MODELS = {"sd15": SD15, "sdxl": SDXL}
DEFAULT_RUNS = [("sd15", 64), ("sdxl", 128)]
SCHEDULER = {"_class_name": "DDPMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
             "beta_end": 0.012, "prediction_type": "epsilon", "num_train_timesteps": 1000}  # fmt: skip
TOKENS = 77
PATTERN = r"attn2\.(to_k|to_v)$"  # cross-attention keys and values (the "cross-attn-kv" preset)


def build_backend(unet_config: dict, device: torch.device, dtype: torch.dtype) -> DiffusersBackend:
    """A DiffusersBackend around a random-weight UNet, built directly in `dtype` on `device` (no transient copy)."""
    from diffusers import UNet2DConditionModel

    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            unet = UNet2DConditionModel(**unet_config)
    finally:
        torch.set_default_dtype(prev)
    precision = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype]
    # No text side: the bench feeds random conditioning; a bare adapter passes the backend's text checks.
    backend = DiffusersBackend(unet, TextEncoderAdapter(), SCHEDULER, device=device, precision=precision)
    # backend.loss moves t to the latents' device and indexes alphas_cumprod (kept on CPU) with it
    backend.objective.alphas_cumprod = backend.objective.alphas_cumprod.to(device)
    return backend


def random_cond(backend: DiffusersBackend, batch: int, size: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Conditioning of the shapes the text encoders give: (B, 77, cross_dim); SDXL adds (B, 1280) and (B, 6)."""
    cfg = backend.denoiser.config
    kw = dict(device=backend.device, dtype=backend.dtype)
    cond = {"encoder_hidden_states": torch.randn(batch, TOKENS, cfg.cross_attention_dim, generator=g).to(**kw)}
    if backend.family == "sdxl":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        cond["text_embeds"] = torch.randn(batch, pooled, generator=g).to(**kw)
        px = 8 * size
        cond["time_ids"] = torch.tensor([px, px, 0, 0, px, px], **kw).expand(batch, 6).clone()
    return cond


def make_inputs(backend: DiffusersBackend, phase: str, size: int, seed: int = 0) -> dict:
    """Inputs of one step: CFG latents and cond for inference; target, distractor, retain latents for training."""
    g = torch.Generator().manual_seed(seed)
    C = backend.denoiser.config.in_channels
    x = torch.randn(3, C, size, size, generator=g).to(backend.device, backend.dtype)  # (3, C, size, size)
    if phase == "inference":  # classifier-free guidance: one image, cond + uncond in a batch of 2
        return {"x_t": torch.cat([x[:1]] * 2), "cond": random_cond(backend, 2, size, g)}
    return {"x_T": x[0:1], "x_D": x[1:2], "x_R": x[2:3], "c_T": random_cond(backend, 1, size, g),
            "c_R": random_cond(backend, 1, size, g), "g": g}  # fmt: skip


@torch.no_grad()
def inference_step(backend: DiffusersBackend, inputs: dict) -> torch.Tensor:
    t = torch.tensor([500], device=backend.device)
    eps = backend.predict(inputs["x_t"], t, inputs["cond"])
    uncond, cond = eps.chunk(2)
    return uncond + 7.5 * (cond - uncond)


def training_step(backend: DiffusersBackend, inputs: dict, checkpointing: bool = True) -> LoRASet:
    """One iteration of surgun.erase's loop at batch 1. Returns the LoRA (detached) with its gradients."""
    cfg = EraseConfig(concepts=["target"], batch_size=1, blocks=PATTERN)
    unet = backend.denoiser
    if checkpointing:
        unet.enable_gradient_checkpointing()  # diffusers' default is torch checkpoint(use_reentrant=False)
        if not any(getattr(m, "gradient_checkpointing", False) for m in unet.modules()):
            raise RuntimeError("enable_gradient_checkpointing() switched no block to checkpointing")
    else:
        unet.disable_gradient_checkpointing()
    unet.train()  # older diffusers checkpointed only in training mode; these UNets have no dropout
    if any(p.requires_grad for p in unet.parameters()):
        raise RuntimeError("the base UNet must be frozen")
    lset = LoRASet(backend.lora_targets(PATTERN), cfg.rank, cfg.alpha).attach()
    params = list(lset.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    g = inputs["g"]
    try:
        # the forwards and the two-part backward of surgun.erase's loop: target and distractor images under the
        # target prompt, then the retain anchor
        t = backend.objective.sample_t(1, g)
        x_T, x_D, x_R = inputs["x_T"], inputs["x_D"], inputs["x_R"]
        batch = StepBatch(x_T, inputs["c_T"], t, torch.randn(x_T.shape, generator=g).to(x_T), x_D,
                          torch.randn(x_D.shape, generator=g).to(x_D), x_R, inputs["c_R"],
                          torch.randn(x_R.shape, generator=g).to(x_R))  # fmt: skip
        opt.zero_grad(set_to_none=True)
        surgun_backward(backend, cfg, lset, batch)
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        # gradients are checked before the step: a zero LoRA gradient means checkpointing cut the graph
        ups = [lset.layer(n).up.grad for n in lset.names]
        if any(u is None for u in ups) or not any(bool((u != 0).any()) for u in ups):
            raise RuntimeError("the LoRA got no gradient (checkpointing without a grad path?)")
        if not all(bool(u.isfinite().all()) for u in ups):
            log.warning("non-finite LoRA gradients (random weights in %s?)", backend.dtype)
        if any(p.grad is not None for p in unet.parameters()):
            raise RuntimeError("a frozen base parameter received a gradient")
        opt.step()
    finally:
        lset.detach()
        unet.eval()
    return lset


def _rss_mb() -> float:  # current resident set (Linux /proc; elsewhere the peak stands in)
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / 2**20
    except OSError:
        return _maxrss_mb()


def _maxrss_mb() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2**20 if sys.platform == "darwin" else r / 1024  # bytes on macOS, KiB on Linux


def measure(unet_config: dict, size: int, phase: str, device: str = "cpu", precision: str = "float32") -> dict:
    """Build the model and inputs, run one `phase` step, return its peak memory (MB) and times (s)."""
    dev = resolve_device(device)
    dtype = resolve_dtype(precision, dev)
    t0 = time.time()
    backend = build_backend(unet_config, dev, dtype)
    inputs = make_inputs(backend, phase, size)
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base, build_peak = torch.cuda.memory_allocated(dev) / 2**20, 0.0
    else:
        base, build_peak = _rss_mb(), _maxrss_mb()
    t1 = time.time()
    (inference_step if phase == "inference" else training_step)(backend, inputs)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev) / 2**20
    else:
        peak = _maxrss_mb()
    out = {"phase": phase, "base_mb": base, "peak_mb": peak, "incr_mb": peak - base,
           "build_s": t1 - t0, "step_s": time.time() - t1}  # fmt: skip
    if dev.type == "cpu" and peak <= build_peak:  # ru_maxrss never falls: the build's own peak would hide ours
        out["note"] = f"step peak not above the build's peak ({build_peak:.0f} MB): figure is an upper bound"
    return out


def run_child(model: str, size: int, phase: str, device: str, precision: str) -> dict:
    """measure() in a fresh interpreter, so the peak resident set belongs to this one step."""
    spec = json.dumps({"model": model, "size": size, "phase": phase, "device": device, "precision": precision})
    proc = subprocess.run([sys.executable, __file__, "--child", spec], capture_output=True, text=True)
    if proc.returncode != 0:  # negative: killed by that signal (-9: most often the out-of-memory killer)
        raise RuntimeError(f"{model} {size} {phase} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _cells(r: dict) -> tuple:
    peaks = [f"{r[p]['peak_mb']:.0f} (+{r[p]['incr_mb']:.0f})" for p in ("inference", "training")]
    return (r["model"], f"{r['latent']}x{r['latent']}", r["dtype"], r["device"], *peaks,
            f"{r['ratio_abs']:.2f}", f"{r['ratio_incr']:.2f}")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", help=f"comma list of {', '.join(MODELS)} (default: sd15 at 64, sdxl at 128)")
    ap.add_argument("--sizes", help="comma list of latent sides, each run for every model (default: see --models)")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                    help="auto: float16 on CUDA, float32 on CPU")  # fmt: skip
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        s = json.loads(a.child)
        print(json.dumps(measure(MODELS[s["model"]], s["size"], s["phase"], s["device"], s["precision"])))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    models = a.models.split(",") if a.models else None
    unknown = [m for m in models or [] if m not in MODELS]
    if unknown:
        ap.error(f"unknown model {unknown[0]!r}; choose from {', '.join(MODELS)}")
    if models or a.sizes:
        sizes = [int(s) for s in a.sizes.split(",")] if a.sizes else None
        runs = [(m, sz) for m in models or list(MODELS) for sz in sizes or [MODELS[m]["sample_size"]]]
    else:
        runs = DEFAULT_RUNS
    dev = resolve_device(a.device)
    precision = a.dtype if a.dtype != "auto" else ("float16" if dev.type == "cuda" else "float32")
    resolve_dtype(precision, dev)  # refuse float16 on CPU here, not in every child
    rows = []
    for model, size in runs:
        row = {"model": model, "latent": size, "dtype": precision, "device": str(dev)}
        for phase in ("inference", "training"):
            log.info("%s %dx%d %s on %s: %s step ...", model, size, size, precision, dev, phase)
            try:
                row[phase] = r = run_child(model, size, phase, str(dev), precision)
            except RuntimeError as e:  # out of memory (killed), say: keep the other figures
                log.error("  %s", e)
                row[phase] = {"error": str(e)[-500:], "peak_mb": float("nan"), "incr_mb": float("nan")}
                continue
            log.info("  peak %.0f MB (+%.0f MB), build %.0f s, step %.0f s", r["peak_mb"], r["incr_mb"],
                     r["build_s"], r["step_s"])  # fmt: skip
            if "note" in r:
                log.warning("  %s", r["note"])
        row["ratio_abs"] = row["training"]["peak_mb"] / row["inference"]["peak_mb"]
        row["ratio_incr"] = row["training"]["incr_mb"] / max(row["inference"]["incr_mb"], 1e-9)
        rows.append(row)
    meter = "torch.cuda.max_memory_allocated" if dev.type == "cuda" else "peak RSS (ru_maxrss), fresh process each"
    print(f"\nPeak memory, MB: absolute (+ increment over model and inputs). Meter: {meter}.")
    print("ratio = training / inference, of the absolute peaks and of the increments.\n")
    head = ("model", "latent", "dtype", "device", "inference peak", "training peak", "ratio abs", "ratio incr")
    for r in [head] + [_cells(r) for r in rows]:
        print("{:6} {:>7} {:9} {:7} {:>17} {:>17} {:>9} {:>10}".format(*r))
    if a.json:
        meta = {"meter": meter, "torch": torch.__version__, "threads": torch.get_num_threads()}
        with open(a.json, "w") as f:
            json.dump({"meta": meta, "runs": rows}, f, indent=2)
    if any("error" in r[p] for r in rows for p in ("inference", "training")):
        sys.exit(1)


if __name__ == "__main__":
    main()
