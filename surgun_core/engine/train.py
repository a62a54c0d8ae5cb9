"""The SurgUn loss of DESIGN.md section 1, one training step, and the training loop.

L_T = l(X_T, c_T)                    target images under the target prompt      (pushed up)
L_D = l(X_D, c_T)                    distractor images under the TARGET prompt  (pushed down)
L_C = max(log(L_D + d) - log(L_T + d), -cap)   log contrast: ascent whose push fades as L_T grows, and
                                     stops once the target has lost the competition (L_T >= e^cap * L_D)
L_R = |f(x_t, t, c_R) - f0(x_t, t, c_R)|^2   retain anchor against the frozen model ("output"), or for layers
                                     that read the prompt alone |dW u_R|^2 / |W u_R|^2 ("text", anchor.py)
L   = -w_A L_T + w_D L_D + w_C L_C + w_R L_R   (each term switchable in EraseConfig)

Robust mode conditions some target rows on the adversary's prompt (robust.py); the target/distractor part of L
is then taken per prompt group (the plain rows, the adversary's rows), each group's L_T and L_D its own means,
weighted by its rows. Over the batch mean the plain rows, erased early, pushed L_T past the cap and the
contrast stopped pushing on the adversary's rows too: on the toy world (circle, 200 steps) concept inversion
brought circles back in 0.225 of images with one mean, 0.025 with the groups apart.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..backends.base import Backend, cond_cat
from ..cache import ImageCache, default_cache_dir
from ..concepts import templates_for
from ..config import EraseConfig
from ..errors import Cancelled, ConfigError
from ..lora import LoRASet
from .anchor import TextAnchor, anchor_prompts, output_anchor
from .data import CondBank, generate_concept_images
from .robust import Adversary

log = logging.getLogger(__name__)

# progress(phase, done, total, stats): phase is "images" (generating training images) or "train"
# (front ends may add their own, such as "evaluate").
Progress = Callable[[str, int, int, dict], None]
Cancel = Callable[[], bool]


@dataclass
class TrainResult:
    """What the loop made: the LoRA (still attached: the model is erased until lora.detach()) and its record."""

    lora: LoRASet
    history: list[dict] = field(default_factory=list)  # per step: loss and its terms
    checkpoints: list[tuple[int, dict]] = field(default_factory=list)  # (step, LoRA state)
    steps_done: int = 0
    stopped: str | None = None  # why training ended early, if it did
    adversary: dict | None = None  # robust mode: the attacker's last tokens (an extension goes on from them)
    erased_at: int | None = None  # the checkpoint at which stop_at ended training (EraseConfig.stop_when_erased)


def surgun_loss(cfg: EraseConfig, L_T, L_D, L_R):
    """The SurgUn objective (DESIGN.md section 1). Returns (L, L_C)."""
    d = cfg.contrast_delta
    L_C = torch.log(L_D + d) - torch.log(L_T + d)
    if cfg.contrast_cap is not None:  # the target has lost once L_T >= e^cap * L_D: stop pushing it further
        L_C = L_C.clamp(min=-cfg.contrast_cap)
    A, D, C, R = (float(on) for on in (cfg.use_ascent, cfg.use_distractors, cfg.use_contrast, cfg.use_retain))
    L = -A * cfg.w_ascent * L_T + D * cfg.w_distract * L_D + C * cfg.w_contrast * L_C + R * cfg.w_retain * L_R
    return L, L_C


def train_delta(
    backend: Backend,
    cfg: EraseConfig,
    pattern: str,
    progress: Progress | None = None,
    cancel: Cancel | None = None,
    cache: ImageCache | None = None,
    checkpoint_every: int = 0,
    grad_hook: Callable[[LoRASet], None] | None = None,
    init_state: dict | None = None,
    first_step: int = 0,
    init_adversary: dict | None = None,
    stop_at: Callable[[LoRASet], bool] | None = None,
) -> TrainResult:
    """The SurgUn training loop on the attention layers matching `pattern`. Leaves the LoRA attached.

    Returns the LoRA, history and checkpoints; the orchestrator (surgun.erase) builds the delta.

    Args:
        checkpoint_every: keep the LoRA every N steps (and the last) for calibration; 0: none.
        grad_hook: called with the LoRA after each step's backward, before clipping (gradient localization).
        init_state, first_step: go on from a LoRA state (LoRASet.snapshot()) trained `first_step` steps already
            (surgun.erase's extension); steps are numbered from first_step + 1, with a fresh optimizer and
            learning-rate schedule over cfg.steps more; init_adversary: robust mode's attacker goes on from those
            tokens (TrainResult.adversary) rather than from the concept's word.
        stop_at: asked at each checkpoint with the LoRA as it is; True ends training there (TrainResult.erased_at).
    """
    progress = progress or (lambda *a: None)
    cancel = cancel or (lambda: False)
    cache = cache or ImageCache(default_cache_dir())
    templates = cfg.templates or list(templates_for(cfg.kind))
    distractors = cfg.resolved_distractors()
    if (cfg.use_distractors or cfg.use_contrast) and not distractors:
        raise ConfigError("distractors", "none left after removing the concepts; give at least one")
    targets = backend.lora_targets(pattern)  # raises when the pattern matches nothing

    # 1. Training images from the frozen model (cached per model fingerprint, prompt and seed).
    def on_image(done: int, total: int) -> None:
        _check(cancel)
        progress("images", done, total, {})

    def gen(names: list[str], seed_offset: int):
        return generate_concept_images(
            backend, names, templates, cfg.images_per_concept, cfg.seed + seed_offset, cfg.sample_steps,
            cfg.guidance, cache, on_image, cfg.sample_batch_size,
        )  # fmt: skip

    with backend.meter.phase("training images"):
        X_T = gen(cfg.concepts, 0)
        X_D = gen(distractors, 1) if distractors else None
        X_R = None
        if cfg.use_retain and not cfg.anchors_text:  # the text anchor needs the prompts alone (anchor_prompts)
            X_R = _retain_images(backend, cfg, cache) if cfg.retain_prompts else X_D
            if X_R is None:
                raise ConfigError("retain_prompts", "use_retain needs retain_prompts or distractors")
    R_prompts = _retain_prompt_table(cfg, X_R) if X_R is not None else None  # per retain image: its prompts
    bank = CondBank(backend, X_T.prompts + ([p for ps in R_prompts for p in ps] if R_prompts else []))

    # 2. LoRA on the chosen attention layers; the base stays frozen (no grads, no optimizer state).
    with torch.random.fork_rng(devices=[]):  # the LoRA's initial weights come from the seed too
        torch.manual_seed(cfg.seed)
        lset = LoRASet(targets, cfg.rank, cfg.alpha).attach()
    if init_state is not None:
        lset.restore(init_state)
    anchor = None
    if cfg.anchors_text:  # the layers' inputs for every retain prompt, captured once (anchor.py)
        with backend.meter.phase("training"):
            anchor = TextAnchor(backend, lset, anchor_prompts(cfg), cfg.sample_batch_size)
    params = list(lset.parameters())
    adversary = Adversary(backend, cfg, X_T, init_adversary) if cfg.robust else None  # robust mode's attacker
    same_template = _same_template_table(X_D, X_T) if cfg.distractor_same_template and X_D is not None else None
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    sched = None
    if cfg.lr_schedule == "cosine":  # to 0 at the last step: the run ends settled
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, cfg.steps)
                                                                                    / cfg.steps)))  # fmt: skip
    g = torch.Generator().manual_seed(cfg.seed + first_step)  # an extension draws batches of its own
    dev = backend.device
    result = TrainResult(lora=lset, steps_done=first_step)
    good = lset.snapshot()
    B = cfg.batch_size
    ckpt = cfg.gradient_checkpointing if cfg.gradient_checkpointing is not None else dev.type == "cuda"
    stack = contextlib.ExitStack()
    stack.enter_context(backend.gradient_checkpointing(ckpt))
    stack.enter_context(backend.meter.phase("training"))
    try:
        for step in range(cfg.steps):
            _check(cancel)
            if adversary is not None:
                adversary.refresh(step, first_step)
            # target batch: target images with their own (target) prompts (robust: some under the adversary's)
            it = torch.randint(0, len(X_T.prompts), (B,), generator=g)
            x_T = X_T.x0[it].to(dev, backend.dtype)
            batch = StepBatch(x_T, bank.batch([X_T.prompts[i] for i in it]), backend.objective.sample_t(B, g))
            if adversary is not None:
                batch.c_T, batch.adversary_rows = adversary.mix(batch.c_T, it)
            batch.noise_T = torch.randn(x_T.shape, generator=g).to(x_T)
            if cfg.use_distractors or cfg.use_contrast:
                # distractor batch: K distractors drawn afresh, their images under the TARGET prompts
                k = min(cfg.distractors_per_step, len(X_D.names))
                chosen = torch.randperm(len(X_D.names), generator=g)[:k]
                if cfg.distractor_same_template:  # each row: a chosen distractor's image drawn in its row's phrasing
                    who = chosen[torch.randint(0, len(chosen), (B,), generator=g)]
                    idd = same_template[it, who]
                else:
                    pool = torch.cat([X_D.of(int(i)) for i in chosen])
                    idd = pool[torch.randint(0, len(pool), (B,), generator=g)]
                batch.x_D = X_D.x0[idd].to(dev, backend.dtype)
                batch.noise_D = torch.randn(batch.x_D.shape, generator=g).to(batch.x_D)
            if X_R is not None:
                ir = torch.randint(0, len(X_R.prompts), (cfg.retain_rows,), generator=g)
                batch.x_R = X_R.x0[ir].to(dev, backend.dtype)
                n = len(R_prompts[0])  # one prompt an image unless retain_templates: then one drawn per row
                pick = torch.randint(0, n, (len(ir),), generator=g).tolist() if n > 1 else [0] * len(ir)
                batch.c_R = bank.batch([R_prompts[i][j] for i, j in zip(ir.tolist(), pick)])
                batch.noise_R = torch.randn(batch.x_R.shape, generator=g).to(batch.x_R)
            opt.zero_grad(set_to_none=True)
            L, L_T, L_D, L_C, L_R = surgun_backward(backend, cfg, lset, batch, anchor)
            if not torch.isfinite(L):
                result.stopped = f"non-finite loss at step {step + 1}; kept the LoRA of step {step}"
                log.warning(result.stopped)
                lset.restore(good)
                break
            if grad_hook is not None:
                grad_hook(lset)
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            if sched is not None:
                sched.step()
            if not all(torch.isfinite(p).all() for p in params):
                result.stopped = f"non-finite LoRA weights after step {step + 1}; kept the LoRA of step {step}"
                log.warning(result.stopped)
                lset.restore(good)
                break
            good = lset.snapshot()
            result.steps_done = first_step + step + 1
            stats = {"loss": L.item(), "L_T": L_T.item(), "L_D": L_D.item(), "L_C": L_C.item(), "L_R": L_R.item()}
            result.history.append({"step": result.steps_done, **stats})
            if checkpoint_every and (step + 1) % checkpoint_every == 0:
                result.checkpoints.append((result.steps_done, good))
                if stop_at is not None and result.steps_done >= cfg.stop_check_from and stop_at(lset):
                    result.erased_at = result.steps_done
                    progress("train", cfg.steps, cfg.steps, stats)  # done: the steps left are not needed
                    break
            progress("train", step + 1, cfg.steps, stats)
    except BaseException:
        lset.detach()  # cancelled or failed: the model is left as it was
        raise
    finally:
        stack.close()
    result.adversary = adversary.tokens if adversary is not None else None
    if checkpoint_every and (not result.checkpoints or result.checkpoints[-1][0] != result.steps_done):
        result.checkpoints.append((result.steps_done, lset.snapshot()))
    return result


def _check(cancel: Cancel) -> None:
    if cancel():
        raise Cancelled("erase cancelled by the user; nothing was written")


@dataclass
class StepBatch:
    """One training step's inputs: target images and prompts, timesteps, noise; distractors; retain images."""

    x_T: torch.Tensor  # (B, C, H, W) target images
    c_T: object  # their (target) prompts' conditioning, also the distractors' prompts
    t: torch.Tensor  # (B,) training timesteps, shared by the three batches (the retain batch takes the first ones)
    noise_T: torch.Tensor | None = None
    x_D: torch.Tensor | None = None  # distractor images (None: no distractor or contrast term)
    noise_D: torch.Tensor | None = None
    x_R: torch.Tensor | None = None  # retain images (None: no retain anchor)
    c_R: object | None = None
    noise_R: torch.Tensor | None = None
    adversary_rows: int = 0  # robust mode: the last rows of the target (and distractor) batch are the adversary's

    def groups(self) -> list[slice]:
        """The prompt groups the loss is taken over apart: all rows, or the plain rows and the adversary's."""
        B, n = len(self.x_T), self.adversary_rows
        return [slice(0, B - n), slice(B - n, B)] if 0 < n < B else [slice(0, B)]


def surgun_backward(backend: Backend, cfg: EraseConfig, lset: LoRASet, b: StepBatch,
                    anchor: TextAnchor | None = None):  # fmt: skip
    """The forwards of one step and the backward of L into the LoRA's gradients. Returns (L, L_T, L_D, L_C, L_R).

    L_R: `anchor` (the "text" retain anchor) when given, else the "output" anchor over the batch's retain rows.

    The backward runs in two parts so fewer activation graphs are alive at once (memory): L is linear in
    L_R, so the target/distractor part goes first, then the retain term's own forward and backward.
    A non-finite part adds no gradient; the caller sees it in the returned L.
    """
    zero = torch.zeros((), device=b.x_T.device)
    B = len(b.x_T)
    if b.x_D is None:
        per_T, per_D = backend.loss(b.x_T, b.c_T, b.noise_T, b.t), torch.zeros(B, device=b.x_T.device)
    else:  # one forward for both batches (same prompts, same timesteps): (2B,) per-sample losses
        per = backend.loss(torch.cat([b.x_T, b.x_D]), cond_cat([b.c_T, b.c_T]), torch.cat([b.noise_T, b.noise_D]),
                           torch.cat([b.t, b.t]))  # fmt: skip
        per_T, per_D = per[:B], per[B:]
    # each prompt group's own L_T and L_D (one group unless robust mode mixed in the adversary's rows)
    parts = [(g.stop - g.start) / B * surgun_loss(cfg, per_T[g].mean(), per_D[g].mean(), zero)[0] for g in b.groups()]
    L_TD = sum(parts)
    if torch.isfinite(L_TD) and L_TD.requires_grad:
        L_TD.backward()
    L_T, L_D = per_T.mean().detach(), per_D.mean().detach()
    if anchor is not None:
        L_R = anchor(lset)
    elif b.x_R is not None:
        L_R = output_anchor(backend, lset, b.x_R, b.c_R, b.t[: len(b.x_R)], b.noise_R)
    else:
        L_R = zero
    L_all, L_C = surgun_loss(cfg, L_T, L_D, L_R)  # the one expression over the whole batch
    L_Rpart = L_all - surgun_loss(cfg, L_T, L_D, zero)[0]  # its retain part: L(T, D, R) - L(T, D, 0), T and D held
    if torch.isfinite(L_Rpart) and L_Rpart.requires_grad:
        L_Rpart.backward()
    L = L_TD.detach() + L_Rpart.detach()  # the whole objective's value
    return L, L_T, L_D, L_C, L_R.detach()  # L_C is of detached terms already


def _same_template_table(X_D, X_T) -> torch.Tensor:
    """(target image i, distractor w) -> the index of w's image drawn in the phrasing of target image i (the same
    place in the templates' cycle: generate_concept_images cycles every concept's images through the templates
    alike)."""
    table = torch.empty(len(X_T.prompts), len(X_D.names), dtype=torch.long)
    for c in range(len(X_T.names)):
        for place, i in enumerate(X_T.of(c).tolist()):
            for w in range(len(X_D.names)):
                own = X_D.of(w)
                table[i, w] = own[place % len(own)]
    return table


def _retain_prompt_table(cfg: EraseConfig, X_R) -> list[list[str]]:
    """Each retain image's prompts: its own, or (retain_templates, over the distractors' images) its concept's."""
    if cfg.retain_prompts or not cfg.retain_templates:
        return [[p] for p in X_R.prompts]
    return [[t.format(X_R.names[int(i)]) for t in cfg.retain_templates] for i in X_R.concept]


def _retain_images(backend, cfg, cache):
    """Images for user-given retain prompts, each prompt taken literally (no templates)."""
    return generate_concept_images(backend, cfg.retain_prompts, ["{}"], max(2, cfg.images_per_concept // 4),
                                   cfg.seed + 2, cfg.sample_steps, cfg.guidance, cache,
                                   batch_size=cfg.sample_batch_size)  # fmt: skip
