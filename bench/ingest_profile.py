"""Sampling profile of this process (the in-process learner) with py-spy, summarised for the bench JSON.

:func:`py_spy_profile` runs ``py-spy record`` (the one beside this interpreter, else on PATH) on this
process for ``seconds`` in raw (collapsed-stack) form, without pausing it (``--nonblocking``), and
returns ``{"what", "samples", "top": [[function, inclusive_s, share], ...], "self_top": [...]}``:
per function the samples whose stack contains it (inclusive) and those where it is the innermost frame
(self), over the thread holding the GIL at each sample (``--gil``: where the process's Python CPU time
goes; threads blocked in gRPC's C core or in I/O without the GIL are not counted). None when py-spy is
missing; ``{"what": "py-spy failed", "error"}`` when it cannot attach.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

RATE_HZ = 200


def _py_spy() -> str | None:
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else shutil.which("py-spy")


def _label(frame: str) -> str:
    """``fn (path/to/file.py:123)`` -> ``fn (file.py)``: one entry per function, not per line."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    parts = Path(path).parts
    short = "/".join(parts[-2:]) if len(parts) >= 2 else path
    return f"{name} ({short})" if path else name


def summarise(collapsed: str, rate_hz: float, top: int = 15) -> dict[str, Any]:
    """Inclusive and self sample counts per function from py-spy's raw output (``stack count`` lines)."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_label(f) for f in stack.split(";")[1:] if f]  # the first entry names the thread
        if not frames:
            continue
        total += n
        for label in set(frames):
            inclusive[label] += n
        own[frames[-1]] += n
    fmt = lambda c: [[fn, round(k / rate_hz, 3), round(k / total, 4)] for fn, k in c.most_common(top)]  # noqa: E731
    return {"samples": total, "top": fmt(inclusive), "self_top": fmt(own)}


def py_spy_profile(seconds: float, pid: int | None = None) -> dict[str, Any] | None:
    """Profile ``pid`` (default: this process) for ``seconds``; see the module docstring."""
    exe = _py_spy()
    if exe is None:
        return None
    pid = os.getpid() if pid is None else pid
    with tempfile.TemporaryDirectory(prefix="fleetloop-pyspy-") as tmp:
        out = Path(tmp) / "stacks.txt"
        cmd = [exe, "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))), "--rate", str(RATE_HZ),
               "--format", "raw", "--output", str(out), "--nonblocking", "--gil"]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
        except (OSError, subprocess.SubprocessError) as exc:
            return {"what": "py-spy failed", "error": repr(exc)[:300]}
        if proc.returncode != 0 or not out.exists():
            return {"what": "py-spy failed", "error": (proc.stderr or proc.stdout)[-300:]}
        summary = summarise(out.read_text(), RATE_HZ)
    summary["what"] = (f"py-spy --gil {RATE_HZ} Hz, {seconds:g} s, learner process (gRPC server threads + ingest), the "
                       f"thread holding the GIL; inclusive seconds = samples whose stack holds the function / rate")
    return summary
