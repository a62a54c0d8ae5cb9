"""The retain anchor L_R of the SurgUn loss (DESIGN.md section 1): what the LoRA must leave as it was.

EraseConfig.retain_anchor picks its form:
  "output"  |f(x_t, t, c_R) - f0(x_t, t, c_R)|^2: the erased model's predictions on retain prompts over retain images
            at the step's timesteps, against the frozen model's. Any layers; each retain row costs a no-grad reference
            forward and the LoRA's forward with its backward (4 sample-forwards: 32 of a toy step's 80).
  "text"    for LoRA layers that read the prompt alone (a UNet's cross-attention K/V: their input is the text
            encoder's output, whatever x_t and t), the LoRA's own output on every token of every retain prompt,
            relative to the layers' frozen output: sum_l |dW_l u|^2 / sum_l |W_l u|^2. At zero every retain prompt
            is denoised exactly as before at every x_t and t, so it anchors every image of those prompts at once,
            and it needs no denoiser forward a step: the layers' inputs are captured once (one forward per prompt).
            The preservation term of UCE (Gandikota et al., arXiv 2308.14761) as a penalty on a LoRA. A layer whose
            input changes with the image (self-attention, a flow DiT's joint text stream) is refused.
"""

from __future__ import annotations

import torch

from ..backends.base import Backend
from ..concepts import expand, templates_for
from ..config import EraseConfig
from ..errors import ConfigError
from ..lora import LoRASet

INPUT_TOLERANCE = 1e-4  # relative difference under which a layer's input counts as the same at two x_t and t


def anchor_prompts(cfg: EraseConfig) -> list[str]:
    """The prompts the "text" anchor holds, each once: the user's retain prompts; else every distractor in each of
    retain_templates; else the distractors' training images' own prompts (the templates cycled over
    images_per_concept images, engine/data.generate_concept_images)."""
    distractors = cfg.resolved_distractors()
    if cfg.retain_prompts:
        prompts = cfg.retain_prompts
    elif cfg.retain_templates:
        prompts = [t.format(d) for d in distractors for t in cfg.retain_templates]
    else:
        templates = cfg.templates or list(templates_for(cfg.kind))
        prompts = [p for d in distractors for p in expand(templates, d)[: cfg.images_per_concept]]
    return list(dict.fromkeys(prompts))


def output_anchor(backend: Backend, lset: LoRASet, x0, cond, t, noise) -> torch.Tensor:
    """|f(x_t, t, c_R) - f0(x_t, t, c_R)|^2: the LoRA must not change predictions on retain prompts."""
    obj = backend.objective
    x_t = obj.noisy(x0, noise, t.to(x0.device))
    tm = obj.model_time(t).to(x0.device)
    with torch.no_grad(), lset.disabled():
        ref = backend.predict(x_t, tm, cond).float()
    return ((backend.predict(x_t, tm, cond).float() - ref) ** 2).mean()


class TextAnchor:
    """sum_l |dW_l u|^2 / sum_l |W_l u|^2 over the inputs u the LoRA's layers see for the retain prompts.

    Built before training: one denoiser forward per prompt (with the LoRA off) captures each layer's input, and a
    second forward of the first prompt at another x_t and t checks that the layers read the prompt alone.
    Layers fed the same tensor (every cross-attention K and V of a UNet) share one stored copy.
    """

    def __init__(self, backend: Backend, lset: LoRASet, prompts: list[str], batch_size: int = 8) -> None:
        if not prompts:
            raise ConfigError("retain_prompts", "the text retain anchor needs at least one retain prompt")
        a = self._capture(backend, lset, prompts[:1], seed=1, t=0.25)
        b = self._capture(backend, lset, prompts[:1], seed=2, t=0.75)
        moved = [n for n in lset.names if not _same(a[n], b[n])]
        if moved:
            raise ConfigError("retain_anchor", f"'text' anchors layers that read the prompt alone (cross-attention "
                              f"K/V), but {len(moved)} of the chosen layers read the image too (e.g. {moved[0]}); "
                              "use retain_anchor='output' or blocks that are cross-attention K/V only")  # fmt: skip
        self.inputs: list[torch.Tensor] = []  # distinct captured inputs, (prompts * tokens, in_features)
        self.which: dict[str, int] = {}
        rows = [self._capture(backend, lset, prompts[i : i + batch_size], seed=3, t=0.5)
                for i in range(0, len(prompts), batch_size)]  # fmt: skip
        for name in lset.names:
            u = torch.cat([r[name] for r in rows])
            same = next((i for i, v in enumerate(self.inputs) if v.shape == u.shape and torch.equal(v, u)), None)
            if same is None:
                self.inputs.append(u)
                same = len(self.inputs) - 1
            self.which[name] = same
        with torch.no_grad():  # the frozen layers' output energy on those inputs: the scale the LoRA's is held to
            base = sum(float((lset.targets[n](self.inputs[i].to(lset.targets[n].weight.dtype)).float() ** 2).sum())
                       for n, i in self.which.items())  # fmt: skip
        self.base_energy = max(base, 1e-12)

    @staticmethod
    def _capture(backend: Backend, lset: LoRASet, prompts: list[str], seed: int, t: float):
        """Each layer's inputs for `prompts` at one noise level and noise draw: {name: (rows, in_features)}."""
        seen: dict[str, list[torch.Tensor]] = {n: [] for n in lset.names}
        handles = [lset.targets[n].register_forward_hook(
            lambda _m, args, _out, n=n: seen[n].append(args[0].detach())) for n in lset.names]  # fmt: skip
        try:
            g = torch.Generator().manual_seed(seed)
            x0 = torch.randn((len(prompts), *backend.latent_shape()), generator=g).to(backend.device, backend.dtype)
            obj = backend.objective
            ts = obj.t_grid(4)[[int(t * 3)]].expand(len(prompts))
            x_t = obj.noisy(x0, torch.randn(x0.shape, generator=g).to(x0), ts.to(backend.device))
            with torch.no_grad(), lset.disabled():
                backend.predict(x_t, obj.model_time(ts).to(backend.device), backend.encode(prompts))
        finally:
            for h in handles:
                h.remove()
        return {n: torch.cat([u.flatten(0, -2) for u in us]) for n, us in seen.items()}

    def __call__(self, lset: LoRASet) -> torch.Tensor:
        """The anchor's value with the LoRA as it is (differentiable in the LoRA's weights)."""
        total = sum((lset.layer(n)(self.inputs[i]).float() ** 2).sum() for n, i in self.which.items())
        return total / self.base_energy


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.float(), b.float()
    return a.shape == b.shape and float((a - b).norm()) <= INPUT_TOLERANCE * max(float(b.norm()), 1e-12)
