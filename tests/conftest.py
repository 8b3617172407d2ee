"""Shared fixtures: Hydra compose over the repo's conf/, data-file lookup, tiny fast runs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from qafel.experiment.compose import compose

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"


def data_root() -> Path:
    """Where tests look for data files: QAFEL_DATA_ROOT, else ../shared/data beside the repo, else ./data."""
    if os.environ.get("QAFEL_DATA_ROOT"):
        return Path(os.environ["QAFEL_DATA_ROOT"])
    shared = REPO.parent / "shared" / "data"
    return shared if shared.is_dir() else REPO / "data"


def need_data_file(name: str) -> Path:
    """The data file's path; skip (or, under CI's QAFEL_REQUIRE_DATA=1, fail) when it is absent."""
    path = data_root() / name
    if not path.is_file():
        msg = f"needs {name}: put it at {path} (or set QAFEL_DATA_ROOT to the folder holding it)"
        if os.environ.get("QAFEL_REQUIRE_DATA") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    return path


def compose_cfg(*overrides: str):
    """Compose conf/config.yaml with these overrides as run.py does
    (qafel.experiment.compose: two-spelling settings settled)."""
    return compose(list(overrides), CONF)


FAST = ("tracking=none", "run.progress=false")


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread, as runs use by default (run.threads=1): OpenMP spin-waits make two threads up to
    100x slower for tiny kernels on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def mushrooms_root() -> Path:
    """The folder holding mushrooms.libsvm."""
    return need_data_file("mushrooms.libsvm").parent
