"""Shared test setup: offline everything, the real data mirror via the documented setting."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_RAW = REPO_ROOT.parent / "shared" / "data" / "raw"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("CASCADE_ROUTING_DATA_DIR", str(SHARED_RAW))


@pytest.fixture
def one_torch_thread():
    """One intra-op torch thread for the test: on a shared 2-core machine two threads spin
    (estimators/runtime.py), and tiny models run several times faster on one."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def raw_data_dir() -> Path:
    """The local mirror laid out like ``shared/data/raw`` (the CASCADE_ROUTING_DATA_DIR setting)."""
    path = Path(os.environ["CASCADE_ROUTING_DATA_DIR"])
    if not path.is_dir():
        pytest.fail(f"CASCADE_ROUTING_DATA_DIR={path} is not a folder; tests need the data mirror")
    return path


@pytest.fixture(scope="module")
def ds(request):
    """The synthetic serving dataset of a test module (``tests.serving_helpers.synthetic_dataset``):
    ``SERVING_ROWS`` queries and ``SERVING_SEED`` (module constants; defaults 30 and 0). A module that
    needs other data defines its own ``ds``."""
    from tests.serving_helpers import synthetic_dataset

    module = request.module
    return synthetic_dataset(getattr(module, "SERVING_ROWS", 30), seed=getattr(module, "SERVING_SEED", 0))


@pytest.fixture(scope="module")
def stand_in(ds):
    """``(router, offline simulation, budget)`` of ``tests.serving_helpers.stand_in_router`` on ``ds``."""
    from tests.serving_helpers import stand_in_router

    return stand_in_router(ds)
