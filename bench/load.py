"""``fleetloop bench load``: a fleet of lightweight actors against one real learner, vs raw gRPC.

What runs:
  - the server is its own OS process (:mod:`bench.load_server`), so its memory and CPU are read by
    pid: by default a fresh learner (``build_learner(...).serve()``, what the Ray actor runs: ingest log,
    ledger, replay, staleness gate, sampler, training thread at ``max_updates_per_s``, weight
    publishing, checkpoints, /metrics) that requires a robot token (generated per run, never
    recorded); or an existing learner given with ``--learner HOST:PORT`` (its pid found from the
    port when it is local, or ``--learner-pid``; its /metrics with ``--learner-metrics``);
  - ``--actors`` lightweight actors (:mod:`bench.load_actor`: no simulation, pre-built realistic
    chunks from :mod:`bench.load_data`) spread over ``--processes`` OS processes, each actor with its
    own TCP connection, handshake and stream, ``--hz`` steps per second each;
  - the raw baseline: the same number of streams, the same generator and pacing, the same kind of
    bytes, against ``bench.common.RawServer`` (bytes in, 2-byte acks) in its own process. It runs
    first, for ``--baseline-minutes`` (default: the run's length, at most 1 minute).

Measured per phase: errors by RPC and gRPC status code; ack latency (write -> ack, every ack)
p50/p90/p99/p99.9/max and per-window p50/p99; ingest rates at the actors (acks) and at the server
(/metrics counters); server RSS every second and whether it grew over the second half (slope; a
verdict, not an assertion); server CPU per chunk; duplicates, backoff acks, reconnects; for the
learner, stored chunks vs acknowledged chunks and the exactly-once audit. Rates and latency
percentiles exclude the first ``warmup_s``; errors count over the whole phase.

This module runs the phases; the summaries, rows, verdict and table are :mod:`bench.load_report`
(``summarize`` and ``print_load_table`` are importable from here as before).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from bench.common import Children, collect, load_average, log_progress, machine_info, wait_ready, write_json
from bench.load_actor import ProcPlan, load_process
from bench.load_report import comparison_rows, load_verdict, print_load_table, summarize
from bench.load_stats import ServerProbe, Sampler, pid_listening_on

REPO = Path(__file__).resolve().parent.parent
DEFAULT_TASKS = ["reach-v3", "push-v3", "pick-place-v3", "drawer-open-v3"]


class LoadConfig(BaseModel):
    """Options of ``fleetloop bench load``: one CLI flag each, except ``max_episode_steps``,
    ``warmup_s`` and ``drain_timeout_s`` (their defaults on the command line)."""

    actors: int = Field(200, ge=1, le=4000, description="Lightweight actors (one stream and TCP connection each).")
    minutes: float = Field(5.0, gt=0, description="Length of the fleetloop phase.")
    baseline_minutes: float | None = Field(None, gt=0, description="Length of the raw phase (None: min(minutes, 1)).")
    chunk_steps: int = Field(50, ge=1, le=10_000, description="Steps per chunk.")
    hz: float = Field(30.0, ge=0, description="Steps per second per actor (0 = as fast as the window allows).")
    processes: int | None = Field(None, ge=1, le=256, description="OS processes driving the actors (None: min(actors, 4)).")
    max_inflight: int = Field(32, ge=1, le=4096, description="Unacknowledged chunks per actor (the FleetClient default).")
    learner: str | None = Field(None, description="HOST:PORT of an existing learner (None: start one).")
    learner_pid: int | None = Field(None, ge=1, description="Pid of --learner for RSS (None: found from the port if local).")
    learner_metrics: str | None = Field(None, description="HOST:PORT of --learner's /metrics (None: no server-side rates).")
    job: str = Field("bench-load", min_length=1, description="Job id (must be the learner's with --learner).")
    tasks: list[str] = Field(default_factory=lambda: list(DEFAULT_TASKS), min_length=1, description="Task ids of the job.")
    token: str | None = Field(None, description="Robot token for --learner (a started learner gets a generated one).")
    tls_ca: str | None = Field(None, description="CA file to connect to --learner with TLS.")
    training: bool = Field(True, description="The started learner trains (and publishes) during the load.")
    max_updates_per_s: float = Field(10.0, gt=0, description="Training rate cap of the started learner.")
    online_capacity: int | None = Field(None, ge=1000, description="Started learner's online ring per task, steps "
                                        "(None: the learner's default, 200,000).")
    grpc_workers: int | None = Field(None, ge=4, le=1024, description="Started learner's gRPC threads (None: 2 x actors + 16).")
    max_episode_steps: int = Field(200, ge=1, description="Episode length limit of the generated episodes.")
    seed: int = Field(0, description="Seed of the episode banks and jitter.")
    warmup_s: float | None = Field(None, ge=0, description="Excluded from rates and latencies (None: min(5 s, 10 %)).")
    drain_timeout_s: float = Field(30.0, gt=0, description="After a phase: time allowed for outstanding acks.")
    progress: bool = Field(True, description="Show a progress bar on stderr.")


# -- the server process ------------------------------------------------------------------------------
class ServerProcess:
    """``python -m bench.load_server ...`` as a child process, stopped by pid (SIGTERM, then SIGKILL)."""

    def __init__(self, args: list[str], log_path: Path, start_timeout_s: float = 120.0) -> None:
        env = {**os.environ, "FLEETLOOP_LOG_LEVEL": "WARNING", "RAY_AUTH_MODE": "disabled",
               "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        self.log_path, self.log_tail = log_path, []
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.load_server", *args], cwd=REPO, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + start_timeout_s
        while not self.lines:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"bench server {args[0]} did not start (exit {self.proc.returncode}); see {log_path}")
            time.sleep(0.05)
        self.address: dict[str, Any] = json.loads(self.lines[0])
        self.pid: int = self.proc.pid

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.strip():
                self.lines.append(line.strip())

    def stop(self, timeout_s: float = 60.0) -> dict[str, Any] | None:
        """SIGTERM, wait for the final JSON line (up to ``timeout_s``), SIGKILL if still alive."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._reader.join(5)
        self._log.close()
        try:  # warnings and errors the server logged (fleetloop logs never carry secrets)
            self.log_tail = self.log_path.read_text(errors="replace").splitlines()[-40:]
        except OSError:
            self.log_tail = []
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except (OSError, ValueError):
                pass
        return json.loads(self.lines[-1]) if len(self.lines) > 1 else None


def _learner_config(cfg: LoadConfig, state_dir: Path, token: str) -> dict[str, Any]:
    """The learner's config file (nested LearnerConfig groups)."""
    train = {"max_updates_per_s": cfg.max_updates_per_s} if cfg.training else \
        {"min_online_steps": 10 ** 12, "max_updates_per_s": 0.1}
    return {"job_id": cfg.job, "state_dir": str(state_dir), "tasks": cfg.tasks, "device": "cpu",
            "serving": {"host": "127.0.0.1", "port": 0, "metrics_port": 0, "robot_tokens": [token],
                        "grpc_workers": _workers(cfg)},
            "episodes": {"chunk_steps": cfg.chunk_steps, "max_episode_steps": cfg.max_episode_steps},
            "optimisation": train, "flow": {"online_capacity": cfg.online_capacity} if cfg.online_capacity else {}}


def _workers(cfg: LoadConfig) -> int:
    """Each actor holds one experience stream; the learner keeps about half its threads for weight
    subscriptions (``max_streams`` defaults to (grpc_workers - 8) // 2), so 2 x actors + 16 threads
    leave room for every actor's stream (1024 at most: up to ~500 actors per learner)."""
    return cfg.grpc_workers or min(1024, 2 * cfg.actors + 16)


# -- one phase ---------------------------------------------------------------------------------------------
def _plans(cfg: LoadConfig, mode: str, target: str, token: str | None, seconds: float) -> list[ProcPlan]:
    n_proc = min(cfg.actors, cfg.processes or 4)
    ready = 60.0 + 0.3 * cfg.actors
    return [ProcPlan(proc=p, actor_indices=list(range(p, cfg.actors, n_proc)), mode=mode, target=target, job_id=cfg.job,
                     tasks=cfg.tasks, token=token, tls_ca=cfg.tls_ca if mode == "learner" else None,
                     chunk_steps=cfg.chunk_steps, max_episode_steps=cfg.max_episode_steps, hz=cfg.hz,
                     max_inflight=cfg.max_inflight, seed=cfg.seed, ready_timeout_s=ready,
                     drain_timeout_s=cfg.drain_timeout_s, hard_deadline_s=ready + seconds + cfg.drain_timeout_s + 120)
            for p in range(n_proc)]


class _Progress:
    """A rich progress bar on stderr (plain lines every 15 s when stderr is not a terminal)."""

    def __init__(self, enabled: bool) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.console = Console(stderr=True)
        self.enabled = enabled
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                            TextColumn("{task.fields[info]}"), console=self.console, disable=not enabled)
        self._last_line = 0.0

    def __enter__(self) -> "_Progress":
        self.bar.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bar.stop()

    def task(self, name: str, seconds: float) -> int:
        return self.bar.add_task(name, total=seconds, info="")

    def update(self, task: int, done_s: float, info: str) -> None:
        self.bar.update(task, completed=done_s, info=info)
        if self.enabled and not self.console.is_terminal and time.monotonic() - self._last_line > 15:
            self._last_line = time.monotonic()
            log_progress(f"{done_s:.0f} s: {info}")


def _drain(q) -> list[Any]:
    """Everything waiting in a multiprocessing queue now (never blocks)."""
    import queue

    out = []
    while True:
        try:
            out.append(q.get_nowait())
        except queue.Empty:
            return out


def run_phase(cfg: LoadConfig, mode: str, target: str, token: str | None, seconds: float, probe: ServerProbe,
              progress: _Progress) -> dict[str, Any]:
    """Spawn the load processes, connect every actor, load for ``seconds``, drain; return the raw results."""
    plans = _plans(cfg, mode, target, token, seconds)
    rss_now: list[float | None] = [None]
    sampler = Sampler(probe, 1.0, on_sample=lambda s: rss_now.__setitem__(0, s["rss_mb"])).start()
    acks: dict[int, dict] = {}
    try:
        with Children() as children:
            ctx = children.ctx
            go, stop = ctx.Event(), ctx.Event()
            ready_q, progress_q, result_q = ctx.Queue(), ctx.Queue(), ctx.Queue()
            for plan in plans:
                children.start(load_process, plan.model_dump_json(), go, stop, ready_q, progress_q, result_q,
                               name=f"bench-load-{mode}-{plan.proc}")
            ready = wait_ready(ready_q, len(plans), plans[0].ready_timeout_s + 60, children, f"{mode} load processes")
            connected = sum(r["connected"] for r in ready)
            task = progress.task(f"{mode}: {connected}/{cfg.actors} actors", seconds)
            t_go = time.time()
            go.set()
            while (left := t_go + seconds - time.time()) > 0:
                time.sleep(min(0.5, left))
                for msg in _drain(progress_q):
                    acks[msg["proc"]] = msg
                n_ack = sum(m["acked"] for m in acks.values())
                n_err = sum(m["errors"] for m in acks.values())
                rss = rss_now[0]
                progress.update(task, time.time() - t_go, f"acks {n_ack:,}  errors {n_err}" +
                                (f"  server RSS {rss:.0f} MB" if rss else ""))
            stop.set()
            t_stop = time.time()
            results = collect(result_q, len(plans), cfg.drain_timeout_s + 60.0)
            _drain(progress_q)
            if len(results) < len(plans):
                raise TimeoutError(f"{mode}: {len(results)} of {len(plans)} load processes reported after the drain")
    finally:
        samples = sampler.stop()
    return {"mode": mode, "plans": len(plans), "t_go": t_go, "t_stop": t_stop, "seconds": seconds, "results": results,
            "samples": samples, "connected": connected}


# -- the run ---------------------------------------------------------------------------------------------
def run_load(cfg: LoadConfig) -> dict[str, Any]:
    """Raw phase, then the fleetloop phase; returns the result document."""
    seconds = cfg.minutes * 60.0
    base_s = (cfg.baseline_minutes if cfg.baseline_minutes is not None else min(cfg.minutes, 1.0)) * 60.0
    warm = cfg.warmup_s if cfg.warmup_s is not None else min(5.0, 0.1 * min(seconds, base_s))
    config = cfg.model_dump(exclude={"token"}) | {
        "token": "generated per run, not recorded" if cfg.learner is None else ("given" if cfg.token else None),
        "processes": min(cfg.actors, cfg.processes or 4), "grpc_workers": _workers(cfg) if cfg.learner is None else None,
        "baseline_seconds": base_s, "seconds": seconds, "warmup_s": warm, "order": "raw phase, then fleetloop phase",
        "offered_steps_per_s": cfg.actors * cfg.hz if cfg.hz else None,
        "server": "own process; learner: build_learner(...).serve() without Ray" if cfg.learner is None else f"existing learner {cfg.learner}"}
    with tempfile.TemporaryDirectory(prefix="fleetloop-bench-load-") as tmp, _Progress(cfg.progress) as progress:
        tmpd = Path(tmp)
        log_progress(f"load: raw baseline, {cfg.actors} streams for {base_s:g} s")
        raw_srv = ServerProcess(["raw", "--workers", str(min(1024, cfg.actors + 32))], tmpd / "raw-server.log")
        try:
            raw_phase = run_phase(cfg, "raw", f"127.0.0.1:{raw_srv.address['port']}", None, base_s,
                                  ServerProbe(raw_srv.pid, f"http://127.0.0.1:{raw_srv.address['metrics_port']}/metrics"),
                                  progress)
        finally:
            raw_final = raw_srv.stop()
        log_progress(f"load: fleetloop, {cfg.actors} actors for {seconds:g} s")
        learner_srv, final = None, None
        if cfg.learner is None:
            token = secrets.token_urlsafe(24)
            cfg_path = tmpd / "learner.json"
            cfg_path.write_text(json.dumps(_learner_config(cfg, tmpd / "learner-state", token)))
            os.chmod(cfg_path, 0o600)
            learner_srv = ServerProcess(["learner", str(cfg_path)], tmpd / "learner.log")
            target, pid = f"127.0.0.1:{learner_srv.address['port']}", learner_srv.pid
            metrics_url = f"http://127.0.0.1:{learner_srv.address['metrics_port']}/metrics"
        else:
            token, target = cfg.token, cfg.learner
            host, _, port = cfg.learner.rpartition(":")
            pid = cfg.learner_pid or (pid_listening_on(int(port)) if host in ("127.0.0.1", "localhost", "::1", "[::1]") else None)
            metrics_url = f"http://{cfg.learner_metrics}/metrics" if cfg.learner_metrics else None
        try:
            fl_phase = run_phase(cfg, "learner", target, token, seconds, ServerProbe(pid, metrics_url), progress)
        finally:
            if learner_srv is not None:
                final = learner_srv.stop()
                final = {**(final or {}), "log_tail": learner_srv.log_tail}
    fl, raw = summarize(cfg, fl_phase, warm, final), summarize(cfg, raw_phase, warm, None)
    raw["server_final"] = raw_final
    config["server_pid_known"] = pid is not None
    verdict = load_verdict(fl)
    notes = [f"{cfg.actors} actors x {cfg.hz:g} Hz, {cfg.chunk_steps} steps/chunk, ~{fl['mean_bytes_per_chunk'] or 0:,.0f} "
             f"bytes/chunk, operator steps {fl['intervention_share']:.1%}; fleetloop {fl['seconds']:.0f} s, raw {raw['seconds']:.0f} s",
             f"errors: fleetloop {fl['errors_total']} {fl['errors_by_rpc_code'] or ''}, raw {raw['errors_total']}; "
             f"unacked at end {fl['counters']['unacked_at_end']}; stored == acked: {verdict['stored_equals_acked']}; "
             f"duplicates stored: {verdict['duplicates_stored']}",
             f"learner RSS {fl['rss'].get('start_mb') or 0:.0f} -> {fl['rss'].get('end_mb') or 0:.0f} MB (max "
             f"{fl['rss'].get('max_mb') or 0:.0f}); grew over the second half: {verdict['rss_grew_second_half']} "
             f"({fl['rss'].get('rule', 'no RSS samples')}); replay rings full before the second half: "
             f"{verdict['replay_full_before_second_half']} (if not, growth while they fill is expected)",
             f"offered load met (no actor > 1 s behind schedule): {verdict['offered_load_met']}; "
             f"load average at end {load_average()}"]
    return {"bench": "load", "machine": machine_info(), "config": config, "rows": comparison_rows(cfg.actors, fl, raw),
            "verdict": verdict, "runs": {"fleetloop": fl, "raw_grpc": raw}, "notes": notes}


def main(args) -> int:
    """``fleetloop bench load``: validate flags (2 on a bad one), run, print the table, write ``args.out``."""
    from pydantic import ValidationError

    from bench.runner import _with_sigterm_as_exit

    fields = {k: getattr(args, k) for k in LoadConfig.model_fields if getattr(args, k, None) is not None}
    if isinstance(fields.get("tasks"), str):
        fields["tasks"] = [t for t in fields["tasks"].split(",") if t]
    if getattr(args, "no_training", False):
        fields["training"] = False
    if getattr(args, "no_progress", False):
        fields["progress"] = False
    try:
        cfg = LoadConfig.model_validate(fields)
        if cfg.learner is not None and ":" not in cfg.learner:
            raise ValueError(f"--learner {cfg.learner!r} must be HOST:PORT")
    except (ValidationError, ValueError) as exc:
        print(f"fleetloop bench load: {exc}", file=sys.stderr)
        return 2
    result = _with_sigterm_as_exit(lambda: run_load(cfg))
    print_load_table(result)
    path = write_json(result, args.out)
    log_progress(f"wrote {path}")
    return 0
