"""The toy world's model as ComfyUI MODEL, CLIP and VAE objects (DESIGN.md section 3).

The toy model is a diffusers folder: a UNet2DConditionModel in pixel space (3 channels, 16x16) and a tiny
CLIPTextModel with a word-level tokenizer. ComfyUI's own SD1 UNet (openaimodel.UNetModel) cannot hold it:
its GroupNorms have 32 groups hard-coded, the toy's have 8. So the toy UNet itself becomes the
`diffusion_model` of a stock `comfy.model_base.BaseModel`, with a forward that takes ComfyUI's call
(x, timesteps, context=...). Everything around it is ComfyUI's own:
- ModelSamplingDiscrete with the toy's squaredcos_cap_v2 schedule and EPS prediction, so KSampler,
  every sampler and scheduler, CFG and model_sampling nodes work unchanged;
- ModelPatcher, so LoraLoader / LoraLoaderModelOnly patch weights by key: the UNet's parameters sit at
  `diffusion_model.<diffusers module path>`, which is exactly what a kohya key `lora_unet_<path with _>`
  maps to in comfy.lora.model_lora_keys_unet;
- the SD1 text-encoder classes (sd1_clip.SDClipModel / SDTokenizer) with the toy's config and tokenizer,
  so CLIPTextEncode, prompt weights and the conditioning nodes work;
- the pixel-space VAE (comfy.pixel_space_convert, as for Chroma Radiance): LATENT is the image in [-1, 1],
  made by the stock EmptyChromaRadianceLatentImage (16 x 16), decoded by the stock VAEDecode.

Weights are loaded with inference mode off: nodes run under torch.inference_mode(), and parameters created
there are inference tensors that autograd refuses to save, which would make the model untrainable.
"""

from __future__ import annotations

import functools
import json
from typing import ClassVar

import comfy.latent_formats
import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.sd
import comfy.sd1_clip
import comfy.supported_models_base
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file

from ..surgun_core.toyworld.paths import ARCHITECTURE, MODEL_DIR
from ..surgun_core.toyworld.tokenizer import MAX_LENGTH

CLIP_VOCAB = 49408  # comfy.clip_model.CLIPEmbeddings always builds the full CLIP vocabulary


class ToyDiffusionModel(UNet2DConditionModel):
    """The toy UNet, called the way comfy.model_base.BaseModel calls its diffusion_model."""

    def forward(self, x, timesteps=None, context=None, control=None, transformer_options=None, **kwargs):
        return super().forward(x, timesteps, encoder_hidden_states=context, return_dict=False)[0]


class ToyWorldConfig(comfy.supported_models_base.BASE):
    """Model config for ComfyUI: pixel-space latents (3 channels, identity scaling), the toy's schedule."""

    unet_config: ClassVar[dict] = {"disable_unet_model_creation": True}
    latent_format = comfy.latent_formats.ChromaRadiance
    memory_usage_factor = 1.0
    supported_inference_dtypes: ClassVar[list] = [torch.float32]

    def __init__(self, scheduler_config: dict) -> None:
        super().__init__(dict(self.unet_config))
        self.sampling_settings = {"timesteps": scheduler_config.get("num_train_timesteps", 1000)}


def _set_schedule(base, scheduler_config: dict) -> None:
    """The toy's exact betas, from diffusers' own scheduler. (ComfyUI 0.8's make_beta_schedule returns a
    numpy array for squaredcos_cap_v2, which ModelSamplingDiscrete then fails on, so it is not asked.)"""
    from diffusers import DDPMScheduler

    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas")
    betas = DDPMScheduler(**{k: scheduler_config[k] for k in keys if k in scheduler_config}).betas
    base.model_sampling._register_schedule(given_betas=betas.double())


def _model_type(scheduler_config: dict):
    ptype = scheduler_config.get("prediction_type", "epsilon")
    types = {"epsilon": comfy.model_base.ModelType.EPS, "v_prediction": comfy.model_base.ModelType.V_PREDICTION}
    if ptype not in types:
        raise ValueError(f"toy model: prediction_type {ptype!r} is not supported; expected one of {list(types)}")
    return types[ptype]


def load_toy_model() -> comfy.model_patcher.ModelPatcher:
    """The toy UNet inside a stock BaseModel and ModelPatcher."""
    sched = json.loads((MODEL_DIR / "scheduler" / "scheduler_config.json").read_text())
    config = ToyWorldConfig(sched)
    load_device = comfy.model_management.get_torch_device()
    with torch.inference_mode(False):
        base = comfy.model_base.BaseModel(config, model_type=_model_type(sched), device=load_device)
        unet = ToyDiffusionModel.from_pretrained(str(MODEL_DIR), subfolder="unet").requires_grad_(False).eval()
        base.diffusion_model = unet
        _set_schedule(base, sched)
    base.surgun_architecture = ARCHITECTURE  # read by the SurgUn Train node for the delta's metadata
    base.surgun_image_size = unet.config.sample_size  # pixels; read by the Train node to size training images
    return comfy.model_patcher.ModelPatcher(
        base, load_device=load_device, offload_device=comfy.model_management.unet_offload_device()
    )


def _text_config() -> dict:
    return json.loads((MODEL_DIR / "text_encoder" / "config.json").read_text())


class ToyClipModel(comfy.sd1_clip.SDClipModel):
    """SD1's text-encoder class with the toy's size, special tokens and context length."""

    def __init__(self, device="cpu", dtype=None, model_options=None, **kwargs):
        cfg = _text_config()
        tokens = {"start": cfg["bos_token_id"], "end": cfg["eos_token_id"], "pad": cfg["pad_token_id"]}
        super().__init__(device=device, dtype=dtype, max_length=MAX_LENGTH, layer="last", textmodel_json_config=cfg,
                         special_tokens=tokens, return_projected_pooled=False,
                         model_options=model_options or {})  # fmt: skip


def _tokenizer(embedding_directory=None, tokenizer_data=None):
    sd_tok = functools.partial(comfy.sd1_clip.SDTokenizer, tokenizer_path=str(MODEL_DIR / "tokenizer"),
                               max_length=MAX_LENGTH, embedding_size=_text_config()["hidden_size"])  # fmt: skip
    return comfy.sd1_clip.SD1Tokenizer(embedding_directory=embedding_directory, tokenizer_data=tokenizer_data or {},
                                       tokenizer=sd_tok)  # fmt: skip


def load_toy_clip() -> comfy.sd.CLIP:
    """The toy text encoder as a stock comfy.sd.CLIP (SD1 classes, the toy's config and tokenizer)."""
    with torch.inference_mode(False):
        sd = load_file(str(MODEL_DIR / "text_encoder" / "model.safetensors"))
        # transformers >= 5 writes CLIPTextModel keys without the "text_model." prefix ComfyUI expects
        sd = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in sd.items()}
        key = "text_model.embeddings.token_embedding.weight"
        emb = sd[key]  # (vocab, dim): pad to CLIP's vocabulary size; the extra rows are never looked up
        sd[key] = torch.cat([emb, emb.new_zeros(CLIP_VOCAB - len(emb), emb.shape[1])])
    clip_model = functools.partial(comfy.sd1_clip.SD1ClipModel, clip_model=ToyClipModel)
    target = comfy.supported_models_base.ClipTarget(_tokenizer, clip_model)
    params = sum(v.numel() for v in sd.values())
    return comfy.sd.CLIP(target, state_dict=[sd], parameters=params,
                         model_options={"dtype": torch.float32})  # fmt: skip


def load_toy_vae() -> comfy.sd.VAE:
    """ComfyUI's pixel-space VAE: LATENT is the image itself, scaled to [-1, 1]."""
    return comfy.sd.VAE(sd={"pixel_space_vae": torch.tensor(1.0)})
