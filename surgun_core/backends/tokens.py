"""Prompts with learned tokens: placeholder words whose input embeddings are given tensors (attacks/, robust mode).

A CLIP text encoder looks each token id up in its input-embedding table, adds position embeddings and runs its
transformer. A learned token is a row that is not in the table. So the prompt is tokenized piece by piece around
each placeholder, the placeholder's positions get a stand-in id, and a forward hook on the table puts the given
embedding(s) at those positions, gradients flowing to them. The vocabulary never changes, so a fixed word-level
tokenizer (the toy world's) works as well as CLIP's BPE one, and the transformers version does not matter
(CLIPTextModel's forward takes no inputs_embeds in transformers 5).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import torch
from torch import nn

from ..errors import SurgUnError

Slots = list[tuple[int, int, str, int]]  # (prompt row, token position, placeholder, which of its k embeddings)


def placeholder_ids(tokenizer, prompts: list[str], counts: dict[str, int], device) -> tuple[torch.Tensor, Slots]:
    """Token ids (B, L) padded as the tokenizer pads, and where each placeholder's k embeddings go.

    A prompt without placeholders gets exactly the ids the tokenizer gives it (CLIP's pre-tokenizer splits at
    whitespace, so tokenizing the pieces between placeholders gives the same tokens as the whole prompt).
    """
    length = int(tokenizer.model_max_length)
    stand_in = tokenizer("a", add_special_tokens=False).input_ids[0]  # any ordinary id below EOS (CLIP pooling)
    split = re.compile("(" + "|".join(re.escape(p) for p in sorted(counts, key=len, reverse=True)) + ")")
    rows, slots = [], []
    for b, prompt in enumerate(prompts):
        ids: list[int] = []
        for piece in split.split(prompt) if counts else [prompt]:
            if piece in counts:
                slots += [(b, 1 + len(ids) + j, piece, j) for j in range(counts[piece])]
                ids += [stand_in] * counts[piece]
            elif piece.strip():
                ids += tokenizer(piece.strip(), add_special_tokens=False).input_ids
        if len(ids) > length - 2:
            if any(s[0] == b and s[1] >= length - 1 for s in slots):
                raise SurgUnError(f"prompt {prompt!r} is longer than the text encoder's {length} tokens and its "
                                  "learned token falls past the end; shorten the prompt")  # fmt: skip
            ids = ids[: length - 2]
        ids = [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id]
        rows.append(ids + [tokenizer.pad_token_id] * (length - len(ids)))
    return torch.tensor(rows, dtype=torch.long, device=device), slots


@contextlib.contextmanager
def learned_rows(encoder: nn.Module, slots: Slots, tokens: dict[str, torch.Tensor],
                 features: slice = slice(None)) -> Iterator[None]:  # fmt: skip
    """Inside this block, `encoder`'s input embeddings at `slots` are the given ones (their `features` columns)."""
    if not slots:
        yield
        return
    table = encoder.get_input_embeddings()
    rows = torch.tensor([s[0] for s in slots])
    pos = torch.tensor([s[1] for s in slots])

    def hook(_mod, _args, out):
        values = torch.stack([tokens[name][j, features] for _, _, name, j in slots]).to(out)  # (S, d)
        return out.index_put((rows.to(out.device), pos.to(out.device)), values)

    handle = table.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def word_rows(tokenizer, encoder: nn.Module, word: str) -> torch.Tensor:
    """The input embeddings (n, d) of the n tokens `word` tokenizes to (a copy, no gradient)."""
    ids = tokenizer(word, add_special_tokens=False).input_ids
    if not ids:
        raise SurgUnError(f"{word!r} tokenizes to nothing; give a word")
    table = encoder.get_input_embeddings()
    return table.weight[torch.tensor(ids, device=table.weight.device)].detach().clone()
