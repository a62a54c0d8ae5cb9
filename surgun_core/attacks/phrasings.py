"""Phrasings never trained on: the concept's word in prompts the erasure did not see. No optimisation.

An erasure trained on a few templates ("a photo of a {}", ...) may only have learned those sentences. This
asks with other ones: the base model's own phrasings the erasure did not use, held-out templates, other word
orders, the concept inside a longer prompt (attacks/prompts.py lists them per model family). Recovery is the
rate over all of them; the rate of each phrasing is in details["rates"], so a leak can be traced to one.

Settings:
  seeds_per_prompt  images per prompt (2; on the toy world each phrasing is asked with all five values of the
                    other attribute: 10 images per phrasing)
  phrasings         templates ("{}" = the concept; on the toy world "{a}" = the other attribute) in place of the
                    built-in ones (None)
"""

from __future__ import annotations

from typing import ClassVar

from .base import Attack, Attacked
from .prompts import phrasing_prompts


class PhrasingsAttack(Attack):
    name = "phrasings"
    defaults: ClassVar[dict] = {"seeds_per_prompt": 2, "phrasings": None}

    def run(self) -> Attacked:
        k = int(self.settings["seeds_per_prompt"])
        pairs = phrasing_prompts(self.backend, self.concept, self.kind, self.settings["phrasings"])
        rows = [(tpl, p, sd) for tpl, p in pairs for sd in self.seeds(k)]
        x0 = self.sample([r[1] for r in rows], [r[2] for r in rows])
        return Attacked(x0, [r[1] for r in rows], [r[2] for r in rows], groups=[r[0] for r in rows])
