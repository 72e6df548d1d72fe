"""Stopping processes a test started, by pid (never by name)."""

from __future__ import annotations

import os
import signal
import subprocess


def stop_session(proc: subprocess.Popen, grace_s: float) -> None:
    """Stop ``proc``, started with ``start_new_session=True``: SIGTERM, wait up to ``grace_s``, then
    SIGKILL its whole session's group (the process and what it started). No-op if it has exited."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
