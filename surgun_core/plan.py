"""What an erase will cost, before any work (`surgun erase --plan`): forwards per phase, peak memory, seconds.

Forwards. erase() (surgun.py) counts every denoiser sample-forward by phase (meter.py: one row through the
denoiser is 1, a row whose output is back-propagated 3). count_forwards() derives the same counts from the
config and the model alone, phase for phase, in the meter's own phase names:
  reference/probe images        the base model's probe images, judged first: the retain bar (and for
  reference/judging              localization's probe set too, when it has fewer seeds and first fit is on)
  training images               the training images, drawn by the first training run; the later runs find
                                 them in the image cache
  localization/training images  the same, when localization's first short run comes first (no first fit)
  localization/training          localize_method "gradient": localize_batches steps on every group at once;
                                 "short-runs": per candidate group (localize.candidate_groups) localize_steps
  localization/probe images      "short-runs": per group, the probe set (localize_probe_seeds seeds) drawn
  localization/judging           with its LoRA on, and the judge on those images
  training                       per full run, steps x the forwards of one step (engine/train.surgun_backward),
                                 and extend_steps more when no checkpoint erased (the most)
  calibration/probe images       per scored checkpoint, the probe set (probe_seeds seeds; calibrate_signal
  calibration/judging            "self": the retained concepts' rows only), and the judge on those images
  calibration/self-judging       "self": per scored checkpoint, the erased model classifies the held-out images
                                 (self_judge_images per concept, drawn once under reference/probe images) over
                                 the probe labels at self_judge_timesteps
  training/self-judging          the same at every checkpoint while training from stop_check_from on, with
                                 stop_when_erased (training stops at the first that erases; calibration reads
                                 those verdicts again)
What the judge sees decides part of the work (surgun.erase): calibration measures checkpoints latest first and
stops at the first that fits or does not erase (so a run that is extended had one measured: its last). With
blocks="auto" and localize_first_fit the widest group (every level's cross-attention K/V) gets a full run first
and is kept when its chosen step erases without a retain fall; else short runs rank the other groups (first fit
among them too) and a second full run trains the chosen blocks. The plan gives the most (the widest group let go
after measuring every checkpoint, every other group run, a second run whose last checkpoint does not erase,
extended and its extension measured in full) and the fewest (the widest group kept on its last checkpoint).
A sampler step is one row per image, two with classifier-free guidance (guidance != 1; sampling._guided).
One training step: the target and distractor batches in one forward with a backward (3 per row, 2B rows;
B rows without distractors or contrast), and with the "output" retain anchor its no-grad reference (1 per row) and
its forward with a backward (3 per row); the "text" anchor runs none a step, one per retain prompt (and 2) once a
run (anchor_forwards). The diffusion judge: images x timesteps x labels, each label inside
the image's own prompt.
The plan assumes empty caches (no training image and no localization cached) and, for the most, that every
step runs (stop_when_erased stops at the first checkpoint that erases: the fewest stops at the first one);
cached images cost nothing, so a rerun costs less.

Memory: plan_memory.estimate_memory, at the largest batch of each kind (the training step's, and the
largest no-grad one: training images or probe images with guidance, or the judge's batches).

Seconds (time_forwards, on CUDA by default, on CPU with `--plan --time`): one training step and one sampler
step are timed; seconds per sample-forward of each times the forwards of the training phases and of the
no-grad phases (images, probe images, judging).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

from .backends.base import Backend
from .config import EraseConfig
from .engine.anchor import anchor_prompts
from .engine.localize import candidate_groups
from .judges.checkpoint import calibration_probe
from .judges.probe import judge_for, needs_judge, probe_set
from .judges.scorers import DiffusionScorer, Scorer
from .meter import total
from .plan_memory import MemoryEstimate, estimate_memory
from .plan_timing import time_forwards
from .registry import SCORER_NAMES

log = logging.getLogger(__name__)

PROBE_SAMPLE_BATCH = 64  # images per sampler call in judges/probe.score_probe (Backend.sample's default)


@dataclass
class Plan:
    """The cost of erase(backend, cfg) before it runs: forwards per phase, memory, and (when timed) seconds."""

    forwards_by_phase: dict[str, int]  # the most an erase can cost (count_forwards' defaults)
    fewest_by_phase: dict[str, int]  # the fewest: the widest group kept, its last checkpoint fits
    architecture: str
    recipe: str
    device: str
    precision: str
    candidate_groups: int  # localization's block groups (0: fixed blocks)
    checkpoints: int  # checkpoints kept per full run for calibration (0: no calibration)
    assumptions: list[str] = field(default_factory=list)
    memory: MemoryEstimate | None = None
    memory_note: str = ""  # why there is no memory estimate, if there is none
    seconds_per_forward: dict[str, float] | None = None  # "training", "inference"
    extremes: str = ""  # when an erase costs the fewest and when the most

    @property
    def forwards(self) -> int:
        return total(self.forwards_by_phase)

    @property
    def fewest(self) -> int:
        return total(self.fewest_by_phase)

    @property
    def seconds_by_phase(self) -> dict[str, float] | None:
        if self.seconds_per_forward is None:
            return None
        return {k: v * self.seconds_per_forward[regime(k)] for k, v in self.forwards_by_phase.items()}

    @property
    def seconds(self) -> float | None:
        by = self.seconds_by_phase
        return None if by is None else sum(by.values())

    def to_dict(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k != "memory"}
        out.update(forwards=self.forwards, fewest=self.fewest, seconds_by_phase=self.seconds_by_phase,
                   seconds=self.seconds, memory=self.memory.to_dict() if self.memory else None)  # fmt: skip
        return out


def regime(phase: str) -> str:
    """ "training" for phases that train (a LoRA step), else "inference" (sampling and judging: no grad)."""
    return "training" if phase.rsplit("/", 1)[-1] == "training" else "inference"


def plan_erase(backend: Backend, cfg: EraseConfig, *, scorer: Scorer | None = None, time_it: bool | None = None,
               memory: bool = True) -> Plan:  # fmt: skip
    """The plan of erase(backend, cfg, scorer=scorer). Nothing is trained, sampled or written.

    Args:
        time_it: time one training step and one sampler step (real work on the model, metered under the
            phase "plan timing"); None: on CUDA only.
        memory: estimate the peak memory (a shape-only trace of one forward).
    """
    auto = cfg.localizes
    groups = len(candidate_groups(backend, cfg.localize_attention)) if auto else 0
    ckpts = n_checkpoints(cfg)
    first_fit = cfg.fits_widest_first  # fewest: the widest group kept, its last checkpoint fits
    probe = calibration_probe(cfg)  # fewest: every retained probe image unchanged: the judge reuses the base's label
    unchanged = len(probe.rows()) - len([r for r in probe.rows() if r[1] in probe.erased])
    early = [_first_judged(cfg)] if cfg.stops_when_erased else None  # fewest: the first checkpoint judged erases
    fewest = count_forwards(backend, cfg, scorer, full_runs=[1 if first_fit else min(1, ckpts)],
                            groups_run=0 if first_fit else None,
                            reused=unchanged if ckpts or first_fit else 0, extended=0, trained=early)  # fmt: skip
    plan = Plan(count_forwards(backend, cfg, scorer), fewest, backend.architecture, cfg.recipe or "(none)",
                str(backend.device), str(backend.dtype).removeprefix("torch."), groups, ckpts,
                _assumptions(cfg))  # fmt: skip
    plan.extremes = _extremes(cfg, first_fit)
    if memory:
        try:
            rows = largest_no_grad_batch(backend, cfg, scorer)
            plan.memory = estimate_memory(backend, cfg, inference_rows=rows, checkpoints=ckpts)
        except Exception as e:  # a backend whose forward the shape-only trace cannot follow: say so, keep the plan
            plan.memory_note = f"not estimated: the shape-only trace failed ({type(e).__name__}: {e})"
            log.warning("memory %s", plan.memory_note)
    if time_it if time_it is not None else backend.device.type == "cuda":
        plan.seconds_per_forward = time_forwards(backend, cfg)
    return plan


def _extremes(cfg: EraseConfig, first_fit: bool) -> str:
    """When the erase costs the fewest forwards and when the most, in words."""
    stop = cfg.stops_when_erased
    where = (f"the first checkpoint judged while training (step {_first_judged(cfg)}) erases (training stops there)"
             if stop else "the last checkpoint erases")  # fmt: skip
    if first_fit:
        return (f"fewest: when the judge keeps the widest block group: {where} with no retain fall; the most: when "
                "it lets it go and every other group runs")  # fmt: skip
    if not cfg.calibrate:
        return ""
    more = f", {cfg.extend_steps} more," if cfg.extend_steps else ""
    return (f"fewest: when {where} with no retain fall, measured alone; the most: when no checkpoint erases: every "
            f"step runs{more} and the last run's checkpoints are all measured")  # fmt: skip


def _assumptions(cfg: EraseConfig) -> list[str]:
    out = ["empty caches: no training image and no localization cached yet (cached ones cost nothing)"]
    if not cfg.stops_when_erased:  # else it stops at the first checkpoint the erased model reads as erased
        out.append(f"every training step runs ({cfg.steps}; a non-finite loss would end training early)")
    if cfg.extend_steps and cfg.calibrate:
        out.append(f"the most: no checkpoint erases, so {cfg.extend_steps} steps more are trained and calibrated")
    if cfg.scorer != "diffusion":
        out.append(f"the {cfg.scorer} judge does not use the denoiser: judging costs no sample-forwards")
    return out


# ---- forwards ----------------------------------------------------------------------------------------------


def count_forwards(backend: Backend, cfg: EraseConfig, scorer: Scorer | None = None, *,
                   full_runs: list[int] | None = None, groups_run: int | None = None,
                   reused: int = 0, extended: int | None = None,
                   trained: list[int] | None = None) -> dict[str, int]:  # fmt: skip
    """Sample-forwards per meter phase that erase(backend, cfg, scorer=scorer) does (phases with none left out).

    What the judge decides sets these, so they are arguments (default: the most an erase can cost):
        full_runs: checkpoints scored in each full training run, in order (first fit: the widest group's
            run, then, if it let retain fall, the localized blocks' run; otherwise one run).
        groups_run: localization's short runs (0 when the widest group was kept).
        reused: calibration's probe images the judge did not see again (unchanged from the base model's:
            judges/probe.same_image); 0: every one judged (the most).
        extended: steps trained beyond cfg.steps because no checkpoint erased (cfg.extend_steps when
            calibrating: the most; 0 when the first run erased).
        trained: steps each full run trained before any extension (stop_when_erased stops a run at the first
            checkpoint that erases; default: cfg.steps each, the most).
    outcome_of(backend, cfg, result) reads them all from a finished erase.
    """
    auto, first_fit = cfg.localizes, cfg.fits_widest_first
    gradient = cfg.localize_method == "gradient"  # one run of localize_batches steps, no probe images
    ckpts = n_checkpoints(cfg)
    if extended is None:
        extended = cfg.extend_steps if cfg.calibrate else 0
    if full_runs is None:  # first fit: the widest group's run scored in full (or its last step), then another
        full_runs = [ckpts or 1, ckpts] if first_fit else [ckpts]
        if extended:  # no checkpoint erased: "self" stopped at the last one ("probe" scored all), then the extension's
            full_runs[-1] = (1 if cfg.scan_stops_unerased else ckpts) + n_checkpoints(cfg, extended)
    if groups_run is None:
        groups_run = (1 if gradient else len(candidate_groups(backend, cfg.localize_attention)) - first_fit) * auto
    rows = 1 if cfg.guidance == 1.0 else 2  # rows per image per sampler step
    probe = probe_set(cfg)  # localization's (short runs); calibration's: calibration_probe
    judge = _judge_cost(backend, cfg, scorer)
    labels = len(probe.labels)
    n_probe = len(calibration_probe(cfg).rows())
    n_self = len(cfg.concepts) * cfg.self_judge_images if cfg.calibrate_signal == "self" else 0
    n_loc = labels * len(probe.templates) * min(cfg.probe_seeds, cfg.localize_probe_seeds)  # fewer seeds
    out: dict[str, int] = {}

    def add(phase: str, n: int) -> None:
        out[phase] = out.get(phase, 0) + n

    def score(phase: str, n_images: int, times: int = 1) -> None:  # judges/probe.score_probe, `times` times
        add(f"{phase}/probe images", times * n_images * cfg.probe_steps * rows)
        add(f"{phase}/judging", times * judge(n_images, labels))

    if cfg.scores_base:  # erase() scores the base model first (the retain bar) and draws "self"'s images
        score("reference", n_probe)
        add("reference/probe images", n_self * cfg.probe_steps * rows)  # "self": the held-out images
    # localization's own probe set (short runs with fewer seeds than calibration's, or all rows where "self" draws
    # the retained ones only)
    own = cfg.localize_probe_seeds < cfg.probe_seeds or cfg.calibrate_signal == "self"  # not calibration's set
    if groups_run and first_fit and not gradient and own:
        score("reference", n_loc)
    # the training images are drawn once, by the first training run (later runs find them in the image cache):
    # without first fit that is localization's first short run
    images = "localization/training images" if auto and not first_fit else "training images"
    add(images, training_images(cfg) * cfg.sample_steps * rows)
    add("localization/training", groups_run * ((cfg.localize_batches if gradient else cfg.localize_steps)
        * step_forwards(cfg) + anchor_forwards(cfg)))  # fmt: skip
    score("localization", n_loc, 0 if gradient else groups_run)
    trained = [cfg.steps] * len(full_runs) if trained is None else trained
    add("training", (sum(trained) + extended) * step_forwards(cfg)
        + (len(trained) + bool(extended)) * anchor_forwards(cfg))  # fmt: skip
    score("calibration", n_probe, sum(full_runs))
    add("calibration/judging", -judge(reused, labels))
    self_judged = n_self * cfg.self_judge_timesteps * labels  # one checkpoint's verdict
    if cfg.stops_when_erased:  # every checkpoint judged while training; calibration reads those verdicts again
        judged = sum(_judged(cfg, s) for s in trained) + _judged(cfg, extended, first=cfg.steps)
        add("training/self-judging", judged * self_judged)
    else:
        add("calibration/self-judging", sum(full_runs) * self_judged)
    return {k: v for k, v in sorted(out.items()) if v}


def outcome_of(backend: Backend, cfg: EraseConfig, result) -> dict:
    """What the judge decided in a finished erase(backend, cfg) (an EraseResult), as count_forwards' arguments:
    count_forwards(backend, cfg, **outcome_of(backend, cfg, result)) is its result.forwards_by_phase."""
    scored = len(result.calibration.curve) if result.calibration else 0
    reused = sum(r.get("reused", 0) for r in result.calibration.curve) if result.calibration else 0
    loc = result.localization
    runs = (1 if cfg.localize_method == "gradient" else len(loc.groups)) if loc else 0  # localization's runs
    extended = result.extended_steps  # the extension's checkpoints are in the curve (scored) already
    last = result.steps_done - extended  # the last run's steps before its extension
    if not cfg.fits_widest_first:
        return {"full_runs": [scored], "groups_run": runs, "reused": reused, "extended": extended, "trained": [last]}
    widest = max(candidate_groups(backend, cfg.localize_attention), key=lambda g: len(g.modules))
    if loc.chosen == [widest.name]:  # kept after its full run (the others skip it)
        return {"full_runs": [scored if cfg.calibrate else 1], "groups_run": 0, "reused": reused,
                "extended": extended, "trained": [last]}  # fmt: skip
    # let go: its last checkpoint did not fit; calibration scored down to the first that fits or does not erase
    return {"full_runs": [result.let_go_scored, scored], "groups_run": runs, "reused": reused, "extended": extended,
            "trained": [result.let_go_steps, last]}  # fmt: skip


def training_images(cfg: EraseConfig) -> int:
    """Images the frozen model draws for training (engine/train.train_delta): targets, distractors, retain."""
    n = len(cfg.concepts) * cfg.images_per_concept + len(cfg.resolved_distractors()) * cfg.images_per_concept
    if cfg.use_retain and cfg.retain_prompts and not cfg.anchors_text:  # their own images (train._retain_images)
        n += len(cfg.retain_prompts) * max(2, cfg.images_per_concept // 4)
    return n


def step_forwards(cfg: EraseConfig) -> int:
    """Sample-forwards of one training step (engine/train.surgun_backward), a backward counting 2."""
    B = cfg.batch_size
    n = 3 * B * (2 if cfg.use_distractors or cfg.use_contrast else 1)  # target (+ distractor) batch, backward
    if cfg.use_retain and not cfg.anchors_text:
        R = cfg.retain_rows
        n += R + 3 * R  # the frozen reference (no grad), then the LoRA's forward with its backward
    return n  # the "text" anchor runs no denoiser forward a step (anchor_forwards: once a run)


def anchor_forwards(cfg: EraseConfig) -> int:
    """Sample-forwards a training run spends on the "text" retain anchor's inputs (engine/anchor.TextAnchor): two
    for the first prompt (the check that the layers read the prompt alone), then one for each retain prompt."""
    return 2 + len(anchor_prompts(cfg)) if cfg.anchors_text else 0


def n_checkpoints(cfg: EraseConfig, steps: int | None = None) -> int:
    """Checkpoints calibration scores: every checkpoint_interval steps, and the last step if not one of them;
    `steps`: of a run that long at the same interval (the extension)."""
    if not cfg.calibrate:
        return 0
    every, steps = cfg.checkpoint_interval, cfg.steps if steps is None else steps
    return steps // every + (1 if steps % every else 0)


def _first_judged(cfg: EraseConfig) -> int:
    """The first checkpoint the erased model judges while training (stop_when_erased): the first multiple of
    checkpoint_interval from stop_check_from on, at most cfg.steps."""
    every = cfg.checkpoint_interval
    return min(cfg.steps, max(every, -(-cfg.stop_check_from // every) * every))


def _judged(cfg: EraseConfig, steps: int, first: int = 0) -> int:
    """Checkpoints the erased model judges while training `steps` steps after the first `first` (stop_when_erased):
    every checkpoint_interval steps of the run, numbered from first + 1, that reach stop_check_from (a last step
    that is not one of them is not judged while training)."""
    every = cfg.checkpoint_interval
    return max(0, steps // every - max(0, cfg.stop_check_from - first - 1) // every)


def _judge(backend: Backend, cfg: EraseConfig, scorer: Scorer | None) -> Scorer | None:
    """The judge erase() uses: `scorer`, else cfg.scorer's as make_scorer builds it (the diffusion judge; the toy
    classifier and CLIP judge without the denoiser, so their cost is none)."""
    if scorer is None and cfg.scorer == "diffusion":
        return judge_for(cfg, backend)
    return scorer


def _judge_cost(backend: Backend, cfg: EraseConfig, scorer: Scorer | None):
    """(images, labels) -> sample-forwards of one judging call."""
    judge = _judge(backend, cfg, scorer)
    if isinstance(judge, DiffusionScorer):  # every image x timestep under every label, inside its own prompt
        return lambda n, labels: n * judge.timesteps * labels
    return lambda n, labels: 0


assert set(SCORER_NAMES) == {"diffusion", "toy", "clip"}  # a new judge needs its cost in _judge_cost


def largest_no_grad_batch(backend: Backend, cfg: EraseConfig, scorer: Scorer | None = None) -> int:
    """Rows of erase's largest no-grad forward: training or probe images (x2 with guidance), or a judge batch."""
    rows = 1 if cfg.guidance == 1.0 else 2
    probe = len(probe_set(cfg).rows())
    out = [rows * min(cfg.sample_batch_size, training_images(cfg)), rows * min(cfg.sample_batch_size, probe)]
    judge = _judge(backend, cfg, scorer)
    judged = scorer is not None or needs_judge(cfg)
    if judged and isinstance(judge, DiffusionScorer):
        out.append(min(judge.batch_size, probe * judge.timesteps))  # one label prompt at a time over the batch
    return max(out)


# ---- report ------------------------------------------------------------------------------------------------


def format_plan(plan: Plan) -> str:
    """A readable table: phase, forwards (the most, and the fewest where the judge can end a stage early),
    share, seconds when timed; then memory and what the plan assumes."""
    secs = plan.seconds_by_phase
    few = plan.fewest_by_phase != plan.forwards_by_phase
    head = f"{'phase':<32} {'forwards':>12}" + (f" {'fewest':>12}" if few else "") + f" {'share':>7}"
    lines = [f"plan: {plan.architecture}, recipe {plan.recipe}, {plan.precision} on {plan.device}",
             head + (f" {'seconds':>9}" if secs else "")]  # fmt: skip
    rows = [(k, v, plan.fewest_by_phase.get(k, 0), secs[k] if secs else 0.0) for k, v in plan.forwards_by_phase.items()]
    rows.append(("total", plan.forwards, plan.fewest, plan.seconds or 0.0))
    for phase, n, f, sec in rows:
        row = f"{phase:<32} {n:>12,}" + (f" {f:>12,}" if few else "") + f" {n / max(1, plan.forwards):>7.1%}"
        lines.append(row + (f" {sec:>9.1f}" if secs else ""))
    if plan.candidate_groups:
        lines.append(f"localization: {plan.candidate_groups} candidate block groups")
    if plan.checkpoints:
        lines.append(f"calibration: {plan.checkpoints} checkpoints")
    if few and plan.extremes:
        lines.append(plan.extremes)
    m = plan.memory
    if m is not None:
        lines.append(f"estimated peak memory: {m.peak_mb:,.0f} MB (training step {m.training_peak_mb:,.0f} MB "
                     f"at {m.train_rows} rows, checkpointing {'on' if m.checkpointing else 'off'}; largest no-grad "
                     f"batch {m.inference_peak_mb:,.0f} MB at {m.inference_rows} rows; weights "
                     f"{m.weights_mb + m.other_weights_mb:,.0f} MB)")  # fmt: skip
    elif plan.memory_note:
        lines.append(f"memory: {plan.memory_note}")
    lines.append(f"seconds: the most, from {plan.seconds_per_forward}" if secs else
                 "seconds: not timed (on a GPU they are; on a CPU add --time)")  # fmt: skip
    lines += [f"assumes: {a}" for a in plan.assumptions]
    return "\n".join(lines)
