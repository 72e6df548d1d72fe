"""Shared fixtures. Network fixtures use free loopback ports; every process a fixture starts is
stopped by that fixture (Ray through ``ray.shutdown()`` of the instance it initialised)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_worker_niceness", "0")

import torch  # noqa: E402

torch.set_num_threads(1)


TIERS = ("unit", "integration", "chaos", "fuzz", "e2e")  # one folder of tests/ each


def pytest_configure(config):
    """Register the tier markers (``-m unit``, ``-m "not chaos"``, ...); each test gets its folder's."""
    for tier in TIERS:
        config.addinivalue_line("markers", f"{tier}: tests in tests/{tier}/ (marked by folder)")


def pytest_collection_modifyitems(config, items):
    """Mark every test with its tier (its folder under tests/); skip tests marked gpu when no CUDA
    device is present."""
    root = Path(__file__).resolve().parent
    for item in items:
        try:
            tier = Path(str(item.fspath)).resolve().relative_to(root).parts[0]
        except ValueError:
            continue
        if tier in TIERS:
            item.add_marker(getattr(pytest.mark, tier))
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture()
def tmp_state(tmp_path: Path) -> Path:
    return tmp_path


@pytest.fixture(scope="session")
def ray_cluster():
    """A private local Ray instance for the session (short temp dir), shut down at the end."""
    import ray

    temp = tempfile.mkdtemp(prefix="flray-", dir="/tmp")
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp, configure_logging=False, log_to_driver=False)
    yield ray
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)
