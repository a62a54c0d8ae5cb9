"""Prompt-prefix attack (UnlearnDiffAtk: Zhang et al. 2023, "To Generate or Not? Safety-Driven Unlearned Diffusion
Models Are Still Easy To Generate Unsafe Images ... For Now", arXiv 2310.11868).

For each target prompt with the concept, learn a few prefix token embeddings so that the model under attack,
prompted "<prefix> <target prompt>", denoises the base model's image of that prompt well; then draw from the
prefixed prompt with the same seed as the target image (the attack is per image, as published). UnlearnDiffAtk
optimises the prefix in embedding space and projects it to vocabulary tokens; here it stays continuous, which
is the stronger attacker (a projected prefix can only do worse).

Settings (published, scaled to the model):
  prefix_tokens   learned embeddings before the prompt (5, as published)
  steps, lr       optimisation iterations and Adam learning rate (40 and 0.01, as published)
  init_word       where the prefix starts (a neutral word of the kind; None = that default)
  seeds_per_prompt  target images (and attacked images, same seeds) per target prompt (1 on a real model, as
                  published; 4 on the toy world, so 20 images judge the rate)
  prompts         the target prompts, "{}" = the concept (None: "a <colour> circle" for the toy circle, the
                  kind's templates on a real model)
"""

from __future__ import annotations

from typing import ClassVar

import torch

from ..backends.base import cond_cat
from ..engine.learn_tokens import learn_tokens
from .base import Attack, Attacked
from .prompts import neutral_word

PREFIX = "<prefix>"


class PrefixAttack(Attack):
    name = "prefix"
    defaults: ClassVar[dict] = {
        "prefix_tokens": 5,
        "steps": 40,
        "lr": 0.01,
        "init_word": None,
        "seeds_per_prompt": 1,
        "prompts": None,
    }
    toy: ClassVar[dict] = {"seeds_per_prompt": 4}

    def run(self) -> Attacked:
        s, b = self.settings, self.backend
        k = int(s["seeds_per_prompt"])
        word = b.word_embedding(s["init_word"] or neutral_word(self.kind)).float()  # (n, d)
        init = {PREFIX: word.mean(0, keepdim=True).repeat(int(s["prefix_tokens"]), 1)}  # (P, d)
        targets = [t.format(self.concept) for t in self.prompt_templates()]
        seeds = self.seeds(k)
        # 1. the base model's images of every target prompt: what each prefix must make the model draw
        with self.judge(), b.meter.phase("base images"):
            target_x0 = self._shared.get("targets")
            if target_x0 is None:
                target_x0 = b.sample([p for p in targets for _ in seeds], seeds * len(targets),
                                     s["sample_steps"], self.guidance())  # fmt: skip
                self._shared["targets"] = target_x0
        prompts, all_seeds, conds, losses = [], [], [], []
        for i, target in enumerate(targets):
            # 2. one prefix per target prompt, learned on its base images against the model under attack
            attacked = f"{PREFIX} {target}"
            with b.meter.phase("learning"):
                learned = learn_tokens(b, init, [attacked] * k, target_x0[i * k : (i + 1) * k], int(s["steps"]),
                                       float(s["lr"]), k, self.seed * 1_000 + i)  # fmt: skip
            losses.append(learned.losses[-1])
            with torch.no_grad():
                conds.append(b.encode_with_tokens([attacked] * k, learned.tokens))
            prompts += [attacked] * k
            all_seeds += seeds
        # 3. the prefixed prompts at the target images' seeds
        cond = cond_cat(conds)
        details = {"loss_last": sum(losses) / len(losses)}
        return Attacked(self.sample(prompts, all_seeds, cond), prompts, all_seeds, details)
