"""UCE: Unified Concept Editing, a benchmark baseline (closed form, no training).

Paper: "Unified Concept Editing in Diffusion Models", Rohit Gandikota, Hadas Orgad, Yonatan Belinkov,
Joanna Materzyńska, David Bau. WACV 2024. arXiv:2308.14761. Official code:
github.com/rohitgandikota/unified-concept-editing, train-scripts/train_erase.py (`edit_model`,
technique "replace", the script's default); its choices and defaults are followed here.

Every cross-attention key and value projection W (each attn2.to_k and attn2.to_v) is replaced by

    W = (s_e sum_i v*_i c_i^T + s_p sum_j W_old c_j c_j^T + lam W_old)
        (s_e sum_i c_i c_i^T  + s_p sum_j c_j c_j^T       + lam I)^-1,      v*_i = W_old c*_i

where c are text-encoder output token embeddings (encoder_hidden_states):
  erase   c_i   the tokens of each erase prompt from its LAST WORD to the end of the sequence (end token
                and padding), and c*_i the tokens of the guide prompt " " (the script's stand-in for the
                empty prompt when erasing "towards uncond") from ITS last word (for " ", the start token)
                on; both runs cut to the same length, aligned from those starting tokens;
  preserve c_j  every token of "" and of each preserve concept (the script always adds "").
Defaults: lam = 0.5, s_e (erase_scale) = 1.0, s_p (preserve_scale) = max(0.1, 1 / (1 + #preserve)).
Values v*_i and W_old c_j include the projection's bias where it has one, as `layer(emb)` does in the
script; only the weight is edited. Erase prompts: the bare concept (the script's default) plus, as its
--add_prompts option does with its own five phrasings, the caller's templates with the concept in them.
"""

from __future__ import annotations

import logging
import re

import torch
import torch.nn.functional as F

from ...backends.base import Backend
from ...errors import SurgUnError
from ._common import (
    BaselineResult,
    Cancel,
    EditedWeights,
    Progress,
    check_cancel,
    editing,
    finish,
    resolve,
    start_clock,
)

log = logging.getLogger(__name__)

DEFAULTS = {
    "lamb": 0.5,
    "erase_scale": 1.0,
    "preserve_scale": None,  # None: max(0.1, 1 / len(retain texts)), as train_erase.py
    "guide": " ",
    "add_prompts": True,  # also erase the concept inside each template (the script's --add_prompts)
}
KV = re.compile(r"(^|\.)attn2\.to_[kv]$")


def erase_uce(
    backend: Backend,
    concept: str,
    *,
    templates: list[str],
    preserve: list[str],
    anchor: str | None = None,
    seed: int = 0,
    iterations: int | None = None,
    lr: float | None = None,
    progress: Progress | None = None,
    cancel: Cancel | None = None,
    **options,
) -> BaselineResult:
    """Erase `concept` with UCE's closed-form edit of every attn2 to_k / to_v weight, in place.

    Args:
        templates: prompt templates with one "{}" (erase prompts besides the bare concept, if add_prompts).
        preserve: other concepts whose key/value outputs the edit keeps (UCE's preserve set).
        anchor, seed: unused (the guide is the empty prompt; the edit is deterministic).
        iterations, lr: must be None: UCE has no training loop.
        options: lamb, erase_scale, preserve_scale, guide, add_prompts (defaults in DEFAULTS).

    Returns:
        BaselineResult; its restore() puts the original weights back.
    """
    t0 = start_clock(backend)
    cfg = resolve("uce", DEFAULTS, options, iterations, lr)
    layers = {n: m for n, m in backend.attention_linears().items() if KV.search(n)}
    erase_texts = [concept]
    if cfg["add_prompts"]:
        erase_texts += [p for p in (t.format(concept) for t in templates) if p != concept]
    retain_texts = ["", *[p for p in preserve if p.strip().lower() != concept.strip().lower()]]
    s_p = cfg["preserve_scale"] if cfg["preserve_scale"] is not None else max(0.1, 1 / len(retain_texts))
    lam, s_e = float(cfg["lamb"]), float(cfg["erase_scale"])
    c_erase, c_guide = erase_tokens(backend, erase_texts, cfg["guide"])  # (N, d) each
    with torch.no_grad():
        c_keep = backend.encode(retain_texts)["encoder_hidden_states"].flatten(0, 1)  # (M * L, d)
    weights = EditedWeights(backend.denoiser, [f"{n}.weight" for n in layers], "cross-attention attn2.to_k/to_v")
    log.info("uce: erasing %r from %d projections (%d erase tokens, %d preserve tokens)", concept, len(layers),
             len(c_erase), len(c_keep))  # fmt: skip
    with editing(weights), torch.no_grad():
        for i, (name, lin) in enumerate(layers.items()):
            check_cancel(cancel)
            w_old = weights.saved[f"{name}.weight"].double()  # (out, d)
            bias = lin.bias.double() if lin.bias is not None else None
            ce, cg, ck = (c.to(w_old.device).double() for c in (c_erase, c_guide, c_keep))
            v_star = F.linear(cg, w_old, bias)  # (N, out): the guide's values under the old weights
            v_keep = F.linear(ck, w_old, bias)  # (M * L, out)
            eye = torch.eye(w_old.shape[1], dtype=w_old.dtype, device=w_old.device)
            mat1 = lam * w_old + s_e * v_star.T @ ce + s_p * v_keep.T @ ck  # (out, d)
            mat2 = lam * eye + s_e * ce.T @ ce + s_p * ck.T @ ck  # (d, d), symmetric positive definite
            lin.weight.copy_(torch.linalg.solve(mat2, mat1.T).T.to(lin.weight.dtype))  # mat1 @ mat2^-1
            if progress is not None:
                progress("edit", i + 1, len(layers), {})
    settings = {**cfg, "method": "uce", "technique": "replace", "preserve_scale": s_p, "erase_texts": erase_texts,
                "preserve_texts": retain_texts, "layers": len(layers)}  # fmt: skip
    return finish("uce", t0, backend, settings, weights)


def erase_tokens(backend: Backend, texts: list[str], guide: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Aligned token embeddings (c_i, c*_i) of each erase text and the guide, as train_erase.py picks them.

    Returns:
        (N, d) erase-text tokens from each text's last word on, and the (N, d) guide tokens paired with them.
    """
    with torch.no_grad():
        emb = backend.encode([*texts, guide])["encoder_hidden_states"]  # (len(texts) + 1, L, d)
    L = emb.shape[1]
    last = last_word_index(backend, [*texts, guide], L)
    fn = last[-1]
    olds, news = [], []
    for i, fi in enumerate(last[:-1]):
        far = max(fi, fn)
        olds.append(emb[i, fi : L - max(0, far - fi)])
        news.append(emb[-1, fn : L - max(0, far - fn)])
    return torch.cat(olds).float(), torch.cat(news).float()


def last_word_index(backend: Backend, prompts: list[str], length: int) -> list[int]:
    """Index of each prompt's last token before the end token (the start token for an empty prompt).

    train_erase.py takes attention_mask.sum() - 2 with CLIP's start and end tokens; a tokenizer that adds no
    end token (SANA's Gemma) gives sum - 1 here.
    """
    tok = getattr(getattr(backend, "text", None), "tokenizer", None)
    if tok is None:
        raise SurgUnError(
            f"uce needs the model's tokenizer to find each prompt's tokens; {type(backend).__name__} exposes "
            "none (backend.text.tokenizer). Run the benchmark on a diffusers model folder."
        )
    enc = tok(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    out = []
    for ids, mask in zip(enc.input_ids, enc.attention_mask):
        n = int(mask.sum())
        out.append(max(0, n - 2 if int(ids[n - 1]) == tok.eos_token_id else n - 1))
    return out
