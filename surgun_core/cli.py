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
from importlib.metadata import entry_points

from .errors import SurgUnError

log = logging.getLogger("surgun")
PLUGIN_GROUP = "surgun.commands"


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
    d.set_defaults(handler="surgun_core.commands.demo:run")

    e = sub.add_parser("erase", help="erase a concept from a diffusers model folder")
    e.add_argument("--model", required=True, help="diffusers model folder (with model_index.json)")
    e.add_argument("--concept", required=True, action="append", help="concept to erase (repeatable)")
    e.add_argument("--distractor", action="append", help="distractor concept (repeatable; default: built-in list)")
    e.add_argument("--kind", help="object or style (default: the --config file's, else object)")
    e.add_argument("--out", required=True, help="the delta to write (.safetensors)")
    e.add_argument("--config", help="JSON file of further EraseConfig settings")
    for name, typ in (("steps", int), ("lr", float), ("rank", int), ("alpha", float), ("blocks", str),
                      ("seed", int), ("device", str), ("precision", str)):  # fmt: skip
        e.add_argument(f"--{name}", type=typ)
    e.set_defaults(handler="surgun_core.commands.erase:run")

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
    a = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        if not a.verbose:
            _quiet_libraries()
        return _handler(a.handler)(a)
    except SurgUnError as e:
        print(f"surgun: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("surgun: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
