"""The `surgun` command: the parser, and a thin front end over one core call per subcommand.

Each subcommand's work lives in surgun_core/commands/ and is imported only when that subcommand runs, so
`surgun --help` stays fast. Other packages add subcommands through the entry-point group "surgun.commands"
(a function that takes the subparsers): the UI package registers `surgun ui` that way, so the core never imports
a front end.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from .commands import interrupt
from .errors import Cancelled, ConfigError, SurgUnError

log = logging.getLogger("surgun")
PLUGIN_GROUP = "surgun.commands"
MODEL_CONFIG_HELP = ("for a single-file checkpoint of a non-standard size: a diffusers folder with its configs "
                     "(model_index.json, unet/, ...); standard SD1.x/2.x/SDXL files need none")  # fmt: skip


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
    d.add_argument("--audit", action="store_true", help="also attack the erasure (concept inversion, prefix, concept "
                   "vector, phrasings): recovery in the JSON and the delta's header (surgun.audit)")  # fmt: skip
    d.add_argument("--robust", action="store_true", help="robust mode: train against an adversary that learns a "
                   "token to bring the concept back (slower); implies --audit")  # fmt: skip
    d.set_defaults(handler="surgun_core.commands.demo:run")

    e = sub.add_parser("erase", help="erase a concept from a diffusers model folder")
    e.add_argument("--model", required=True, help="diffusers model folder (with model_index.json); `toy`: the "
                   "embedded toy model")  # fmt: skip
    e.add_argument("--model-config", help=MODEL_CONFIG_HELP)
    e.add_argument("--concept", required=True, action="append", help="concept to erase (repeatable)")
    e.add_argument("--distractor", action="append", help="distractor concept (repeatable; default: built-in list)")
    e.add_argument("--kind", help="object or style (default: the --config file's, else object)")
    e.add_argument("--out", help="the delta to write (.safetensors); not needed with --plan")
    e.add_argument("--plan", action="store_true", help="print the cost (sample-forwards per phase, estimated peak "
                   "memory; seconds on a GPU) and stop: nothing is trained or written")  # fmt: skip
    e.add_argument("--time", action="store_true", help="with --plan on a CPU: time one training and sampler step")
    e.add_argument("--config", help="JSON file of further EraseConfig settings")
    for name, typ in (("steps", int), ("lr", float), ("rank", int), ("alpha", float), ("blocks", str),
                      ("seed", int), ("device", str), ("precision", str)):  # fmt: skip
        e.add_argument(f"--{name}", type=typ)
    e.add_argument("--robust", action="store_const", const=True, help="robust mode: train against an adversary "
                   "that learns a token to bring the concept back (concept inversion); slower")  # fmt: skip
    e.set_defaults(handler="surgun_core.commands.erase:run")

    pr = sub.add_parser("probe", help="before/after images of a delta and the judge's erase/retain scores")
    pr.add_argument("--model", default="toy", help="model folder; `toy` (the default) is the embedded toy model")
    pr.add_argument("--model-config", help=MODEL_CONFIG_HELP)
    pr.add_argument("--delta", help="the erasure LoRA (.safetensors); without it, the base model alone")
    pr.add_argument("--strength", type=float, default=1.0, help="delta strength (default 1; 0.5 erases half way)")
    pr.add_argument("--concept", action="append", help="erased concept (repeatable; default: the delta's)")
    pr.add_argument("--kind", help="object or style (default: the delta's, else object)")
    pr.add_argument("--retain", action="append", help="retained concept to score (repeatable; default: the "
                    "delta's distractors, else built-in ones of the kind)")  # fmt: skip
    pr.add_argument("--prompt", action="append", help="your own prompt to draw before and after (repeatable)")
    pr.add_argument("--seeds", type=int, default=2, help="seeds per prompt (default 2)")
    pr.add_argument("--scorer", default="diffusion", help="the judge: diffusion (the base model), toy or clip")
    pr.add_argument("--out", default="surgun-probe", help="folder for the grid PNG and the scores JSON")
    pr.add_argument("--json", help="write the scores JSON here (default: in --out)")
    pr.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    pr.add_argument("--precision", default="float32", help="float32, bfloat16 or float16 (GPU)")
    pr.set_defaults(handler="surgun_core.commands.probe:run")

    ap = sub.add_parser("apply", help="bake a delta into a checkpoint (a single .safetensors file or a folder)")
    ap.add_argument("--model", required=True, help="the base model: a single-file .safetensors checkpoint (SD1.x, "
                    "SD2.x, SDXL), a diffusers folder, or `toy`")  # fmt: skip
    ap.add_argument("--model-config", help=MODEL_CONFIG_HELP)
    ap.add_argument("--delta", required=True, help="the erasure LoRA (.safetensors) to merge")
    ap.add_argument("--strength", type=float, default=1.0, help="delta strength (default 1; 0.5 erases half way)")
    ap.add_argument(
        "--out",
        required=True,
        help="NAME.safetensors: a single-file checkpoint (the input's key "
        "layout); any other name: a new (or empty) diffusers folder. Written whole or not at all",
    )
    ap.set_defaults(handler="surgun_core.commands.apply:run")

    au = sub.add_parser("audit", help="attack an erasure (model + delta): how much of the concept comes back")
    au.add_argument("--model", default="toy", help="the base model: folder, single .safetensors, or `toy` (default)")
    au.add_argument("--model-config", help=MODEL_CONFIG_HELP)
    au.add_argument("--delta", required=True, help="the erasure LoRA (.safetensors) to audit")
    au.add_argument("--concept", help="the erased concept (default: the delta's header)")
    au.add_argument("--kind", help="object or style (default: the delta's header)")
    au.add_argument("--attack", action="append", help="an attack to run (repeatable; default: all: inversion, "
                    "prefix, concept_vector, phrasings)")  # fmt: skip
    au.add_argument("--seed", type=int, default=0, help="seed of every attack (same seed, same figures)")
    au.add_argument("--out", default="surgun-audit", help="folder for the report JSON and the image grid")
    au.add_argument("--json", help="write the report JSON here (default: in --out)")
    au.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    au.add_argument("--precision", default="float32", help="float32, bfloat16 or float16 (GPU)")
    au.set_defaults(handler="surgun_core.commands.audit:run")

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
    b.add_argument("--attacks", nargs="+", help="also attack every erased model (e.g. inversion prefix): a recovery "
                   "column per attack, the base model's recovery as the control")  # fmt: skip
    b.add_argument(
        "--sweep",
        action="store_true",
        help="fair baselines: run ESD-x, ESD-u and CA over a small grid of learning rates and iterations on one "
        "concept (recorded in OUT/sweep, resumable; OUT/sweep.json keeps the best); later runs with the same --out "
        "add the esd-x-tuned, esd-u-tuned and ca-tuned rows",
    )
    b.set_defaults(handler="surgun_core.commands.bench:run")

    for ep in _plugins():  # subcommands other packages register (`surgun ui`)
        ep.load()(sub)

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
    tt.set_defaults(handler="surgun_core.commands.toyworld:run_train")
    te = tsub.add_parser("eval", help="per-pair accuracy table of the toy model")
    te.add_argument("--seeds", type=int, default=16)
    te.add_argument("--model", help="model folder (default: the shipped toy model)")
    te.add_argument("--json")
    te.set_defaults(handler="surgun_core.commands.toyworld:run_eval")
    return p


def _plugins():
    from importlib.metadata import entry_points  # stdlib, but slow to import: only once main's try is entered

    return sorted(entry_points(group=PLUGIN_GROUP), key=lambda ep: ep.name)


def _handler(spec: str):
    """ "package.module:function" -> the function (the module is imported now, not at start-up)."""
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def _quiet_libraries() -> None:
    """The command shows its own bars; hide transformers'/diffusers' per-file loading bars and notices."""
    from diffusers.utils import logging as dl
    from transformers.utils import logging as tl

    for lib in (dl, tl):
        lib.disable_progress_bar()
        lib.set_verbosity_error()


def main(argv: list[str] | None = None) -> int:
    """The console entry point: exit 0, 2 for a usage error (a setting, ConfigError), 1 for a failure (another
    SurgUnError, an OSError while writing), 130 for Ctrl-C; one line on stderr, the traceback only with -v.

    Everything that can take time (plugins, torch, diffusers) is imported inside the try, so Ctrl-C while the
    libraries load ends in one line too; this module imports nothing slow at the top. A library that turned
    the interrupt into another error, or swallowed it, does not change that (commands/interrupt.py).
    """
    verbose = False
    with interrupt.recording():
        try:
            with interrupt.deferred():  # Ctrl-C inside torch's start-up can abort the process: raised after it
                a = build_parser().parse_args(argv)
                verbose = a.verbose
                logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                                    format="%(levelname)s %(message)s")  # fmt: skip
                if not verbose:
                    _quiet_libraries()
                command = _handler(a.handler)
            interrupt.check()  # pressed while the libraries loaded
            return command(a)
        except KeyboardInterrupt:
            return _fail("interrupted; nothing was written", 130, verbose, prefix="surgun: ")
        except Exception as e:
            if interrupt.pressed():  # an import cut short by Ctrl-C, reported by the library as its own error
                return _fail("interrupted; nothing was written", 130, verbose, prefix="surgun: ")
            if isinstance(e, Cancelled):
                return _fail(str(e), 130, verbose, prefix="surgun: ")
            if isinstance(e, ConfigError):
                return _fail(str(e), 2, verbose)
            if isinstance(e, SurgUnError):
                return _fail(str(e), 1, verbose)
            if isinstance(e, OSError):  # a write or read the commands did not foresee: one line, not a traceback
                where = f" ({e.filename})" if e.filename else ""
                return _fail(f"{e.strerror or e}{where}", 1, verbose)
            raise


def _fail(message: str, code: int, verbose: bool, prefix: str = "surgun: error: ") -> int:
    if verbose:
        log.error("traceback (shown because of -v):", exc_info=True)
    print(prefix + message, file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
