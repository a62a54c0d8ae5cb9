"""Prompts with learned tokens over a ComfyUI CLIP (attacks/, robust mode): the ComfyUI side of backends/tokens.py.

ComfyUI's own textual-inversion path does the work: a token list from CLIP.tokenize may hold, in place of a token
id, a tensor (d,), which sd1_clip.SDClipModel.process_tokens puts among the looked-up input embeddings at that
position (that is how an `embedding:name` word reaches the encoder). So a prompt is tokenized piece by piece
around each placeholder with ComfyUI's tokenizer, each placeholder becomes its k embedding rows, and the list is
framed (start, end, padding) as the tokenizer frames the empty prompt. The tensors stay in the autograd graph,
so gradients reach them through the encoder.

Works for the CLIP encoders of SD1.x ("l") and SDXL ("g" and "l"); a learned token's (k, D) embedding holds each
encoder's columns side by side, in the order of the tokenizer's keys. Imports nothing of ComfyUI (only
backends/comfy.py does): it calls the CLIP object's own methods.
"""

from __future__ import annotations

import re

import torch

from ..errors import SurgUnError

CLIP_KEYS = ("l", "g")  # the tokenizer keys of CLIP text encoders (SD1.x: l; SDXL: g and l)


def embedding_tables(clip) -> dict[str, torch.nn.Module]:
    """The input-embedding table of each of `clip`'s text encoders, in the order of its tokenizer's keys."""
    model = getattr(clip, "cond_stage_model", None)
    keys = list(clip.tokenize("")) if model is not None else []
    tables = {k: getattr(getattr(model, f"clip_{k}", None), "transformer", None) for k in keys}
    if not keys or any(k not in CLIP_KEYS or t is None for k, t in tables.items()):
        raise SurgUnError(f"learned tokens (the inversion and prefix attacks, robust mode) need SD1.x or SDXL CLIP "
                          f"text encoders; this CLIP's are {', '.join(keys) or type(clip).__name__}")  # fmt: skip
    return {k: t.get_input_embeddings() for k, t in tables.items()}


def word_embedding(clip, word: str) -> torch.Tensor:
    """The input embeddings (n, D) of the n tokens of `word`: every encoder's columns side by side (a copy)."""
    parts = []
    for key, table in embedding_tables(clip).items():
        ids = [t for t, _ in _content(clip, word)[key]]
        if not ids:
            raise SurgUnError(f"{word!r} tokenizes to nothing; give a word")
        rows = table(torch.tensor([ids], device=table.weight.device), out_dtype=torch.float32)[0]  # (n, d)
        parts.append(rows.detach().float())
    if len({len(p) for p in parts}) > 1:
        raise SurgUnError(f"{word!r} is a different number of tokens for this CLIP's tokenizers; give a word both "
                          "split alike")  # fmt: skip
    return torch.cat(parts, dim=1).clone()


def tokens_with_embeddings(clip, prompt: str, tokens: dict[str, torch.Tensor]) -> dict:
    """clip.tokenize(prompt), where each placeholder (a key of `tokens`) stands for its (k, D) embedding rows.

    A prompt without placeholders gets exactly clip.tokenize(prompt). CLIP's tokenizer splits words at
    whitespace, so tokenizing the pieces between placeholders gives the tokens of the whole prompt.
    """
    names = [p for p in sorted(tokens, key=len, reverse=True) if p in prompt]
    if not names:
        return clip.tokenize(prompt)
    tables = embedding_tables(clip)
    widths = [t.weight.shape[1] for t in tables.values()]
    for name in names:
        if tokens[name].dim() != 2 or tokens[name].shape[1] != sum(widths):
            parts = " + ".join(map(str, widths))
            raise SurgUnError(f"learned token {name!r} has shape {tuple(tokens[name].shape)}; this CLIP takes "
                              f"(k, {sum(widths)}): {parts} columns, one part per encoder")  # fmt: skip
    pieces = re.split("(" + "|".join(map(re.escape, names)) + ")", prompt)
    frame = clip.tokenize("", return_word_ids=True)
    out, col = {}, 0
    for (key, _), width in zip(tables.items(), widths):
        seq = []
        for piece in pieces:
            if piece in tokens:
                seq += [(row, 1.0) for row in tokens[piece][:, col : col + width]]  # one (d,) row per position
            elif piece.strip():
                seq += _content(clip, piece)[key]
        out[key] = [_framed(seq, frame[key][0], prompt)]
        col += width
    return out


def _content(clip, text: str) -> dict[str, list[tuple]]:
    """Per tokenizer key, the (token, weight) pairs of `text` without start, end and padding (word id 0)."""
    batches = clip.tokenize(text, return_word_ids=True)
    return {k: [(t, w) for batch in bb for t, w, wid in batch if wid != 0] for k, bb in batches.items()}


def _framed(seq: list[tuple], empty: list[tuple], prompt: str) -> list[tuple]:
    """`seq` between the start and end tokens of the empty prompt's token list, padded as it is padded."""
    start, end, pads = empty[0][:2], empty[1][:2], [e[:2] for e in empty[2:]]
    out = [start, *seq, end]
    if pads and len(out) > len(empty):
        raise SurgUnError(f"prompt {prompt!r} with its learned tokens is longer than the text encoder's "
                          f"{len(empty)} tokens; shorten the prompt")  # fmt: skip
    return out + pads[: max(0, len(empty) - len(out))]
