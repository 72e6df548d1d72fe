"""A real Prometheus server (Debian's ``prometheus`` binary) for integration tests.

``PrometheusServer(workdir, scrape_configs, rule_files=...)`` writes a config (JSON, which is
valid YAML) and a storage folder under ``workdir``, starts ``prometheus`` listening on a free
loopback port, and waits for ``/-/ready``. ``stop()`` ends only the process it started, by pid:
SIGTERM, then SIGKILL after a grace period. Query helpers wrap the HTTP API (``/api/v1/query``,
``/api/v1/targets``, ``/api/v1/rules``) and raise on any non-``success`` answer.

The binary is looked up on ``PATH`` (override with ``$PROMETHEUS_BIN``); when it is missing,
:class:`PrometheusMissing` says how to install it, so callers can fail with that message instead
of skipping.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Callable

INSTALL_HINT = "install it with `apt-get install -y prometheus` (done by `make install`'s sysdeps target)"


class PrometheusMissing(RuntimeError):
    """The ``prometheus`` binary is not installed."""


def find_prometheus() -> str:
    """Path of the prometheus binary, or :class:`PrometheusMissing` naming how to install it."""
    path = os.environ.get("PROMETHEUS_BIN") or shutil.which("prometheus")
    if not path or not os.access(path, os.X_OK):
        where = f"$PROMETHEUS_BIN={path!r} is not executable" if os.environ.get("PROMETHEUS_BIN") else \
            "the `prometheus` binary was not found on PATH"
        raise PrometheusMissing(f"{where}; {INSTALL_HINT}")
    return path


def free_port() -> int:
    """A loopback TCP port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def static_scrape(job_name: str, targets: list[str], *, labels: dict[str, str] | None = None, interval: str = "1s",
                  honor_labels: bool = True, metrics_path: str = "/metrics") -> dict[str, Any]:
    """One scrape_config entry for fixed ``host:port`` targets, with optional target ``labels``.

    ``honor_labels`` defaults to true because fleetloop's learner metrics carry their own ``job``
    label (the fleetloop job id); without it Prometheus renames that label to ``exported_job``.
    Target labels (e.g. ``fleetloop_component``) go on every scraped series and on ``up``.
    """
    static: dict[str, Any] = {"targets": list(targets)}
    if labels:
        static["labels"] = dict(labels)
    return {"job_name": job_name, "scrape_interval": interval, "scrape_timeout": interval, "honor_labels": honor_labels,
            "metrics_path": metrics_path, "static_configs": [static]}


class PrometheusServer:
    """One ``prometheus`` process owned by a test. Use as a context manager or call start/stop."""

    def __init__(self, workdir: Path, scrape_configs: list[dict[str, Any]], rule_files: list[Path] | None = None,
                 *, scrape_interval: str = "1s", evaluation_interval: str = "1s") -> None:
        self.workdir = Path(workdir)
        self.scrape_configs = scrape_configs
        self.rule_files = [Path(p).resolve() for p in (rule_files or [])]
        self.scrape_interval, self.evaluation_interval = scrape_interval, evaluation_interval
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.log_path = self.workdir / "prometheus.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def config(self) -> dict[str, Any]:
        """The configuration written to ``prometheus.yml``."""
        return {"global": {"scrape_interval": self.scrape_interval, "evaluation_interval": self.evaluation_interval},
                "rule_files": [str(p) for p in self.rule_files], "scrape_configs": self.scrape_configs}

    def start(self, ready_timeout: float = 60.0) -> "PrometheusServer":
        """Write the config, start the process on a free port, wait for ``/-/ready``.

        Raises :class:`PrometheusMissing` without the binary, and RuntimeError (with the log tail)
        if the process exits or is not ready within ``ready_timeout`` seconds.
        """
        binary = find_prometheus()
        self.workdir.mkdir(parents=True, exist_ok=True)
        cfg_path = self.workdir / "prometheus.yml"
        cfg_path.write_text(json.dumps(self.config(), indent=2))
        storage = self.workdir / "data"
        storage.mkdir(exist_ok=True)
        self.port = free_port()
        cmd = [binary, f"--config.file={cfg_path}", f"--storage.tsdb.path={storage}",
               f"--web.listen-address=127.0.0.1:{self.port}", "--storage.tsdb.retention.time=1h", "--log.level=info"]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.workdir)
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.proc.returncode} at start:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"prometheus not ready on {self.url} within {ready_timeout}s:\n{self.log_tail()}")

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM our process (by pid), SIGKILL it if it is still alive after ``grace`` seconds."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(grace)

    def __enter__(self) -> "PrometheusServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    # ---- HTTP API -------------------------------------------------------------------------------

    def api(self, path: str, **params: str) -> Any:
        """GET ``/api/v1/<path>``; returns ``data`` or raises RuntimeError with Prometheus' error."""
        qs = f"?{urllib.parse.urlencode(params)}" if params else ""
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/{path}{qs}", timeout=10) as r:
                body = json.loads(r.read())
        except urllib.error.HTTPError as e:
            body = json.loads(e.read() or b"{}")
        if body.get("status") != "success":
            raise RuntimeError(f"prometheus /api/v1/{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant vector query: a list of ``{"metric": {labels}, "value": float}``."""
        data = self.api("query", query=expr)
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": float(data["result"][1])}]
        if data["resultType"] != "vector":
            raise RuntimeError(f"{expr!r} returned a {data['resultType']}, expected a vector")
        return [{"metric": s["metric"], "value": float(s["value"][1])} for s in data["result"]]

    def value(self, expr: str) -> float | None:
        """The single value of ``expr``; None when it has no series; error when it has several."""
        res = self.query(expr)
        if not res:
            return None
        if len(res) > 1:
            raise RuntimeError(f"{expr!r} returned {len(res)} series, expected one: {[s['metric'] for s in res]}")
        return res[0]["value"]

    def active_targets(self) -> list[dict[str, Any]]:
        """Active scrape targets (``scrapePool``, ``scrapeUrl``, ``health``, ``lastError``, ...)."""
        return self.api("targets", state="active")["activeTargets"]

    def rule_groups(self) -> list[dict[str, Any]]:
        """Loaded rule groups with each rule's health and, for alerts, state."""
        return self.api("rules")["groups"]

    def wait_targets_up(self, pools: list[str], timeout: float = 60.0) -> dict[str, dict[str, Any]]:
        """Wait until every named scrape pool has a target with ``health == "up"``; returns them by pool."""
        last: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            last = self.active_targets()
            up = {t["scrapePool"]: t for t in last if t["health"] == "up"}
            if all(p in up for p in pools):
                return up
            time.sleep(0.25)
        brief = [(t["scrapePool"], t["scrapeUrl"], t["health"], t.get("lastError")) for t in last]
        raise AssertionError(f"targets {pools} not all up within {timeout}s: {brief}\n{self.log_tail(1500)}")

    def wait_value(self, expr: str, expected: float, timeout: float = 30.0, interval: float = 0.25) -> float:
        """Poll ``value(expr)`` until it equals ``expected``; AssertionError with the last value otherwise.

        Scraped values lag the exporter by up to one scrape interval, so compare this way rather
        than with a single query."""
        deadline = time.monotonic() + timeout
        last: float | None = None
        while time.monotonic() < deadline:
            last = self.value(expr)
            if last == expected:
                return last
            time.sleep(interval)
        raise AssertionError(f"{expr} = {last!r} after {timeout}s, expected {expected!r}")

    def wait_for(self, what: str, fn: Callable[[], Any], timeout: float = 30.0, interval: float = 0.25) -> Any:
        """Poll ``fn`` until it returns a truthy value; AssertionError naming ``what`` otherwise."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            last = fn()
            if last:
                return last
            time.sleep(interval)
        raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")
