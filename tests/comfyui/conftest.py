"""Fixtures of the in-process ComfyUI tests: the node pack loaded as ComfyUI loads it, and the demo model.

Imported lazily: the server tests (test_server.py, test_workflows.py) share this folder and run without
ComfyUI importable here; comfy_tiny skips the requesting test when ComfyUI does not import.
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def pack():
    """pack("nodes.train_node"): a module of this repository imported as ComfyUI imports the node pack."""
    from comfy_tiny import load_pack  # skips without ComfyUI (comfy_tiny.py)

    return load_pack()


@pytest.fixture(scope="module")
def demo(pack):
    """The demo model as its loader nodes give it: (MODEL, CLIP, VAE)."""
    tm = pack("nodes.toy_model")
    with torch.inference_mode():  # as a node: ComfyUI runs every node under inference mode
        return tm.load_toy_model(), tm.load_toy_clip(), tm.load_toy_vae()
