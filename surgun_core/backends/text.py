"""Text encoders per model family: prompts -> the conditioning dict the denoiser takes.

SD1.x: CLIP last hidden state. SDXL: two CLIP encoders' penultimate states, concatenated, plus the
second encoder's pooled projection. SANA: a decoder LM's last hidden state with its attention mask.
Each adapter also names its parts (subfolder -> tokenizer or model) so a model folder can be written back.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError, SurgUnError
from .tokens import learned_rows, placeholder_ids, word_rows

SANA_MAX_LENGTH = 300  # SanaPipeline's max_sequence_length


class TextEncoderAdapter(nn.Module):
    """Holds tokenizer(s) and encoder(s); encode(prompts) returns a Cond dict (batch first)."""

    family: str = ""

    def encode(self, prompts: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def parts(self) -> dict[str, object]:
        """Diffusers subfolder -> tokenizer or model, in model_index.json order."""
        raise NotImplementedError

    def encode_with_tokens(
        self, prompts: list[str], tokens: dict[str, torch.Tensor], device
    ) -> dict[str, torch.Tensor]:
        """encode(), where each placeholder in `tokens` stands for its (k, d) input embeddings (backends/tokens.py)."""
        raise SurgUnError(f"{type(self).__name__} cannot encode prompts with learned tokens")

    def word_embedding(self, word: str) -> torch.Tensor:
        """The input embeddings (n, d) of the tokens of `word`: what encode_with_tokens takes for it."""
        raise SurgUnError(f"{type(self).__name__} cannot give input embeddings of words")

    def save_pretrained(self, path: Path) -> dict[str, list[str]]:
        """Write every part into its subfolder of `path`; returns the model_index.json entries."""
        index = {}
        for sub, obj in self.parts().items():
            if isinstance(obj, nn.Module):
                obj.save_pretrained(str(path / sub), safe_serialization=True)
            else:
                obj.save_pretrained(str(path / sub))
            index[sub] = ["transformers", type(obj).__name__]
        return index


def _ids(tokenizer, prompts: list[str], device, max_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    enc = tokenizer(
        prompts,
        padding="max_length",
        max_length=max_length or tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    return enc.input_ids.to(device), enc.attention_mask.to(device)


class ClipText(TextEncoderAdapter):
    """SD1.x: encoder_hidden_states = CLIP last_hidden_state."""

    family = "sd1"

    def __init__(self, tokenizer, encoder: nn.Module) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.encoder = encoder.requires_grad_(False).eval()

    def encode(self, prompts, device):
        ids, _ = _ids(self.tokenizer, prompts, device)
        return {"encoder_hidden_states": self.encoder(ids).last_hidden_state}

    def encode_with_tokens(self, prompts, tokens, device):
        ids, slots = placeholder_ids(self.tokenizer, prompts, {k: len(v) for k, v in tokens.items()}, device)
        with learned_rows(self.encoder, slots, tokens):
            return {"encoder_hidden_states": self.encoder(ids).last_hidden_state}

    def word_embedding(self, word):
        return word_rows(self.tokenizer, self.encoder, word)

    def parts(self):
        return {"tokenizer": self.tokenizer, "text_encoder": self.encoder}


class SdxlText(TextEncoderAdapter):
    """SDXL: CLIPTextModel + CLIPTextModelWithProjection, as StableDiffusionXLPipeline.encode_prompt does.

    encoder_hidden_states = both encoders' penultimate hidden states concatenated on the feature dim
    (B, L, d1 + d2); text_embeds = the second encoder's pooled projection (B, proj). With
    `zero_empty_prompt` (the pipeline's force_zeros_for_empty_prompt, on for SDXL base), the empty prompt
    encodes to zeros, as the pipeline's default negative prompt does: that is the unconditional branch.
    """

    family = "sdxl"

    def __init__(self, tokenizer, encoder, tokenizer_2, encoder_2, zero_empty_prompt: bool = True) -> None:
        super().__init__()
        self.tokenizer, self.tokenizer_2 = tokenizer, tokenizer_2
        self.encoder = encoder.requires_grad_(False).eval()
        self.encoder_2 = encoder_2.requires_grad_(False).eval()
        self.zero_empty_prompt = zero_empty_prompt

    @property
    def pooled_dim(self) -> int:
        return int(self.encoder_2.config.projection_dim)

    def encode(self, prompts, device):
        states = []
        for tok, enc in ((self.tokenizer, self.encoder), (self.tokenizer_2, self.encoder_2)):
            ids, _ = _ids(tok, prompts, device)
            out = enc(ids, output_hidden_states=True)
            states.append(out.hidden_states[-2])  # (B, L, d_i)
        return self._cond(states, out.text_embeds, prompts, device)

    def _cond(self, states, pooled, prompts, device):
        """Both encoders' penultimate states side by side and the pooled embedding; empty prompts zeroed."""
        cond = {"encoder_hidden_states": torch.cat(states, dim=-1), "text_embeds": pooled}
        if self.zero_empty_prompt:
            keep = torch.tensor([p != "" for p in prompts], device=device)
            cond = {k: v * keep.view(-1, *([1] * (v.dim() - 1))).to(v.dtype) for k, v in cond.items()}
        return cond

    def encode_with_tokens(self, prompts, tokens, device):
        # a learned token's (k, d1 + d2) embedding: the first d1 columns go to encoder 1, the rest to encoder 2
        d1, states = self.encoder.get_input_embeddings().embedding_dim, []
        for tok, enc, cols in ((self.tokenizer, self.encoder, slice(None, d1)),
                               (self.tokenizer_2, self.encoder_2, slice(d1, None))):  # fmt: skip
            ids, slots = placeholder_ids(tok, prompts, {k: len(v) for k, v in tokens.items()}, device)
            with learned_rows(enc, slots, tokens, cols):
                out = enc(ids, output_hidden_states=True)
            states.append(out.hidden_states[-2])  # (B, L, d_i)
        return self._cond(states, out.text_embeds, prompts, device)

    def word_embedding(self, word):
        one, two = word_rows(self.tokenizer, self.encoder, word), word_rows(self.tokenizer_2, self.encoder_2, word)
        if len(one) != len(two):
            raise SurgUnError(f"{word!r} is {len(one)} tokens for one SDXL tokenizer and {len(two)} for the other; "
                              "give a word both split alike")  # fmt: skip
        return torch.cat([one, two], dim=1)

    def parts(self):
        return {
            "tokenizer": self.tokenizer,
            "tokenizer_2": self.tokenizer_2,
            "text_encoder": self.encoder,
            "text_encoder_2": self.encoder_2,
        }


class SanaText(TextEncoderAdapter):
    """SANA: a decoder-only LM (Gemma2 in the released models), as SanaPipeline._get_gemma_prompt_embeds does.

    Right-padded to `max_length` tokens; encoder_hidden_states = last_hidden_state (B, L, d) and
    encoder_attention_mask = the tokenizer's mask (B, L), which the transformer turns into an attention bias.
    SanaPipeline's optional "complex human instruction" prefix is not applied.
    """

    family = "sana"

    def __init__(self, tokenizer, encoder: nn.Module, max_length: int = SANA_MAX_LENGTH) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "right"
        self.encoder = encoder.requires_grad_(False).eval()
        self.max_length = min(max_length, int(tokenizer.model_max_length))

    def encode(self, prompts, device):
        ids, mask = _ids(self.tokenizer, prompts, device, self.max_length)
        hidden = self.encoder(ids, attention_mask=mask).last_hidden_state
        return {"encoder_hidden_states": hidden, "encoder_attention_mask": mask}

    def parts(self):
        return {"tokenizer": self.tokenizer, "text_encoder": self.encoder}


def load_text_adapter(path: Path, family: str) -> TextEncoderAdapter:
    """The text side of the diffusers folder `path` for a denoiser of `family` (sd1, sdxl, sana)."""
    path = Path(path)
    for sub in FOLDERS.get(family, ()):
        if not (path / sub).is_dir():
            raise ConfigError("model", f"{path} has no {sub}/ folder, which a {family} model folder needs")
    if family == "sd1":
        from transformers import CLIPTextModel, CLIPTokenizer

        tok = CLIPTokenizer.from_pretrained(str(path), subfolder="tokenizer")
        return ClipText(tok, CLIPTextModel.from_pretrained(str(path), subfolder="text_encoder"))
    if family == "sdxl":
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        index = json.loads((path / "model_index.json").read_text())
        return SdxlText(
            CLIPTokenizer.from_pretrained(str(path), subfolder="tokenizer"),
            CLIPTextModel.from_pretrained(str(path), subfolder="text_encoder"),
            CLIPTokenizer.from_pretrained(str(path), subfolder="tokenizer_2"),
            CLIPTextModelWithProjection.from_pretrained(str(path), subfolder="text_encoder_2"),
            zero_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", True)),
        )
    if family == "sana":
        from transformers import AutoModel, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(path), subfolder="tokenizer")
        return SanaText(tok, AutoModel.from_pretrained(str(path), subfolder="text_encoder"))
    raise ConfigError("model", f"no text encoder for model family {family!r}; known: {', '.join(FOLDERS)}")


FOLDERS = {
    "sd1": ("tokenizer", "text_encoder"),
    "sdxl": ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2"),
    "sana": ("tokenizer", "text_encoder"),
}
