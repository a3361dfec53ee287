"""Shared fixtures: seeding and the device list (CPU, plus CUDA when present)."""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

_REPO = Path(__file__).resolve().parents[1]
# `python -m pytest` (unlike `pytest`) puts the checkout on sys.path, where `import opcm_ext`
# would find the source folder without its compiled modules. Unless this is an editable
# install (the modules are built into the checkout), test the installed package.
if "opcm_ext" not in sys.modules and not any((_REPO / "opcm_ext").glob("_C*.so")):
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _REPO]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def available_devices() -> list[str]:
    """CPU always; CUDA when torch sees a GPU."""
    devs = ["cpu"]
    if torch.cuda.is_available():
        devs.append("cuda")
    return devs


@pytest.fixture(autouse=True, scope="session")
def _hash_cache(tmp_path_factory) -> None:
    """Model-hash caches of the test run (and of the `opcm` processes it starts) stay out of ~/.cache."""
    if "OPCM_CACHE_DIR" not in os.environ:
        os.environ["OPCM_CACHE_DIR"] = str(tmp_path_factory.mktemp("opcm-cache"))


@pytest.fixture(autouse=True)
def _seed() -> None:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(params=available_devices())
def device(request) -> str:
    return request.param
