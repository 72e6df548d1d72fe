"""Measurements of the load bench: a server process probed by pid and /metrics, and the statistics.

- :class:`ServerProbe` reads a process's resident memory (``VmRSS`` in ``/proc/<pid>/status``) and
  CPU time (``/proc/<pid>/stat``) and scrapes its Prometheus ``/metrics`` (counter samples summed
  over labels; ``reason``-labelled counters also kept per reason);
- :class:`Sampler` does that every ``period_s`` in a thread, keeping the whole series;
- pure helpers: latency percentiles, least-squares slope, per-window latency series, and
  :func:`pid_listening_on` (which local process serves a TCP port, for ``--learner`` targets).
"""

from __future__ import annotations

import os
import threading
import time
import urllib.request
from typing import Any, Callable

import numpy as np

_CLK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def rss_mb(pid: int) -> float | None:
    """Resident set size of ``pid`` in MB (10^6 bytes); None when the process is gone or unreadable."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024 / 1e6
    except OSError:
        return None
    return None


def cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of ``pid`` (all its threads); None when unreadable."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _CLK
    except (OSError, IndexError, ValueError):
        return None


def scrape(url: str, timeout: float = 2.0) -> dict[str, float]:
    """Counter and gauge samples of a /metrics page: ``name`` -> sum over label sets, plus
    ``name{reason=...}`` -> value for samples with a ``reason`` label. Empty on any failure."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            text = resp.read().decode()
    except (OSError, ValueError):
        return {}
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        if fam.type not in ("counter", "gauge"):
            continue
        for s in fam.samples:
            if s.name.endswith("_created"):
                continue
            out[s.name] = out.get(s.name, 0.0) + s.value
            if "reason" in s.labels:
                key = f"{s.name}{{reason={s.labels['reason']}}}"
                out[key] = out.get(key, 0.0) + s.value
    return out


class ServerProbe:
    """One sample of a server process: time, RSS, CPU seconds, /metrics counters."""

    def __init__(self, pid: int | None, metrics_url: str | None) -> None:
        self.pid, self.metrics_url = pid, metrics_url

    def sample(self) -> dict[str, Any]:
        return {"t": time.time(), "rss_mb": rss_mb(self.pid) if self.pid else None,
                "cpu_s": cpu_s(self.pid) if self.pid else None,
                "metrics": scrape(self.metrics_url) if self.metrics_url else {}}


class Sampler:
    """Samples a :class:`ServerProbe` every ``period_s`` (and calls ``on_sample``) until stopped."""

    def __init__(self, probe: ServerProbe, period_s: float = 1.0, on_sample: Callable[[dict], None] | None = None) -> None:
        self.probe, self.period_s, self.on_sample = probe, period_s, on_sample
        self.samples: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-load-sampler", daemon=True)

    def _run(self) -> None:
        next_t = time.monotonic()
        while not self._stop.is_set():
            s = self.probe.sample()
            self.samples.append(s)
            if self.on_sample is not None:
                self.on_sample(s)
            next_t += self.period_s
            self._stop.wait(max(0.0, next_t - time.monotonic()))

    def start(self) -> "Sampler":
        self._thread.start()
        return self

    def stop(self) -> list[dict[str, Any]]:
        self._stop.set()
        self._thread.join(10.0)
        self.samples.append(self.probe.sample())
        return self.samples


# -- statistics --------------------------------------------------------------------------------------
def latency_summary(lat_s: np.ndarray) -> dict[str, float | int | None]:
    """Count, p50 / p90 / p99 / p99.9 / max of latencies (input seconds, output milliseconds)."""
    if lat_s.size == 0:
        return {"count": 0, "p50_ms": None, "p90_ms": None, "p99_ms": None, "p999_ms": None, "max_ms": None, "mean_ms": None}
    q = np.percentile(lat_s, [50, 90, 99, 99.9]) * 1e3
    return {"count": int(lat_s.size), "p50_ms": float(q[0]), "p90_ms": float(q[1]), "p99_ms": float(q[2]),
            "p999_ms": float(q[3]), "max_ms": float(lat_s.max() * 1e3), "mean_ms": float(lat_s.mean() * 1e3)}


def latency_windows(t: np.ndarray, lat_s: np.ndarray, t0: float, t1: float, window_s: float) -> list[dict[str, Any]]:
    """Per ``window_s`` window of [t0, t1): acks, p50 and p99 (ms), so a drift over the run shows."""
    out = []
    start = t0
    while start < t1 - 1e-9:
        end = min(t1, start + window_s)
        sel = lat_s[(t >= start) & (t < end)]
        out.append({"t_s": round(start - t0, 3), "acks": int(sel.size),
                    "p50_ms": float(np.percentile(sel, 50) * 1e3) if sel.size else None,
                    "p99_ms": float(np.percentile(sel, 99) * 1e3) if sel.size else None})
        start = end
    return out


def slope_per_min(t: list[float], y: list[float]) -> float | None:
    """Least-squares slope of y over t, per minute (None with fewer than 3 points)."""
    if len(t) < 3:
        return None
    tt = np.asarray(t, float) - t[0]
    if np.ptp(tt) == 0:
        return None
    return float(np.polyfit(tt, np.asarray(y, float), 1)[0] * 60.0)


def rss_summary(samples: list[dict[str, Any]], t0: float, t1: float, min_growth_mb: float = 4.0,
                min_growth_share: float = 0.02) -> dict[str, Any]:
    """RSS over the measured window [t0, t1]: start, end, max, mean, and the slope over its second
    half. ``grew`` = the second-half slope, projected over the second half, exceeds both
    ``min_growth_mb`` and ``min_growth_share`` of the second half's mean RSS (a verdict, not a test)."""
    pts = [(s["t"], s["rss_mb"]) for s in samples if s.get("rss_mb") is not None and t0 <= s["t"] <= t1]
    if len(pts) < 3:
        return {"samples": len(pts), "grew": None}
    mid = t0 + (t1 - t0) / 2
    second = [(t, y) for t, y in pts if t >= mid]
    slope = slope_per_min([t for t, _ in second], [y for _, y in second])
    mean2 = float(np.mean([y for _, y in second])) if second else None
    growth = None if slope is None else slope * (t1 - mid) / 60.0
    grew = None if growth is None or mean2 is None else bool(growth > max(min_growth_mb, min_growth_share * mean2))
    ys = [y for _, y in pts]
    return {"samples": len(pts), "start_mb": ys[0], "end_mb": ys[-1], "max_mb": max(ys), "mean_mb": float(np.mean(ys)),
            "second_half_slope_mb_per_min": slope, "second_half_growth_mb": growth, "second_half_mean_mb": mean2,
            "grew": grew, "rule": f"grew = second-half slope x second-half length > max({min_growth_mb:g} MB, "
                                  f"{min_growth_share:.0%} of the second half's mean RSS)"}


def counter_delta(samples: list[dict[str, Any]], name: str, t0: float, t1: float) -> tuple[float, float] | None:
    """(increase of metric ``name``, seconds) between the first sample at/after t0 and the last at/before t1."""
    pts = [(s["t"], s["metrics"][name]) for s in samples if name in s.get("metrics", {}) and t0 <= s["t"] <= t1]
    if len(pts) < 2:
        return None
    return pts[-1][1] - pts[0][1], pts[-1][0] - pts[0][0]


def pid_listening_on(port: int) -> int | None:
    """The pid of the local process (readable by this user) listening on TCP ``port``, if any."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as fh:
                next(fh)
                for line in fh:
                    f = line.split()
                    if f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port:  # 0A = LISTEN
                        inodes.add(f[9])
        except (OSError, StopIteration, IndexError, ValueError):
            continue
    if not inodes:
        return None
    targets = {f"socket:[{i}]" for i in inodes}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                if os.readlink(f"/proc/{pid}/fd/{fd}") in targets:
                    return int(pid)
        except OSError:
            continue
    return None
