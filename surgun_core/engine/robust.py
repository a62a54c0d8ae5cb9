"""Robust mode (EraseConfig.robust): adversarial erasure against concept inversion (DESIGN.md section 2).

A plain erasure can hide the concept behind its word: a learned token embedding brings it back (concept
inversion). Robust mode trains against that attacker (the AdvUnlearn / RECE / STEREO idea): every
`robust_every` steps an adversary learns k token input embeddings that make the model AS IT IS NOW (LoRA
on) denoise the target images well under their own phrasings with the token in the concept's place (the
attack of attacks/inversion.py, warm-started from its last tokens and first from the concept's own word);
the SurgUn loss is then also taken under those prompts: a share (`robust_share`) of each step's target rows,
and the distractor rows that share their prompt, are conditioned on the adversary's prompt. So the loss stays
the one expression of train.py; only what "the target prompt" means widens to what an attacker can type.
"""

from __future__ import annotations

import torch

from ..backends.base import Backend, Cond, cond_cat, cond_select
from ..config import EraseConfig
from .data import ConceptImages
from .learn_tokens import learn_tokens

PLACEHOLDER = "<adversary>"


class Adversary:
    """The attacker of robust mode: learned token(s) that stand for the concept in its prompts."""

    def __init__(self, backend: Backend, cfg: EraseConfig, images: ConceptImages, tokens: dict | None = None) -> None:
        """tokens: an earlier attacker's (Adversary.tokens), to go on from (surgun.erase's extension); else the
        concept's own word."""
        self.backend, self.cfg, self.images = backend, cfg, images
        if tokens is None:
            word = backend.word_embedding(cfg.concepts[0]).float()  # (n, d): the concept's own word first
            tokens = {PLACEHOLDER: word.mean(0, keepdim=True).repeat(cfg.robust_tokens, 1)}  # (k, d)
        self.tokens = tokens
        self.prompts = [self.stand_in(p) for p in images.prompts]
        self.losses: list[float] = []

    def stand_in(self, prompt: str) -> str:
        """The prompt with every erased concept replaced by the adversary's token."""
        for c in sorted(self.cfg.concepts, key=len, reverse=True):
            prompt = prompt.replace(c, PLACEHOLDER)
        return prompt

    def refresh(self, step: int, first_step: int = 0) -> None:
        """Every robust_every steps (and at step 0) of a run that goes on from `first_step`: robust_steps more Adam
        steps of the attacker."""
        cfg = self.cfg
        if step % cfg.robust_every:
            return
        with self.backend.meter.phase("adversary"):
            seed = cfg.seed + 7919 * (first_step + step + 1)
            learned = learn_tokens(self.backend, self.tokens, self.prompts, self.images.x0, cfg.robust_steps,
                                   cfg.robust_lr, cfg.batch_size, seed)  # fmt: skip
        self.tokens = learned.tokens
        self.losses.append(learned.losses[-1])

    def mix(self, cond: Cond, index: torch.Tensor) -> tuple[Cond, int]:
        """The step's target conditioning with its last robust_share of rows under the adversary's prompts.

        Returns the conditioning and how many rows (the last ones) are the adversary's: the loss takes them as a
        prompt group of their own (train.surgun_backward).

        Args:
            cond: the target rows' conditioning (B rows), in the order of `index` (rows of self.images).
        """
        n = round(len(index) * self.cfg.robust_share)
        if n == 0:
            return cond, 0
        with torch.no_grad():
            adv = self.backend.encode_with_tokens([self.prompts[int(i)] for i in index[-n:]], self.tokens)
        keep = cond_select(cond, list(range(len(index) - n)))
        return cond_cat([keep, {k: adv[k].to(v) for k, v in cond.items()}]), n
