"""Localization (DESIGN.md section 1): which attention blocks should carry the erasure.

Candidate groups are attention blocks grouped by resolution level (UNet: down/mid/up x channel width, for
cross-attention K/V or self-attention) or by depth (DiT: early/middle/late thirds of the blocks). Two ways to
rank them (EraseConfig.localize_method):
  gradient    (default, saliency.py) a few SurgUn steps on every level at once; each level scored by its
              share of the loss's Adam gain (sum |grad|); the levels carrying localize_mass of it are kept. No probe
              image: it costs localize_batches training steps.
  short-runs  (the paper's pixel-grounded diagnostic) each group gets a short SurgUn run restricted to it;
              probe images (fixed seeds) are generated and scored for erase and retain; the groups that reach
              the erase threshold with the best retain are kept (else the best harmonic mean). Suppression
              works from almost any block; retention is block-selective (paper), so the ranking is mostly a
              retain ranking. It costs a short run and a judged probe set per group: on the toy world more
              than the erase it located, and the widest set it could choose scored best (README).
Results are cached per (model fingerprint, concepts, settings).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from ..backends.base import Backend
from ..cache import ImageCache, default_cache_dir
from ..config import EraseConfig
from ..errors import ConfigError
from ..io import write_json
from ..judges.probe import ProbeSet, Reference, fits, judge_for, probe_set, score_probe
from ..judges.scorers import Scorer
from ..registry import ATTENTION_KINDS
from .saliency import choose_by_mass, gradient_shares
from .train import train_delta

log = logging.getLogger(__name__)

_UNET_LEVEL = re.compile(r"^(down_blocks|up_blocks|input_blocks|output_blocks)\.(\d+)\.|^(mid_block|middle_block)\.")
_DIT_BLOCK = re.compile(r"^(transformer_blocks|double_blocks|single_blocks|joint_blocks)\.(\d+)\.")
ALL_CROSS = "cross all levels"
_SIDE = {"down_blocks": "down", "input_blocks": "down", "up_blocks": "up", "output_blocks": "up"}


@dataclass
class BlockGroup:
    name: str  # e.g. "cross down 640", "self up 320", "dit middle"
    modules: list[str]

    @property
    def pattern(self) -> str:
        """A regular expression matching exactly this group's layers (EraseConfig.blocks accepts it)."""
        return "^(?:" + "|".join(re.escape(m) for m in self.modules) + ")$"


@dataclass
class LocalizeResult:
    chosen: list[str]  # names of the chosen groups, best first
    pattern: str  # regular expression over the chosen groups' layers
    groups: list[dict] = field(default_factory=list)  # every group: name, layers, erase, retain, h (ranked)
    seconds: float = 0.0
    cached: bool = False
    reason: str = ""  # why these groups

    def to_dict(self) -> dict:
        return asdict(self)


def candidate_groups(backend: Backend, attention: str = "cross") -> list[BlockGroup]:
    """The attention block groups of `backend`'s denoiser, in model order.

    Args:
        attention: "cross" (cross-attention K/V, UNets), "self" (self-attention), or "all".
    Returns:
        One group per (attention kind, level); DiTs (no separate cross-attention): early/middle/late thirds.
    """
    if attention not in ATTENTION_KINDS:
        raise ConfigError("localize_attention", f"unknown {attention!r}; choose one of {', '.join(ATTENTION_KINDS)}")
    linears = backend.attention_linears()
    blocks = sorted({(m.group(1), int(m.group(2))) for n in linears if (m := _DIT_BLOCK.match(n))})
    wanted = {"cross": ("cross", "joint"), "self": ("self", "joint"), "all": ("cross", "self", "joint")}[attention]
    groups: dict[str, list[str]] = {}
    for name, mod in linears.items():
        if ".attn2." in name:  # cross-attention: its K/V read the prompt (the SurgUn default layers)
            kind = "cross" if re.search(r"\.(to_k|to_v)$", name) else None
        else:  # self-attention (attn1) or a DiT's joint text-image attention
            kind = "self" if ".attn1." in name else "joint"
        if kind not in wanted:
            continue
        if m := _UNET_LEVEL.match(name):  # UNet: resolution level = side and channel width
            level = f"{_SIDE.get(m.group(1) or '', 'mid')} {_width(name, mod)}"
        elif m := _DIT_BLOCK.match(name):  # DiT: depth third of its block stack
            same = [i for s, i in blocks if s == m.group(1)]
            level = ("early", "middle", "late")[min(2, 3 * same.index(int(m.group(2))) // len(same))]
            level = level if m.group(1) == "transformer_blocks" else f"{m.group(1)} {level}"
        else:
            continue
        groups.setdefault(f"{kind} {level}", []).append(name)
    if not groups:
        raise ConfigError("blocks", "found no attention block groups to localize over; give blocks explicitly "
                          "(a preset or a regular expression)")  # fmt: skip
    # every level's cross-attention K/V together: on the toy world this wide set beat every pair of levels
    # (bench ablation "no localization": H 0.998 against 0.987), so it competes with the levels
    cross = [m for k, v in groups.items() if k.startswith("cross ") for m in v]
    if len([k for k in groups if k.startswith("cross ")]) > 1:
        groups[ALL_CROSS] = cross
    return [BlockGroup(k, v) for k, v in groups.items()]


def widest_group(backend: Backend, attention: str = "cross") -> BlockGroup:
    """The candidate group with the most layers (UNets: every level's cross-attention K/V together)."""
    return max(candidate_groups(backend, attention), key=lambda g: len(g.modules))


def _width(name: str, mod) -> int:
    """The attention's inner width (the level's channel count in SD UNets): to_out reads it, to_q/k/v write it."""
    return mod.in_features if name.endswith(("to_out.0", "to_out")) else mod.out_features


def choose_groups(rows: list[dict], threshold: float, keep: int) -> list[str]:
    """`keep` groups: those reaching erase >= threshold, best retain first (ties: higher erase), then, while
    fewer than `keep` reach it, the others by harmonic mean (more capacity for a concept a short run on one
    group did not erase).

    Args:
        rows: dicts with name, erase, retain, h.
    Returns:
        Up to `keep` group names, best first.
    """
    ok = sorted([r for r in rows if r["erase"] >= threshold], key=lambda r: (-r["retain"], -r["erase"]))
    rest = sorted([r for r in rows if r["erase"] < threshold], key=lambda r: (-r["h"], -r["erase"]))
    return [r["name"] for r in (ok + rest)[:keep]]


def localize(backend: Backend, cfg: EraseConfig, scorer: Scorer | None, probe: ProbeSet, *, progress=None, cancel=None,
             cache: ImageCache | None = None, cache_dir: Path | None = None,
             reference: Reference | None = None, skip: tuple[str, ...] = ()) -> LocalizeResult:  # fmt: skip
    """Short runs on the candidate groups; return the chosen ones.

    With cfg.localize_first_fit and `reference` (the base model's scores on a probe set: a callable
    probe -> ProbeScores), groups run widest first and the first that reaches the erase threshold with retain
    within cfg.retain_tolerance of the base model's is chosen; the rest are not run. Otherwise (or when none
    fits) every group runs and choose_groups keeps the best cfg.localize_keep. Groups named in `skip` (one
    the orchestrator already tried in full) are left out.

    Cached in memory, and on disk next to the image cache's folder (`cache`, default SURGUN_CACHE) unless
    `cache_dir` names another; an ImageCache without a folder keeps it off disk.
    """
    t0 = time.time()
    progress = progress or (lambda *a: None)
    groups = [g for g in candidate_groups(backend, cfg.localize_attention) if g.name not in skip]
    if not groups:
        raise ConfigError("blocks", f"no block group left to localize over after {', '.join(skip)}; give blocks "
                          "explicitly (a preset or a regular expression)")  # fmt: skip
    probe = replace(probe, seeds=probe.seeds[: cfg.localize_probe_seeds])  # fewer seeds: a cheaper, noisier ranking
    folder = cache_dir if cache_dir is not None else _cache_folder(cache)
    key = _key(backend, cfg, scorer, probe, groups)
    hit = _load(folder, key)
    if hit is not None:
        log.info("localization: cached result %s", hit.chosen)
        return hit
    if cfg.localize_method == "gradient":
        result = _by_gradient(backend, cfg, groups, progress, cancel, cache, t0)
        _store(folder, key, result)
        return result
    short = _short_config(cfg)
    progress("localize", 0, len(groups), {})
    base = None  # the base model's retain: with it, the first group that fits stops the ranking
    if cfg.localize_first_fit and reference is not None:
        groups = sorted(groups, key=lambda g: -len(g.modules))  # widest first: the all-levels K/V set
        base = reference(probe).retain
    with backend.meter.phase("localization"):
        rows = _rank(backend, cfg, short, groups, scorer, probe, progress, cancel, cache, base)
    fit = [r for r in rows if base is not None and fits(r["erase"], r["retain"], cfg.erase_threshold, base,
                                                        cfg.retain_tolerance)]  # fmt: skip
    if fit:
        chosen = [fit[0]["name"]]
        why = (f"first fit, widest first: erase >= {cfg.erase_threshold:g} with retain within "
               f"{cfg.retain_tolerance:g} of the base model's; {len(groups) - len(rows)} group(s) not run")  # fmt: skip
    else:
        chosen = choose_groups(rows, cfg.erase_threshold, cfg.localize_keep)
        why = f"best {cfg.localize_keep} of {len(rows)}: erase >= {cfg.erase_threshold:g}, then best retain"
    by_name = {g.name: g for g in groups}
    modules = list(dict.fromkeys(m for name in chosen for m in by_name[name].modules))  # groups may overlap
    ranked = sorted(rows, key=lambda r: chosen.index(r["name"]) if r["name"] in chosen else len(chosen) + 1)
    result = LocalizeResult(chosen, BlockGroup("chosen", modules).pattern, ranked, time.time() - t0, reason=why)
    _store(folder, key, result)
    return result


def _rank(backend, cfg, short, groups, scorer, probe, progress, cancel, cache, base=None) -> list[dict]:
    """A short SurgUn run per group, its probe images scored: one row (name, layers, erase, retain, h) each.
    With the base model's retain (`base`), it stops after the first group that fits (probe.fits)."""
    rows = []
    for i, grp in enumerate(groups):
        res = train_delta(backend, short, grp.pattern, cancel=cancel, cache=cache)
        try:  # probe images drawn with the group's LoRA on; the judge sees the base model (LoRA off)
            sc = score_probe(backend, scorer, probe, cfg.probe_steps, cfg.guidance, judge=res.lora.disabled,
                             batch_size=cfg.sample_batch_size)  # fmt: skip
        finally:
            res.lora.detach()
        rows.append({"name": grp.name, "layers": len(grp.modules), "erase": sc.erase, "retain": sc.retain,
                     "h": sc.h})  # fmt: skip
        log.info("localization: %-22s erase %.2f retain %.2f", grp.name, sc.erase, sc.retain)
        progress("localize", i + 1, len(groups), {"erase": sc.erase, "retain": sc.retain})
        if base is not None and fits(sc.erase, sc.retain, cfg.erase_threshold, base, cfg.retain_tolerance):
            progress("localize", len(groups), len(groups), {})
            break
    return rows


def _by_gradient(backend, cfg, groups, progress, cancel, cache, t0) -> LocalizeResult:
    """cfg.localize_method "gradient" (saliency.py): the levels (not their union) ranked by gradient share."""
    levels = [g for g in groups if g.name != ALL_CROSS] or groups
    progress("localize", 0, 1, {})
    with backend.meter.phase("localization"):
        rows = gradient_shares(backend, cfg, levels, cancel, cache)
    chosen = choose_by_mass(rows, cfg.localize_mass)
    progress("localize", 1, 1, {"groups": len(chosen)})
    by_name = {g.name: g for g in levels}
    modules = list(dict.fromkeys(m for name in chosen for m in by_name[name].modules))
    why = (
        f"the {len(chosen)} of {len(rows)} groups carrying {sum(r['share'] for r in rows[: len(chosen)]):.2f} "
        f"(>= {cfg.localize_mass:g}) of the SurgUn loss's Adam gain (sum |grad|) over {cfg.localize_batches} steps"
    )
    return LocalizeResult(chosen, BlockGroup("chosen", modules).pattern, rows, time.time() - t0, reason=why)


def group_line(row: dict) -> str:
    """One ranked group as text (node and report outputs): its gradient share or its short run's scores."""
    if "share" in row:
        return f"{row['name'][:24]:<24} {row['layers']:>6}  gradient share {row['share']:.2f}"
    return f"{row['name'][:24]:<24} {row['layers']:>6}  erase {row['erase']:.2f}  retain {row['retain']:.2f}"


def localize_for(backend: Backend, cfg: EraseConfig, progress=None, cancel=None,
                 cache: ImageCache | None = None) -> LocalizeResult:  # fmt: skip
    """Localization alone, with the erasure's own probe set and scorer (the SurgUn Localize node's call)."""
    probe = probe_set(cfg)
    return localize(backend, cfg, judge_for(cfg, backend), probe, progress=progress, cancel=cancel, cache=cache)


def _short_config(cfg: EraseConfig) -> EraseConfig:
    return replace(cfg, steps=cfg.localize_steps, checkpoint_every=0)


def _key(backend: Backend, cfg: EraseConfig, scorer: Scorer | None, probe: ProbeSet, groups: list[BlockGroup]) -> str:
    settings = {k: v for k, v in cfg.to_dict().items() if k not in ("extra", "steps", "checkpoint_every",
                                                                      "calibrate", "blocks")}  # fmt: skip
    judge = scorer.name if scorer is not None else None  # "gradient" localization judges nothing
    raw = json.dumps([backend.fingerprint(), backend.sampler_id(), settings, judge, asdict(probe),
                      [g.name for g in groups]], sort_keys=True, default=str)  # fmt: skip
    return hashlib.sha256(raw.encode()).hexdigest()[:32]


def _cache_folder(cache: ImageCache | None) -> Path | None:
    images = cache.folder if cache is not None else default_cache_dir()
    return None if images is None else images.parent / "localize"


_MEMORY: dict[str, dict] = {}


def clear_memory_cache() -> None:
    """Forget localizations done in this process (the benchmark times each method from scratch)."""
    _MEMORY.clear()


def _load(folder: Path | None, key: str) -> LocalizeResult | None:
    data = _MEMORY.get(key)
    if data is None and folder is not None and (folder / f"{key}.json").is_file():
        try:
            data = json.loads((folder / f"{key}.json").read_text())
        except (OSError, ValueError) as e:  # a damaged entry is recomputed, never trusted
            log.warning("ignoring damaged localization cache %s (%s)", key, e)
    if data is None:
        return None
    return LocalizeResult(**{**data, "cached": True})


def _store(folder: Path | None, key: str, result: LocalizeResult) -> None:
    data = {**result.to_dict(), "cached": False}
    _MEMORY[key] = data
    if folder is not None:
        write_json(folder / f"{key}.json", data)
