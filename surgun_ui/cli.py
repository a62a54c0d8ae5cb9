"""`surgun ui`: registered into the `surgun` command through the entry-point group "surgun.commands"."""

from __future__ import annotations

import argparse

from surgun_core.errors import SurgUnError


def register(sub: argparse._SubParsersAction) -> None:
    """Add `surgun ui` to the command's subparsers (argparse only: nothing heavy is imported here)."""
    u = sub.add_parser("ui", help="the SurgUn tab as a standalone web app (needs gradio: pip install surgun[ui])")
    u.add_argument("--model", help="diffusers model folder (default: the embedded toy model)")
    u.add_argument("--lora-dir", default="models/Lora", help="where erasure LoRA files are saved")
    u.add_argument("--address", default="127.0.0.1", help="address to listen on (default: this machine only)")
    u.add_argument("--port", type=int, default=7860)
    u.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    u.set_defaults(handler="surgun_ui.cli:run")


def run(a) -> int:
    try:
        from .app import launch
    except ImportError as e:
        raise SurgUnError(f"`surgun ui` needs gradio ({e}); install it with: pip install 'surgun[ui]'") from None
    from .hosts import StandaloneHost

    launch(StandaloneHost(a.model, a.lora_dir, a.device), a.address, a.port)
    return 0
