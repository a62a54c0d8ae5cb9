"""A word-level tokenizer in CLIPTokenizer form, so the toy model loads like any SD text encoder.

CLIPTokenizer is a BPE tokenizer. We give it one merge chain per word ("c i", "ci r", ...) so that every
toy-world word becomes one token, and keep single characters in the vocabulary so unknown words still
tokenize (to characters) instead of failing.
"""

from __future__ import annotations

import itertools
import json
import string
from pathlib import Path

from transformers import CLIPTokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 16


def _symbols(word: str) -> list[str]:
    return [*list(word[:-1]), word[-1] + "</w>"]


def _bpe(syms: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE: repeatedly merge the adjacent pair of lowest rank."""
    syms = list(syms)
    while len(syms) > 1:
        pairs = [(ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(itertools.pairwise(syms))]
        rank, _ = min(pairs)
        if rank == 1 << 30:
            break
        a, b = next((syms[i], syms[i + 1]) for r, i in pairs if r == rank)
        out, i = [], 0
        while i < len(syms):
            if i + 1 < len(syms) and syms[i] == a and syms[i + 1] == b:
                out.append(a + b)
                i += 2
            else:
                out.append(syms[i])
                i += 1
        syms = out
    return syms


def build_tokenizer_files(words: list[str], out_dir: Path) -> None:
    """Write vocab.json, merges.txt and tokenizer_config.json for `words` into out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab: dict[str, int] = {}

    def add(tok: str) -> None:
        vocab.setdefault(tok, len(vocab))

    chars = string.ascii_lowercase + string.digits + ",.'-!?"
    for ch in chars:
        add(ch)
        add(ch + "</w>")
    merges: list[str] = []
    ranks: dict[tuple[str, str], int] = {}
    # Simulate BPE and append a merge wherever a word is not yet one token; appended merges have the lowest
    # priority, so words already finished keep their single token.
    changed = True
    while changed:
        changed = False
        for w in words:
            syms = _bpe(_symbols(w), ranks)
            if len(syms) > 1:
                pair = (syms[0], syms[1])
                ranks[pair] = len(merges)
                merges.append(f"{pair[0]} {pair[1]}")
                add(pair[0] + pair[1])
                changed = True
    add(BOS)
    add(EOS)
    (out_dir / "vocab.json").write_text(json.dumps(vocab, indent=0))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    cfg = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MAX_LENGTH,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": EOS,
        "do_lower_case": True,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    (out_dir / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}, indent=2)
    )
    tok = CLIPTokenizer.from_pretrained(str(out_dir))
    for w in words:
        ids = tok(w, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise RuntimeError(f"toy tokenizer splits {w!r} into {ids}; reorder the vocabulary")
