"""OpenAI CLIP's BPE tokenizer, offline: the SD1/SD2/SDXL tokenizers, built from files that ship with SurgUn.

configs/clip_bpe_merges.txt.gz holds the first 48,894 merges of CLIP's bpe_simple_vocab_16e6 (as open_clip
and OpenAI's CLIP ship it, MIT licence; 204 KiB gzipped). vocab.json is derived from them at run time the
way CLIP's SimpleTokenizer builds its vocabulary; the family's tokenizer_config.json (configs/<family>/
tokenizer*/) sets the pad token ("<|endoftext|>" for CLIP-L, "!" for the open_clip encoders) and length.
"""

from __future__ import annotations

import functools
import gzip
import json
import shutil
import tempfile
from pathlib import Path

from ..errors import ConfigError

CONFIGS = Path(__file__).parent / "configs"
_CLIP_MERGES = 49152 - 256 - 2  # CLIP's vocabulary: 256 bytes x 2 (with </w>) + merges + 2 special tokens


def clip_tokenizer(folder: str | Path):
    """The CLIPTokenizer of a diffusers tokenizer folder; where it has no vocabulary (vocab.json or
    tokenizer.json), CLIP's own (from the shipped merges) with the folder's tokenizer_config.json (pad token,
    max length)."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    if (folder / "vocab.json").is_file() or (folder / "tokenizer.json").is_file():
        return CLIPTokenizer.from_pretrained(str(folder))
    vocab, merges = _clip_vocab()
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            if (folder / name).is_file():
                shutil.copy(folder / name, Path(tmp) / name)
        (Path(tmp) / "vocab.json").write_text(vocab, encoding="utf-8")
        (Path(tmp) / "merges.txt").write_text(merges, encoding="utf-8")
        return CLIPTokenizer.from_pretrained(tmp)


@functools.lru_cache(maxsize=1)
def _clip_vocab() -> tuple[str, str]:
    """(vocab.json, merges.txt) texts of OpenAI CLIP's tokenizer, as transformers' CLIPTokenizer reads them."""
    merges = gzip.decompress((CONFIGS / "clip_bpe_merges.txt.gz").read_bytes()).decode("utf-8").splitlines()
    if len(merges) != _CLIP_MERGES:
        raise ConfigError("model", f"the shipped CLIP merges hold {len(merges)} lines, not {_CLIP_MERGES}: reinstall")
    byte_chars = list(_bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + [m.replace(" ", "") for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False), "#version: 0.2\n" + "\n".join(merges)


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's (and GPT-2's) reversible byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))
