"""Text encoders per model family: prompts -> the conditioning dict the denoiser takes.

SD1.x: CLIP last hidden state. SDXL: two CLIP encoders' penultimate states, concatenated, plus the
second encoder's pooled projection. SANA: a decoder LM's last hidden state with its attention mask.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


class TextEncoderAdapter(nn.Module):
    """Holds tokenizer(s) and encoder(s); encode(prompts) returns a Cond dict (batch first)."""

    def encode(self, prompts: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        raise NotImplementedError


def _ids(tokenizer, prompts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    enc = tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    )
    return enc.input_ids.to(device), enc.attention_mask.to(device)


class ClipText(TextEncoderAdapter):
    """SD1.x: encoder_hidden_states = CLIP last_hidden_state."""

    def __init__(self, tokenizer, encoder: nn.Module) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.encoder = encoder.requires_grad_(False).eval()

    def encode(self, prompts, device):
        ids, _ = _ids(self.tokenizer, prompts, device)
        return {"encoder_hidden_states": self.encoder(ids).last_hidden_state}


def load_text_adapter(path: Path, family: str) -> TextEncoderAdapter:
    from transformers import CLIPTextModel, CLIPTokenizer

    if family == "sd1":
        tok = CLIPTokenizer.from_pretrained(str(path), subfolder="tokenizer")
        enc = CLIPTextModel.from_pretrained(str(path), subfolder="text_encoder")
        return ClipText(tok, enc)
    raise NotImplementedError(f"text encoders for {family}")
