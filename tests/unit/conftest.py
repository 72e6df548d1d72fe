"""The unit tier's contract: a unit test touches no process, no socket and no simulator.

An autouse fixture makes each of those fail at once with a message naming the tier, so a test that
needs one is moved to ``tests/integration`` instead of making ``make test-fast`` slow:

- ``socket.socket.connect`` / ``bind`` (loopback included: a gRPC server or a Redis client is a
  network test) - but not ``socketpair`` or Unix-domain pairs that asyncio creates internally;
- ``subprocess.Popen`` and ``multiprocessing`` process starts;
- constructing a Meta-World environment (``actor.envs.metaworld_env.MetaWorldEnv``).
"""

from __future__ import annotations

import multiprocessing.process
import platform
import socket
import subprocess

import pytest

# Imported once here, before the guard: importing Meta-World loads MuJoCo's GL bindings, which probe
# the system with a subprocess, and platform facts come from `uname -p`. Importing a library is not
# running a simulator; constructing an environment is (refused below).
import metaworld  # noqa: E402,F401  (the simulator library, not an environment)

platform.platform()
platform.processor()


class TierViolation(AssertionError):
    """A unit test reached for a process, a socket or a simulator."""


def _refuse(what: str):
    def refuse(*args, **kwargs):
        raise TierViolation(f"unit tests touch no {what}: move this test to tests/integration "
                            f"(see tests/unit/conftest.py)")
    return refuse


@pytest.fixture(autouse=True)
def _unit_tier(monkeypatch):
    """Refuse sockets to or from an address, subprocesses, process starts and Meta-World in unit tests."""
    real_connect, real_bind = socket.socket.connect, socket.socket.bind

    def connect(self, address):
        if self.family == socket.AF_UNIX:
            return real_connect(self, address)
        raise TierViolation(f"unit tests touch no socket (connect to {address!r}): move this test to tests/integration")

    def bind(self, address):
        if self.family == socket.AF_UNIX:
            return real_bind(self, address)
        raise TierViolation(f"unit tests touch no socket (bind {address!r}): move this test to tests/integration")

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "bind", bind)
    monkeypatch.setattr(subprocess.Popen, "__init__", _refuse("subprocess"))
    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", _refuse("process"))
    try:
        from actor.envs import metaworld_env
    except ImportError:  # pragma: no cover - the simulator is part of the install
        return
    monkeypatch.setattr(metaworld_env.MetaWorldEnv, "__init__", _refuse("simulator (Meta-World)"))
