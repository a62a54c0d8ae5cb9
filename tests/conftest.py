"""Shared test settings: CPU threads, no on-disk image cache (tests must not depend on earlier runs)."""

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

# One thread on a shared developer machine (oversubscribed threads make tiny models 100x slower); CI's
# machine runs nothing else, so it uses both cores.
torch.set_num_threads(int(os.environ.get("SURGUN_TEST_THREADS", "2" if os.environ.get("CI") else "1")))
os.environ["SURGUN_CACHE"] = ""  # in-memory cache only
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def toy_backend():
    from surgun_core.toyworld import load_toy_backend

    return load_toy_backend()


@pytest.fixture(scope="session")
def toy_classifier():
    from surgun_core.toyworld import load_toy_classifier

    return load_toy_classifier()


@pytest.fixture(scope="module")
def pack():
    """The repository root as a package, the way ComfyUI loads it (nodes/ reaches the core through it)."""
    name = "surgun_pack_tests"
    spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    yield mod
    for m in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        del sys.modules[m]
