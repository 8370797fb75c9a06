"""Shared test setup: deterministic, single-threaded, offline, caches in a temporary folder."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Generated data (the demo suite) goes to a per-session cache, never the user's."""
    if "OVSEG_CACHE" not in os.environ:
        os.environ["OVSEG_CACHE"] = str(tmp_path_factory.mktemp("ovseg-cache"))
    yield
