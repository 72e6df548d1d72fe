"""Ingest throughput: K actors streaming experience into one learner, vs raw gRPC of the same bytes,
for five payloads (:mod:`bench.payloads`: state-only robot steps, steps with three 224x224 RGB
images raw or JPEG/PNG-compressed, the simulated robot's pixel steps (two 84x84 JPEG cameras), LLM
token groups) and fleet sizes K (default 1, 4, 16, 32). Compressed cameras are stored as the learner
stores them (``image_storage``: compressed by default, header-checked at ingest and decoded at batch
time); the decode cost that moves to training is measured apart (:mod:`bench.decode_cost`: ms per
batch of 64 steps).

fleetloop path (per payload and K): the real learner in this process, serving on a loopback port:
robot payloads ``LearnerCore`` + ``LearnerServicer`` + gRPC server (``learner.process.build_learner``, what
the Ray actor runs, no Ray) with the payload's observation specs; LLM groups an ``LlmLearnerCore`` ('tiny' model, groups
journaled with fsync before the ack, admission tickets) + the same servicer. Training is kept off the
CPU (robots: ``min_online_steps=10**12`` and ``max_updates_per_s=0.1``; LLM: the training thread is not
started), so the figure is the ingest path. K actors in at most ``processes`` client processes
(:mod:`bench.ingest_workers`) run the real actor runtime (handshake, disk spool, background Sender;
LLM: Admit tickets per group). Measured on the learner: steps (groups) and bytes stored.

raw baseline (same payload and K, same run, same total window): a bytes-in/bytes-out stream-stream
gRPC handler (``bench.common.RawServer``) in this process; K streams in the same client processes
send the very same serialized chunks with the actors' flow control (at most ``raw_window``
unacknowledged); each message is acknowledged with 2 bytes. steps/s = bytes / bytes per step.

Both paths are up at once and take turns in ``slices`` alternating slices (fleetloop first), each
after a short warm-up and after the other path's traffic drained, so a shared machine's changing load
hits both alike. ratio = fleetloop / raw (1.0 = fleetloop adds nothing over the transport).

Profile (``profile_seconds`` > 0): after the measured slices of the largest K of each payload, one
more fleetloop slice runs under py-spy (``.venv/bin/py-spy``, sampling this process: the learner)
and the functions with the largest inclusive share of the learner's busy samples are reported.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, Field, field_validator

from bench.common import (JOB, MB, TASK, Children, RawServer, collect, cpu_seconds, load_average, log_progress,
                          machine_info, quiet_fleetloop_logs, ratio, wait_ready)
from bench.payloads import PAYLOADS, PayloadSpec, payload_spec

MAX_INFLIGHT = 32           # the FleetClient default
READY_TIMEOUT_S = 240.0
SPOOL_BUDGET_BYTES = 32 << 20  # per actor: spooled-but-unacknowledged bytes before it waits (at least 4 chunks)


class IngestConfig(BaseModel):
    """Flags of ``fleetloop bench ingest`` (every one documented in ``--help``)."""

    model_config = ConfigDict(extra="forbid")
    actors: str = Field("1,4,16,32", description="Comma-separated actor counts K (each 1..64).")
    payload: str = Field(",".join(PAYLOADS), description=f"Comma-separated payloads: {', '.join(PAYLOADS)}.")
    seconds: float = Field(4.0, gt=0, le=300, description="Measured seconds per path per (payload, K), split into slices.")
    slices: int = Field(2, ge=1, le=10, description="Alternating fleetloop/raw slices per (payload, K).")
    warmup_s: float = Field(1.5, ge=0, le=60, description="Unmeasured warm-up before the first slice (0.5 s before the others).")
    chunk_steps: int = Field(50, ge=1, le=10_000, description="Steps per chunk of the state payload (images use 8, pixels 50).")
    episode_steps: int = Field(200, ge=1, le=100_000, description="Steps per episode (images and images-compressed: at most 64).")
    image_codec: str = Field("jpeg", pattern="^(jpeg|png)$", description="Encoding of images-compressed: jpeg (q90) or png.")
    image_storage: str = Field("compressed", pattern="^(compressed|decoded)$", description="The learner's images.storage: "
                               "compressed (headers checked at ingest, frames decoded at batch time) or decoded (every "
                               "frame decoded and checked at ingest).")
    processes: int = Field(8, ge=1, le=64, description="Most client processes; each hosts K/processes actors and raw streams.")
    profile_seconds: float = Field(3.0, ge=0, le=60, description="py-spy the learner for this long at the largest K of each "
                                                                 "payload (0: no profile).")

    @field_validator("actors")
    @classmethod
    def _counts(cls, v: str) -> str:
        try:
            counts = [int(x) for x in str(v).split(",") if x.strip()]
        except ValueError:
            counts = []
        if not counts or any(not 1 <= c <= 64 for c in counts):
            raise ValueError("must be comma-separated integers in 1..64")
        return ",".join(str(c) for c in counts)

    @field_validator("payload")
    @classmethod
    def _payloads(cls, v: str) -> str:
        names = [x.strip() for x in str(v).split(",") if x.strip()]
        bad = [n for n in names if n not in PAYLOADS]
        if not names or bad:
            raise ValueError(f"must be a comma-separated subset of {', '.join(PAYLOADS)}")
        return ",".join(names)

    @property
    def actor_counts(self) -> list[int]:
        return [int(x) for x in self.actors.split(",")]

    @property
    def payloads(self) -> list[str]:
        return self.payload.split(",")


# -- state-payload helpers other benches use (latency, fleet_pool) -------------------------------
def synthetic_episode(seed: int, steps: int = 200):
    """Random observations [steps, 39], actions [steps, 4] in [-1, 1] and rewards [steps] (float32):
    the state payload's values (:class:`bench.payloads.RobotSource` draws the same from the same seed)."""
    import numpy as np

    from bench.payloads import ACT_DIM, OBS_DIM

    rng = np.random.default_rng(seed)
    return (rng.standard_normal((steps, OBS_DIM), dtype=np.float32),
            rng.uniform(-1.0, 1.0, (steps, ACT_DIM)).astype(np.float32),
            rng.standard_normal(steps, dtype=np.float32))


def episode_messages(chunk_steps: int, actor_id: str, seed: int, steps: int = 200) -> list[bytes]:
    """The serialized EpisodeChunks of one synthetic state-only episode, produced by the real
    EpisodeRecorder: the exact bytes an actor sends (:func:`bench.payloads.robot_messages`)."""
    from bench.payloads import robot_messages

    return robot_messages(payload_spec("state", chunk_steps), actor_id, seed, steps, JOB, TASK)


# -- learners in this process -------------------------------------------------------------------
class _Learner:
    """A learner serving on loopback in this process; ``counters()`` = what it stored so far."""

    def __init__(self, spec: PayloadSpec, state_dir: Path, chunk_steps: int, episode_steps: int,
                 image_storage: str = "compressed") -> None:
        self.spec, self.state_dir = spec, state_dir
        self.group_bytes = 0.0  # LLM: serialized bytes of one group chunk (set by the caller)
        from learner.process import build_learner

        if spec.robot:
            from bench.payloads import learner_specs
            from learner.config import LearnerConfig
            cfg = LearnerConfig(job_id=JOB, host="127.0.0.1", port=0, metrics_port=None, state_dir=state_dir, tasks=[TASK],
                                chunk_steps=chunk_steps, max_episode_steps=episode_steps, min_online_steps=10 ** 12,
                                max_updates_per_s=0.1, checkpoint_every_s=1e6, device="cpu", **learner_specs(spec),
                                images={"storage": image_storage})
            self.proc = build_learner(cfg).serve()
        else:
            from bench.payloads import llm_learner_config
            from learner.llm.config import LlmLearnerConfig

            cfg = LlmLearnerConfig.model_validate(llm_learner_config(str(state_dir), JOB, TASK))
            self.proc = build_learner(cfg).serve(train=False)  # training thread not started: groups queue, nothing trains
        self.core, self.port = self.proc.core, self.proc.port
        self.target = f"127.0.0.1:{self.port}"

    def counters(self) -> dict[str, float]:
        if self.spec.robot:
            reg, labels = self.core.metrics.registry, {"job": JOB}
            return {"steps": float(self.core.ingestor.steps_total),
                    "bytes": reg.get_sample_value("fleetloop_learner_ingested_bytes_total", labels) or 0.0,
                    "messages": reg.get_sample_value("fleetloop_learner_ingested_chunks_total", labels) or 0.0}
        stored = float(self.core.ingestor.stored)  # every group chunk has the same size (fixed-length ids)
        return {"steps": stored, "bytes": stored * self.group_bytes, "messages": stored}

    def stop(self) -> None:
        self.proc.stop(checkpoint=False, grace_s=1.0, wait_s=10.0, announce=False)


# -- one (payload, K) ------------------------------------------------------------------------------
def _slice(active, counters: Callable[[], dict[str, float]], warm: float, seconds: float) -> dict[str, float]:
    """Let one path run: ``warm`` s unmeasured, ``seconds`` measured; then pause it and wait until its
    in-flight traffic drained (its message counter stands still for 0.3 s, at most 15 s)."""
    active.set()
    try:
        time.sleep(warm)
        t0, c0, a = time.monotonic(), cpu_seconds(), counters()
        time.sleep(seconds)
        t1, c1, b = time.monotonic(), cpu_seconds(), counters()
    finally:
        active.clear()
    out = {k: b[k] - a[k] for k in a}
    out.update(window_s=t1 - t0, server_cpu_s=c1 - c0)
    last, quiet_since, give_up = counters()["messages"], time.monotonic(), time.monotonic() + 15.0
    while time.monotonic() - quiet_since < 0.3 and time.monotonic() < give_up:
        time.sleep(0.05)
        now = counters()["messages"]
        if now != last:
            last, quiet_since = now, time.monotonic()
    return out


def _totals(slices: list[dict[str, float]], per_step: float | None = None) -> dict[str, Any]:
    tot = {k: sum(s[k] for s in slices) for k in slices[0]}
    dt, msgs = tot["window_s"], tot["messages"]
    steps = tot["steps"] if per_step is None else tot["bytes"] / per_step
    return {"window_s": dt, "messages": msgs, "bytes": tot["bytes"], "steps": steps, "steps_per_s": steps / dt,
            "messages_per_s": msgs / dt, "mb_per_s": tot["bytes"] / dt / MB, "server_cpu_util": tot["server_cpu_s"] / dt,
            "server_cpu_us_per_message": tot["server_cpu_s"] / msgs * 1e6 if msgs else None, "slices": slices}


def _backlog(spec: PayloadSpec, chunk_bytes: float) -> int:
    """Unacknowledged chunks an actor lets pile up before it waits: 2 windows, at most SPOOL_BUDGET_BYTES."""
    return max(4, min(2 * MAX_INFLIGHT, int(SPOOL_BUDGET_BYTES // max(1.0, chunk_bytes))))


def measure(spec: PayloadSpec, k: int, cfg: IngestConfig, tmp: Path, profile_s: float = 0.0) -> dict[str, Any]:
    """Both paths for ``k`` actors of ``spec`` in alternating slices (plus a profiled slice when ``profile_s``)."""
    from bench.ingest_workers import raw_messages

    episode_steps = min(cfg.episode_steps, spec.max_episode_steps or cfg.episode_steps)
    sample = raw_messages(spec, 4242, JOB, TASK)
    msg_bytes = sum(len(m) for m in sample) / len(sample)
    per_step = msg_bytes if not spec.robot else sum(len(m) for m in sample) / (16 if spec.images else 200)
    backlog = _backlog(spec, msg_bytes)
    procs = min(k, cfg.processes)
    shares = [list(range(p, k, procs)) for p in range(procs)]
    state_dir = tmp / f"learner-{spec.name}-k{k}"
    learner = _Learner(spec, state_dir, spec.chunk_steps, episode_steps, cfg.image_storage)
    learner.group_bytes = msg_bytes
    fl_slices, raw_slices, profile = [], [], None
    try:
        with RawServer(max_message_bytes=8 << 20) as server, Children() as children:
            ctx = children.ctx
            ready_q, result_q = ctx.Queue(), ctx.Queue()
            fl_active, raw_active, stop = ctx.Event(), ctx.Event(), ctx.Event()
            per = cfg.seconds / cfg.slices
            hard = READY_TIMEOUT_S + 2 * (cfg.warmup_s + cfg.seconds) + 20 * cfg.slices + profile_s + 120
            wcfg = {"spec": spec.__dict__, "learner": learner.target, "raw_target": server.target, "job": JOB, "task": TASK,
                    "spool_root": str(tmp / f"spool-{spec.name}-k{k}"), "max_inflight": MAX_INFLIGHT,
                    "episode_steps": episode_steps, "backlog": backlog, "raw_window": min(MAX_INFLIGHT, backlog)}
            try:
                for p, share in enumerate(shares):
                    children.start(_worker_entry, p, wcfg | {"actors": share}, ready_q, fl_active, raw_active, stop,
                                   result_q, hard, name=f"bench-ingest-{p}")
                wait_ready(ready_q, procs, READY_TIMEOUT_S, children, f"{spec.name}: client processes")
                for n in range(cfg.slices):
                    warm = cfg.warmup_s if n == 0 else min(cfg.warmup_s, 0.5)
                    fl_slices.append(_slice(fl_active, learner.counters, warm, per))
                    raw_slices.append(_slice(raw_active, lambda: _raw_counters(server), warm, per))
                if profile_s > 0:
                    profile = _profiled_slice(fl_active, profile_s)
            finally:
                stop.set()
                fl_active.set()
                raw_active.set()
            reports = collect(result_q, procs, 60.0)
    finally:
        learner.stop()
        shutil.rmtree(state_dir, ignore_errors=True)
        shutil.rmtree(tmp / f"spool-{spec.name}-k{k}", ignore_errors=True)
    actors = sorted((a for r in reports for a in r.get("actors", [])), key=lambda a: a["idx"])
    raw_streams = [s for r in reports for s in r.get("raw", [])]
    fl, raw = _totals(fl_slices), _totals(raw_slices, per_step)
    fl_acked, raw_acked = sum(a["acked"] for a in actors), sum(s["acked"] for s in raw_streams)
    fl_cpu, raw_cpu = (sum(r["cpu_s"][key] for r in reports if "cpu_s" in r) for key in ("fleetloop", "raw"))
    fl.update(client_cpu_us_per_message=fl_cpu / fl_acked * 1e6 if fl_acked else None, actors=actors,
              loadavg_1m_at_end=load_average())
    raw.update(client_cpu_us_per_message=raw_cpu / raw_acked * 1e6 if raw_acked else None,
               streams=raw_streams, message_bytes=round(msg_bytes), bytes_per_step=per_step)
    by_slice = [ratio(f["steps"] / f["window_s"], r["bytes"] / per_step / r["window_s"])
                for f, r in zip(fl_slices, raw_slices)]
    return {"payload": spec.name, "actors": k, "processes": procs, "backlog_chunks": backlog,
            "episode_steps": episode_steps, "fleetloop": fl, "raw_grpc": raw, "profile": profile,
            "ratio": {key: ratio(fl[key], raw[key]) for key in ("steps_per_s", "messages_per_s", "mb_per_s")}
            | {"steps_per_s_by_slice": by_slice}}


def _worker_entry(*args):
    from bench.ingest_workers import worker

    worker(*args)


def _raw_counters(server: RawServer) -> dict[str, float]:
    messages, nbytes = server.counters()
    return {"messages": float(messages), "bytes": float(nbytes), "steps": 0.0}


def _profiled_slice(active, seconds: float) -> dict[str, Any] | None:
    """One unmeasured fleetloop slice with py-spy sampling this process (the learner); None without py-spy."""
    from bench.ingest_profile import py_spy_profile

    active.set()
    try:
        time.sleep(0.5)
        return py_spy_profile(seconds)
    finally:
        active.clear()
        time.sleep(1.0)  # let the backlog drain before the next configuration


# -- the whole run --------------------------------------------------------------------------------
def run_ingest(cfg: IngestConfig) -> dict[str, Any]:
    """Every (payload, K) of ``cfg``; returns the result document (rows, goals, plots, profile, runs)."""
    from bench.ingest_report import build_document

    t_start = time.monotonic()
    runs = []
    specs = [payload_spec(p, cfg.chunk_steps, cfg.image_codec) for p in cfg.payloads]
    with quiet_fleetloop_logs(), tempfile.TemporaryDirectory(prefix="fleetloop-bench-ingest-") as tmp:
        for spec in specs:
            for k in cfg.actor_counts:
                log_progress(f"ingest {spec.name}: {k} actor(s) / raw stream(s), {cfg.seconds:g} s each path in "
                             f"{cfg.slices} alternating slices")
                prof = cfg.profile_seconds if k == max(cfg.actor_counts) else 0.0
                runs.append(measure(spec, k, cfg, Path(tmp), prof))
    return build_document(cfg, specs, runs, machine_info(), time.monotonic() - t_start, command(cfg))


def command(cfg: IngestConfig) -> str:
    """The command line that reproduces ``cfg``."""
    defaults = IngestConfig()
    parts = ["fleetloop bench ingest"]
    for name in IngestConfig.model_fields:
        value = getattr(cfg, name)
        if value != getattr(defaults, name):
            parts.append(f"--{name.replace('_', '-')} {value:g}" if isinstance(value, float) else
                         f"--{name.replace('_', '-')} {value}")
    return " ".join(parts + ["--out F.json"])


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of ``fleetloop bench ingest``."""
    from bench.runner import add_model_arguments

    add_model_arguments(p, IngestConfig)


def plan(args: argparse.Namespace) -> IngestConfig:
    """The config of ``args``; ValueError naming the flag and value when one is bad."""
    from bench.runner import model_from_args

    return model_from_args(IngestConfig, args)


def main(args: argparse.Namespace) -> int:
    """Run, write the JSON, print the table; 2 on a bad flag (:func:`bench.runner.run_reported`)."""
    from bench.runner import run_reported

    def plan_run(a: argparse.Namespace) -> Callable[[], dict[str, Any]]:
        cfg = plan(a)
        return lambda: run_ingest(cfg)

    return run_reported("ingest", args, plan_run)
