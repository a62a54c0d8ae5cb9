"""Checkpoint calibration (DESIGN.md section 1): which training step to ship.

The LoRA is kept every N steps; each checkpoint is measured for erase and retain (judges/checkpoint.py: by default
the erased model's own verdict on held-out images of the concept, and the judged probe images of the retained
concepts), latest first: the latest that erases with no retain fall against the base model ships (bench ablation: on
the toy world the last step scored H >= the calibrated one on every concept, and the earlier rule shipped step 80 of
200 on four concepts, costing retention on two; but some concepts let retain fall late: erasing "ring", the ground
truth's retain went 1.00, 0.85, 0.74 at steps 40, 60, 120, triangles drawn as rings). With the erased model's own
verdict (fixed images: an earlier checkpoint erases less) the scan stops at the first checkpoint that does not erase
(`stop_unerased`); judged probe images scan every checkpoint. When none fits, among the scored checkpoints that
reach the erase threshold, those whose retain is within a tolerance of the best retain tie; of these the one that
erases most is chosen, and of equals the latest. If none reaches the threshold, the best harmonic mean. Why the
latest of equals (DESIGN.md said the earliest): probe scores saturate, and a checkpoint that first reaches 1.0 is on
the edge; on the toy world ("red", ground-truth judge, 20 images) the earliest saturated step still let 5% through
where the later ones, scored the same on the probe, let none. The tolerance (a probe image or two) keeps a retain
difference that is noise from deciding. The whole curve is returned, stored in the delta's metadata and drawn as a
PNG (charts.plot_curve), so a user can see why that step was chosen.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

from ..backends.base import Backend
from ..errors import Cancelled
from ..judges.checkpoint import Measure
from ..judges.probe import ProbeScores, fits
from ..lora import LoRASet

log = logging.getLogger(__name__)


@dataclass
class CalibrationResult:
    chosen_step: int
    threshold: float
    reason: str
    curve: list[dict] = field(default_factory=list)  # {"step", "erase", "retain", "h"} per checkpoint

    def to_dict(self) -> dict:
        return asdict(self)


def choose_step(curve: list[dict], threshold: float, tolerance: float = 0.0) -> tuple[int, str]:
    """The documented rule over {"step", "erase", "retain", "h"} rows (step order). Returns (step, why).

    The last checkpoint ships unless the judge sees retain fall there: it does when it reaches erase >=
    threshold with retain within `tolerance` of the best retain of the checkpoints that reach it. Otherwise,
    among the checkpoints with erase >= threshold, those with retain >= (their best retain - tolerance):
    highest erase, then latest; none reaches the threshold: highest h (then earliest).
    """
    if not curve:
        raise ValueError("calibration needs at least one checkpoint")
    ok = [r for r in curve if r["erase"] >= threshold]
    last = curve[-1]
    top = max(r["retain"] for r in (ok or curve))
    if last in ok and last["retain"] >= top - tolerance - 1e-9:
        return last["step"], (f"the last step: erase >= {threshold:g}, retain within {tolerance:g} of the best "
                              f"({top:.2f}): no retain fall (erase {last['erase']:.2f}, retain "
                              f"{last['retain']:.2f})")  # fmt: skip
    if ok:
        best = max([r for r in ok if r["retain"] >= top - tolerance - 1e-9], key=lambda r: (r["erase"], r["step"]))
        return best["step"], (f"retain fell at the last step; erase >= {threshold:g} with retain within "
                              f"{tolerance:g} of the best ({top:.2f}): the most erased, then the latest (erase "
                              f"{best['erase']:.2f}, retain {best['retain']:.2f})")  # fmt: skip
    best = min(curve, key=lambda r: (-r["h"], r["step"]))
    return best["step"], f"no step reached erase {threshold:g}: the best harmonic mean of erase and retain"


def calibrate(backend: Backend, lora: LoRASet, checkpoints: list[tuple[int, dict]], measure: Measure,
              threshold: float = 0.9, tolerance: float = 0.0, reference: ProbeScores | None = None,
              progress=None, cancel=None, stop_unerased: bool = True) -> CalibrationResult:  # fmt: skip
    """Score the checkpoints with `measure` (judges/checkpoint.py); leave `lora` holding the chosen one.

    With the base model's own scores (`reference`), checkpoints are scored latest first and the first that
    reaches the erase threshold with retain within `tolerance` of the base model's ships (the judge sees no retain
    fall there; erasure grows and retain falls with the steps, so it is the most erased one that keeps retain);
    the earlier ones are not scored. With `stop_unerased` the scan also stops at the first checkpoint that does not
    erase: an earlier one, trained less, erases less (the orchestrator then trains longer when the last one did
    not). That holds for the erased model's own verdict on fixed images ("self"), not for drawn probe images in
    robust mode, where the adversary keeps erasure swinging between checkpoints (toy world, yellow: step 200 read
    0.875, step 160 erased and held against inversion; stopping at 200 trained 60 steps more and shipped a
    checkpoint that inversion brought back in 0.275 of images). When none fits, choose_step decides among the
    scored ones; without a reference every checkpoint is scored.

    Args:
        lora: the attached LoRASet the checkpoints were taken from.
        checkpoints: (step, LoRASet.snapshot()) in step order.
    """
    progress = progress or (lambda *a: None)
    rows: dict[int, dict] = {}
    progress("calibrate", 0, len(checkpoints), {})

    def score(step: int, state: dict) -> dict:
        if cancel is not None and cancel():
            raise Cancelled("erase cancelled by the user during calibration; nothing was written")
        lora.restore(state)
        with backend.meter.phase("calibration"):
            sc = measure(lora)
        rows[step] = {"step": step, "erase": sc.erase, "retain": sc.retain, "h": sc.h, "reused": sc.reused}
        log.info("calibration: step %5d  erase %.2f  retain %.2f", step, sc.erase, sc.retain)
        progress("calibrate", len(rows), len(checkpoints), {"erase": sc.erase, "retain": sc.retain})
        return rows[step]

    if reference is not None:  # latest first: the first that fits ships, the earlier ones are not scored
        for step, state in reversed(checkpoints):
            row = score(step, state)
            if fits(row["erase"], row["retain"], threshold, reference.retain, tolerance):
                which = "the last step" if step == checkpoints[-1][0] else f"step {step}, the latest that fits"
                why = (f"{which}: erase {row['erase']:.2f} >= {threshold:g} and retain {row['retain']:.2f} "
                       f"within {tolerance:g} of the base model's ({reference.retain:.2f}); earlier steps not "
                       "scored")  # fmt: skip
                progress("calibrate", len(checkpoints), len(checkpoints), {})
                return CalibrationResult(step, threshold, why, [rows[s] for s, _ in checkpoints if s in rows])
            if stop_unerased and row["erase"] < threshold:
                break
        progress("calibrate", len(checkpoints), len(checkpoints), {})  # the earlier ones are not scored
    else:
        for step, state in checkpoints:
            score(step, state)
    curve = [rows[step] for step, _ in checkpoints if step in rows]
    chosen, why = choose_step(curve, threshold, tolerance)
    lora.restore(dict(checkpoints)[chosen])
    return CalibrationResult(chosen, threshold, why, curve)
