"""Shared test settings: CPU threads, no on-disk image cache (tests must not depend on earlier runs)."""

import os

import pytest
import torch

# One thread on a shared developer machine (oversubscribed threads make tiny models 100x slower); CI's
# machine runs nothing else, so it uses both cores.
torch.set_num_threads(int(os.environ.get("SURGUN_TEST_THREADS", "2" if os.environ.get("CI") else "1")))
os.environ["SURGUN_CACHE"] = ""  # in-memory cache only


@pytest.fixture(scope="session")
def toy_backend():
    from surgun_core.toyworld import load_toy_backend

    return load_toy_backend()


@pytest.fixture(scope="session")
def toy_classifier():
    from surgun_core.toyworld import load_toy_classifier

    return load_toy_classifier()
