"""Concept inversion (Pham et al. 2023, "Circumventing concept erasure methods", arXiv 2308.01508).

Textual inversion against the model under attack: learn k new token input embeddings so that the ERASED model,
prompted with them, denoises images of the concept well (its own training loss, DESIGN.md section
1), then prompt it with the learned token in the concept's place. An erasure that only cut the concept off its
word falls to this: the rest of the network still draws it for the right input embedding. The issue's check
(one token, 40 base images, 300 Adam steps, lr 0.01) brought an erased toy circle back in 80% of images.

Settings (published textual-inversion ones, scaled to the model):
  tokens        k learned embeddings in the concept's place (1, as in concept inversion)
  init_word     where they start: a neutral word of the kind ("object", "style"; None = that default)
  images        images of the concept to invert (40): the toy world's own images on the toy model, the base
                model's from the concept's training phrasings on a real one (Attack.concept_images)
  steps, lr     Adam steps and learning rate (lr 0.01 as published; steps 1000 for a real model, 600 on the
                toy world: on the plain `surgun demo` circle delta, recovery over 3 seeds was 0.45-0.68 at 300
                steps, 0.65-0.78 at 600 and 0.65-0.83 at 1000; 600 steps is about two minutes on one core)
  batch_size    images per step (4 on a real model to fit a consumer GPU; 8 on the toy world)
  templates     the concept's training phrasings the base model's images are drawn from (None: the model family's)
  prompts       the attacker's prompts, "{}" where the token goes (None: "a <colour> {}" for a toy shape,
                "a {} <shape>" for a toy colour, the kind's templates on a real model)
  seeds_per_prompt  attacked images per prompt
"""

from __future__ import annotations

from typing import ClassVar

import torch

from ..engine.learn_tokens import learn_tokens
from .base import Attack, Attacked
from .prompts import neutral_word

PLACEHOLDER = "<learned>"


class InversionAttack(Attack):
    name = "inversion"
    defaults: ClassVar[dict] = {"tokens": 1, "init_word": None, "images": 40, "steps": 1000, "lr": 0.01,
                                "batch_size": 4, "seeds_per_prompt": 4, "templates": None, "prompts": None}  # fmt: skip
    toy: ClassVar[dict] = {"steps": 600, "batch_size": 8, "seeds_per_prompt": 8}

    def run(self) -> Attacked:
        s, b = self.settings, self.backend
        # 1. images of the concept, each with its phrasing around the placeholder
        x0, per_image = self.concept_images(int(s["images"]))
        train_prompts = [t.format(PLACEHOLDER) for t in per_image]
        # 2. the token(s), from a neutral word, learned against the model under attack
        word = b.word_embedding(s["init_word"] or neutral_word(self.kind)).float()  # (n, d)
        init = {PLACEHOLDER: word.mean(0, keepdim=True).repeat(int(s["tokens"]), 1)}  # (k, d)
        with b.meter.phase("learning"):
            learned = learn_tokens(b, init, train_prompts, x0, int(s["steps"]), float(s["lr"]),
                                   int(s["batch_size"]), self.seed)  # fmt: skip
        # 3. the attacker's prompts with the token in the concept's place, fixed seeds
        templates = self.prompt_templates()
        k = int(s["seeds_per_prompt"])
        prompts = [t.format(PLACEHOLDER) for t in templates for _ in range(k)]
        seeds = [sd for _ in templates for sd in self.seeds(k)]
        with torch.no_grad():
            cond = b.encode_with_tokens(prompts, learned.tokens)
        details = {"loss_first": learned.losses[0], "loss_last": _tail_mean(learned.losses)} if learned.losses else {}
        return Attacked(self.sample(prompts, seeds, cond), prompts, seeds, details)


def _tail_mean(losses: list[float], n: int = 20) -> float:
    """The mean loss of the last `n` steps (one step's loss is noisy: random images, timesteps, noise)."""
    tail = losses[-n:]
    return sum(tail) / len(tail)
