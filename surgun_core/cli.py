"""The `surgun` command: a thin front end over EraseConfig and one core call per subcommand."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import ClassVar

from .errors import SurgUnError

log = logging.getLogger("surgun")


class TqdmProgress:
    """progress(phase, done, total, stats) -> a tqdm bar per phase."""

    LABELS: ClassVar[dict[str, str]] = {
        "images": "generating training images",
        "train": "erasing",
        "evaluate": "sampling before/after",
        "localize": "localizing (short run per block group)",
        "calibrate": "calibrating (scoring checkpoints)",
    }

    def __init__(self) -> None:
        self.bar, self.phase = None, None

    def __call__(self, phase: str, done: int, total: int, stats: dict) -> None:
        from tqdm import tqdm

        if phase != self.phase:
            self.close()
            self.phase, self.bar = phase, tqdm(total=total, desc=self.LABELS.get(phase, phase), leave=False)
        self.bar.total = total
        self.bar.n = done
        if stats:
            keys = ("loss", "L_T", "L_D", "erase", "retain")
            self.bar.set_postfix({k: f"{v:.3f}" for k, v in stats.items() if k in keys})
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def cmd_demo(a) -> int:
    from .demo import run_demo

    bar = TqdmProgress()
    overrides = {"steps": a.steps} if a.steps else {}
    try:
        r = run_demo(a.concept, a.out, a.json, seeds_per_pair=a.seeds, progress=bar, **overrides)
    finally:
        bar.close()
    print(f"\nSurgUn demo: erased {r['concept']!r} from the toy model in {r['seconds']:.1f} s "
          f"(peak memory {r['peak_mem_mb']:.0f} MB)")  # fmt: skip
    print("  metric  value   meaning")
    for k, meaning in (("ua", "erased concept no longer drawn"), ("ira", "other concepts of that kind kept"),
                       ("cra", "the other kind kept"), ("h", "harmonic mean of UA, IRA, CRA"),
                       ("drift", "mean pixel change on retain prompts")):  # fmt: skip
        print(f"  {k:<6}  {r[k]:.3f}   {meaning}")
    print(f"  delta: {r['delta']}\n  grid:  {r['grid']}")
    return 0


def cmd_erase(a) -> int:
    from .backends.diffusers import load_diffusers_folder
    from .config import EraseConfig
    from .errors import ConfigError

    settings = json.loads(Path(a.config).read_text()) if a.config else {}
    settings.update({"concepts": a.concept, "kind": a.kind})
    for key in ("steps", "lr", "rank", "alpha", "blocks", "seed", "device", "precision"):
        if getattr(a, key) is not None:
            settings[key] = getattr(a, key)
    if a.distractor:
        settings["distractors"] = a.distractor
    cfg = EraseConfig.from_dict(settings)
    out = Path(a.out)
    if out.suffix != ".safetensors":
        raise ConfigError("out", f"{out.name!r}: the delta file must end in .safetensors")
    backend = load_diffusers_folder(a.model, device=cfg.device, precision=cfg.precision)
    from .surgun import erase

    bar = TqdmProgress()
    try:
        result = erase(backend, cfg, progress=bar)
    finally:
        bar.close()
    result.delta.save(out)
    print(f"wrote {out} ({len(result.delta.weights)} layers, {result.steps_done} steps, {result.seconds:.1f} s)")
    if result.stopped:
        print(f"note: {result.stopped}")
    return 0


def cmd_bench(a) -> int:
    from .bench import format_markdown, run_bench

    bar = TqdmProgress()
    try:
        report = run_bench(a.concepts, a.methods, quick=a.quick, seeds_per_pair=a.seeds, out_dir=a.out,
                           json_path=a.json, progress=bar, fresh=a.fresh,
                           collect=a.collect)  # fmt: skip
    finally:
        bar.close()
    print(format_markdown(report))
    print(f"written: {Path(a.out) / 'bench.md'}, {a.json or Path(a.out) / 'bench.json'} and calibration plots")
    return 0


def cmd_toy_train(a) -> int:
    import shutil

    import torch

    from .toyworld.classifier import save_classifier, train_classifier
    from .toyworld.model import CLASSIFIER_FILE, MODEL_DIR
    from .toyworld.train import train_toy_model

    out = Path(a.out) if a.out else MODEL_DIR
    torch.set_num_threads(a.threads)  # float results depend on the thread count; the shipped run used 1
    if a.classifier:
        log.info("training the ground-truth classifier")
        save_classifier(train_classifier(seed=a.seed), CLASSIFIER_FILE)
    staging = Path(a.work) / "model"
    train_toy_model(staging, Path(a.work), steps=a.steps, seed=a.seed)
    tmp = out.with_name(f".{out.name}.tmp")  # swap in whole: never a half-copied model folder
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(staging, tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    print(f"toy model written to {out}")
    if a.eval_seeds:
        return cmd_toy_eval(argparse.Namespace(seeds=a.eval_seeds, json=None, model=str(out)))
    return 0


def cmd_toy_eval(a) -> int:
    from .backends.diffusers import load_diffusers_folder
    from .io import write_json
    from .toyworld import TOY_GUIDANCE, load_toy_backend, load_toy_classifier
    from .toyworld import evaluate as ev

    if a.model:
        backend = load_diffusers_folder(a.model, device="cpu")
        backend.default_guidance = TOY_GUIDANCE
    else:
        backend = load_toy_backend()
    table = ev.accuracy_table(ev.generate_toy(backend, ev.toy_prompts(a.seeds)), load_toy_classifier())
    print(ev.format_table(table))
    worst = min(min(v) for v in table.values())
    print(f"\nworst pair accuracy: {worst:.2f} ({a.seeds} seeds per pair, guidance {backend.default_guidance})")
    if a.json:
        write_json(a.json, {f"{s}/{c}": {"shape": v[0], "colour": v[1]} for (s, c), v in table.items()})
    return 0


def cmd_ui(a) -> int:
    try:
        from surgun_ui.app import launch
    except ImportError as e:
        raise SurgUnError(f"`surgun ui` needs gradio ({e}); install it with: pip install 'surgun[ui]'") from None
    from surgun_ui.hosts import StandaloneHost

    launch(StandaloneHost(a.model, a.lora_dir, a.device), a.address, a.port)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="surgun", description="Erase a visual concept from a diffusion model.")
    p.add_argument("-v", "--verbose", action="store_true", help="log details")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="erase a concept from the embedded toy model and measure it")
    d.add_argument("--concept", default="circle", help="a toy shape or colour (default: circle)")
    d.add_argument("--out", default="surgun-out", help="folder for the delta, the grid PNG and the metrics")
    d.add_argument("--json", help="write the metrics JSON here (default: in --out)")
    d.add_argument("--steps", type=int, help="training steps (default: the toy recipe)")
    d.add_argument("--seeds", type=int, default=8, help="evaluation seeds per prompt")
    d.set_defaults(func=cmd_demo)

    e = sub.add_parser("erase", help="erase a concept from a diffusers model folder")
    e.add_argument("--model", required=True, help="diffusers model folder (with model_index.json)")
    e.add_argument("--concept", required=True, action="append", help="concept to erase (repeatable)")
    e.add_argument("--distractor", action="append", help="distractor concept (repeatable; default: built-in list)")
    e.add_argument("--kind", default="object", help="object or style")
    e.add_argument("--out", required=True, help="the delta to write (.safetensors)")
    e.add_argument("--config", help="JSON file of further EraseConfig settings")
    for name, typ in (("steps", int), ("lr", float), ("rank", int), ("alpha", float), ("blocks", str),
                      ("seed", int), ("device", str), ("precision", str)):  # fmt: skip
        e.add_argument(f"--{name}", type=typ)
    e.set_defaults(func=cmd_erase)

    b = sub.add_parser("bench", help="SurgUn, its ablations, ESD, UCE and CA on the toy world, one table")
    b.add_argument("--quick", action="store_true", help="one concept, main methods, shorter ESD and CA")
    b.add_argument("--json", help="write the JSON here (default: OUT/bench.json)")
    b.add_argument("--out", default="surgun-bench", help="folder for bench.md, bench.json and plots")
    b.add_argument("--methods", nargs="+", help="methods to run (default: all; --quick: the main ones)")
    b.add_argument("--concepts", nargs="+", help="toy concepts (default: every shape and colour)")
    b.add_argument("--seeds", type=int, help="seeds per (shape, colour) pair and prompt (default 2, quick 1)")
    b.add_argument(
        "--fresh",
        action="store_true",
        help="run every method again instead of reusing the finished "
        "runs recorded in OUT/runs (a run is redone anyway when its settings or code changed)",
    )
    b.add_argument(
        "--collect",
        action="store_true",
        help="run nothing: build the table from the runs recorded in "
        "OUT/runs so far (after runs split over processes, or an interrupted one); lists what is missing",
    )
    b.set_defaults(func=cmd_bench)

    u = sub.add_parser("ui", help="the SurgUn tab as a standalone web app (needs gradio: pip install surgun[ui])")
    u.add_argument("--model", help="diffusers model folder (default: the embedded toy model)")
    u.add_argument("--lora-dir", default="models/Lora", help="where erasure LoRA files are saved")
    u.add_argument("--address", default="127.0.0.1", help="address to listen on (default: this machine only)")
    u.add_argument("--port", type=int, default=7860)
    u.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    u.set_defaults(func=cmd_ui)

    t = sub.add_parser("toyworld", help="the toy world: train or evaluate its model")
    tsub = t.add_subparsers(dest="toy_command", required=True)
    tt = tsub.add_parser("train", help="reproduce the shipped toy weights from a fixed seed (resumable)")
    tt.add_argument("--steps", type=int, default=2000)
    tt.add_argument("--seed", type=int, default=0)
    tt.add_argument("--work", default="toyworld-work", help="checkpoint folder; rerun to resume")
    tt.add_argument("--out", help="model folder to write (default: the shipped weights folder)")
    tt.add_argument("--threads", type=int, default=1, help="CPU threads (the shipped weights used 1)")
    tt.add_argument("--classifier", action="store_true", help="also retrain the ground-truth classifier")
    tt.add_argument("--eval-seeds", type=int, default=16, help="seeds per pair for the accuracy table (0: skip)")
    tt.set_defaults(func=cmd_toy_train)
    te = tsub.add_parser("eval", help="per-pair accuracy table of the toy model")
    te.add_argument("--seeds", type=int, default=16)
    te.add_argument("--model", help="model folder (default: the shipped toy model)")
    te.add_argument("--json")
    te.set_defaults(func=cmd_toy_eval)
    return p


def _quiet_libraries() -> None:
    """The command shows its own bars; hide transformers'/diffusers' per-file loading bars and notices."""
    from diffusers.utils import logging as dl
    from transformers.utils import logging as tl

    for lib in (dl, tl):
        lib.disable_progress_bar()
        lib.set_verbosity_error()


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    if not a.verbose:
        _quiet_libraries()
    try:
        return a.func(a)
    except SurgUnError as e:
        print(f"surgun: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("surgun: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
