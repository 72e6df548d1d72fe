"""Ingest throughput: K actors streaming experience into one learner, vs raw gRPC of the same bytes.

fleetloop path (per actor count K):
  an in-process learner (``learner.ray_learner._RayLearnerImpl``: the real LearnerCore, gRPC
  server and training thread, no Ray) on a loopback port; K actor processes (multiprocessing
  ``spawn``, so no shared GIL) each run the real actor runtime (``FleetClient`` + ``EpisodeRecorder``,
  disk spool in a temp folder, background ``Sender``) and record synthetic state-only episodes of
  200 steps (obs ``state`` f32[39], action ``action`` f32[4], random values) as fast as they can.
  A robot never outruns its uplink forever: an actor waits while more than ``BACKLOG`` chunks sit
  unacknowledged in its spool. Measured on the learner: steps, chunks and serialized bytes stored
  (``status()['ingested_steps']`` and the ``fleetloop_learner_ingested_*`` counters) over the
  window after a warm-up.

  Training is kept off the CPU: ``min_online_steps=10**12`` means ``train_step`` returns at once
  (after a buffer-size check under the ingest lock), and ``max_updates_per_s=0.1`` makes the
  training loop sleep ~10 s between those checks (see ``bench.common.start_learner_in_process``).

raw baseline (same K, same run, same total window):
  a generic stream-stream gRPC handler with identity serializers (bench.common.RawServer) in this
  process; K client processes send the very same serialized ``EpisodeChunk`` bytes (built with the
  real ``EpisodeRecorder``) with the same flow control as the actor's Sender (at most
  ``max_inflight`` = 32 unacknowledged messages); each message is acknowledged with 2 bytes.
  Reported: messages/s, MB/s and equivalent steps/s (bytes / bytes per step of the same episode).

Both paths are up at once and take turns (fleetloop slice, raw slice, fleetloop slice, ...): the
measurement time is split into up to 5 alternating slices of >= 1.5 s each, each after a short
warm-up and after the other path's traffic has drained, so a shared machine's changing load hits
both alike. Rates are totals over all slices; per-slice ratios are kept to show the spread.

ratio = fleetloop / raw (higher is better; 1.0 = fleetloop adds nothing over the transport).
"""

from __future__ import annotations

import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable

from bench.common import (EPISODE_STEPS, JOB, MB, TASK, Children, RawServer, child_setup, collect, cpu_seconds,
                          load_average, log_progress, machine_info, quiet_fleetloop_logs, ratio, raw_ingest_client, row,
                          start_learner_in_process, stop_learner_in_process, wait_ready)

OBS_DIM, ACT_DIM = 39, 4
MAX_INFLIGHT = 32          # the FleetClient default
BACKLOG = 2 * MAX_INFLIGHT  # spooled-but-unacknowledged chunks an actor lets pile up before it waits
READY_TIMEOUT_S = 180.0


def synthetic_episode(seed: int, steps: int = EPISODE_STEPS):
    """Random observations [steps, 39], actions [steps, 4] in [-1, 1] and rewards [steps] (float32)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return (rng.standard_normal((steps, OBS_DIM), dtype=np.float32),
            rng.uniform(-1.0, 1.0, (steps, ACT_DIM)).astype(np.float32),
            rng.standard_normal(steps, dtype=np.float32))


def episode_messages(chunk_steps: int, actor_id: str, seed: int, steps: int = EPISODE_STEPS) -> list[bytes]:
    """The serialized EpisodeChunks of one synthetic episode, produced by the real EpisodeRecorder
    (a duck-typed client captures what it would spool): the exact bytes an actor sends."""
    from types import SimpleNamespace

    from actor.main import robot_specs
    from actor.runtime import EpisodeRecorder
    from fleetloop.v1 import fleetloop_pb2 as pb

    obs_specs, act_specs = robot_specs()
    captured: list[bytes] = []
    fake = SimpleNamespace(job_id=JOB, actor_id=actor_id, observation_specs=obs_specs, action_specs=act_specs,
                           run_config=pb.RunConfig(chunk_steps=chunk_steps, task_ids=[TASK]),
                           spool=SimpleNamespace(put=lambda episode_id, seq, raw: captured.append(raw)),
                           _episode_closed=lambda rec, outcome: None)
    obs, act, rew = synthetic_episode(seed, steps)
    rec = EpisodeRecorder(fake, TASK, f"{actor_id}-{uuid.uuid4().hex[:16]}", 0)
    for t in range(steps):
        rec.record(obs[t], act[t], float(rew[t]), False)
    rec.end("timeout")
    return captured


# -- child: one fleetloop actor -----------------------------------------------------------------
def fleet_actor(idx: int, target: str, spool_dir: str, ready_q, active, stop, result_q, hard_deadline_s: float) -> None:
    """Child process: connect with the real runtime, then record synthetic episodes whenever
    ``active`` is set (whole episodes; paused between them otherwise) until ``stop``."""
    client = None
    try:
        life = child_setup(hard_deadline_s)
        from actor.main import robot_specs
        from actor.runtime import FleetClient

        obs_specs, act_specs = robot_specs()
        client = FleetClient(target, JOB, f"bench-actor-{idx}", obs_specs, act_specs, [TASK], spool_dir=spool_dir,
                             max_inflight=MAX_INFLIGHT, connect_timeout_s=60.0)
        client.connect()
        obs, act, rew = synthetic_episode(1000 + idx)
        rewards = [float(r) for r in rew]
        ready_q.put({"idx": idx, "ready": True})
        episodes = steps = 0
        waited = 0.0
        cpu0 = cpu_seconds()
        while not stop.is_set() and life.ok():
            if not active.is_set():
                active.wait(0.2)
                continue
            ep = client.begin_episode(TASK)
            for t in range(EPISODE_STEPS):
                ep.record(obs[t], act[t], rewards[t], False)
            ep.end("timeout")
            episodes += 1
            steps += EPISODE_STEPS
            t0 = time.monotonic()
            while len(client.spool) > BACKLOG and not stop.is_set() and life.ok():
                time.sleep(0.002)
            waited += time.monotonic() - t0
        result_q.put({"idx": idx, "episodes": episodes, "steps_recorded": steps, "acked_chunks": client.sender.acked,
                      "duplicates": client.sender.duplicates, "rejected": client.sender.rejected,
                      "reconnects": client.sender.reconnects, "spooled_at_stop": len(client.spool),
                      "backlog_wait_s": round(waited, 3), "cpu_s": round(cpu_seconds() - cpu0, 3)})
    except Exception as exc:  # report, never hang the parent
        ready_q.put({"idx": idx, "error": repr(exc)[:500]})
        result_q.put({"idx": idx, "error": repr(exc)[:500]})
    finally:
        if client is not None:
            client.close(flush_timeout=0)


# -- measurements ------------------------------------------------------------------------------
def _learner_counters(core) -> dict[str, float]:
    reg, labels = core.metrics.registry, {"job": JOB}
    return {"steps": float(core.status()["ingested_steps"]),
            "bytes": reg.get_sample_value("fleetloop_learner_ingested_bytes_total", labels) or 0.0,
            "messages": reg.get_sample_value("fleetloop_learner_ingested_chunks_total", labels) or 0.0,
            "lat_sum": reg.get_sample_value("fleetloop_learner_ingest_latency_seconds_sum", labels) or 0.0,
            "lat_count": reg.get_sample_value("fleetloop_learner_ingest_latency_seconds_count", labels) or 0.0}


def _raw_counters(server: RawServer) -> dict[str, float]:
    messages, nbytes = server.counters()
    return {"messages": float(messages), "bytes": float(nbytes)}


def _slice(active, counters: Callable[[], dict[str, float]], warm: float, seconds: float) -> dict[str, float]:
    """Let one path run: ``warm`` seconds unmeasured, then ``seconds`` measured; then pause it and
    wait until its in-flight traffic has drained (its message counter stands still)."""
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
    last, quiet_since, give_up = counters()["messages"], time.monotonic(), time.monotonic() + 10.0
    while time.monotonic() - quiet_since < 0.2 and time.monotonic() < give_up:
        time.sleep(0.05)
        now = counters()["messages"]
        if now != last:
            last, quiet_since = now, time.monotonic()
    return out


def _totals(slices: list[dict[str, float]], bytes_per_step: float | None = None) -> dict[str, Any]:
    tot = {k: sum(s[k] for s in slices) for k in slices[0]}
    dt, msgs = tot["window_s"], tot["messages"]
    steps = tot["steps"] if bytes_per_step is None else tot["bytes"] / bytes_per_step
    out = {"window_s": dt, "messages": msgs, "bytes": tot["bytes"], "steps": steps,
           "steps_per_s": steps / dt, "messages_per_s": msgs / dt, "mb_per_s": tot["bytes"] / dt / MB,
           "server_cpu_util": tot["server_cpu_s"] / dt,
           "server_cpu_us_per_message": tot["server_cpu_s"] / msgs * 1e6 if msgs else None,
           "slices": slices}
    if "lat_count" in tot:
        out["mean_produce_to_store_s"] = tot["lat_sum"] / tot["lat_count"] if tot["lat_count"] else None
    return out


def _client_cpu_per_message(reports: list[dict[str, Any]], count_key: str) -> float | None:
    """CPU time of the client processes (ready -> stop, all threads) per acknowledged message, in us."""
    n = sum(r.get(count_key, 0) for r in reports)
    return sum(r.get("cpu_s", 0.0) for r in reports) / n * 1e6 if n else None


def measure(k: int, seconds: float, warmup: float, chunk_steps: int, tmp: Path) -> dict[str, Any]:
    """Both paths for ``k`` clients, in alternating slices; returns {'fleetloop', 'raw_grpc', 'ratio'}."""
    messages = [episode_messages(chunk_steps, f"bench-raw-{i}", 1000 + i) for i in range(k)]
    bytes_per_step = sum(len(m) for m in messages[0]) / EPISODE_STEPS
    n_slices = max(1, min(5, int(seconds / 1.5)))
    fl_slices, raw_slices = [], []
    impl = start_learner_in_process(tmp / f"learner-k{k}", chunk_steps)
    try:
        with RawServer() as server, Children() as children:
            ctx = children.ctx
            ready_q, result_q = ctx.Queue(), ctx.Queue()
            fl_active, raw_active, stop = ctx.Event(), ctx.Event(), ctx.Event()
            try:
                hard = READY_TIMEOUT_S + 2 * (warmup + seconds) + 10 * n_slices + 60
                for i in range(k):
                    children.start(fleet_actor, i, f"127.0.0.1:{impl.port}", str(tmp / f"spool-k{k}-{i}"), ready_q,
                                   fl_active, stop, result_q, hard, name=f"bench-actor-{i}")
                    children.start(raw_ingest_client, i, server.target, messages[i], MAX_INFLIGHT, ready_q, raw_active,
                                   stop, result_q, hard, name=f"bench-raw-client-{i}")
                wait_ready(ready_q, 2 * k, READY_TIMEOUT_S, children, "actors and raw gRPC clients")
                for n in range(n_slices):
                    warm = warmup if n == 0 else min(warmup, 0.5)
                    fl_slices.append(_slice(fl_active, lambda: _learner_counters(impl.core), warm, seconds / n_slices))
                    raw_slices.append(_slice(raw_active, lambda: _raw_counters(server), warm, seconds / n_slices))
            finally:
                stop.set()
                fl_active.set()
                raw_active.set()
            reports = collect(result_q, 2 * k, 30.0)
    finally:
        stop_learner_in_process(impl)
    actors = sorted((r for r in reports if "acked_chunks" in r), key=lambda r: r["idx"])
    clients = sorted((r for r in reports if "acked" in r), key=lambda r: r["idx"])
    fl = _totals(fl_slices)
    fl.update(client_cpu_us_per_message=_client_cpu_per_message(actors, "acked_chunks"), actors=actors,
              loadavg_1m_at_end=load_average())
    raw = _totals(raw_slices, bytes_per_step)
    raw.update(client_cpu_us_per_message=_client_cpu_per_message(clients, "acked"), clients=clients,
               message_bytes=[len(m) for m in messages[0]], bytes_per_step=bytes_per_step)
    by_slice = [ratio(f["steps"] / f["window_s"], r["bytes"] / bytes_per_step / r["window_s"])
                for f, r in zip(fl_slices, raw_slices)]
    return {"actors": k, "fleetloop": fl, "raw_grpc": raw,
            "ratio": {key: ratio(fl[key], raw[key]) for key in ("steps_per_s", "messages_per_s", "mb_per_s")}
            | {"steps_per_s_by_slice": by_slice}}


def run_ingest(actor_counts: list[int], seconds: float, chunk_steps: int) -> dict[str, Any]:
    """Run both paths for every K in ``actor_counts``; returns the result document (rows + details)."""
    warmup = min(2.0, max(0.5, 0.2 * seconds))
    config = {"actors": actor_counts, "seconds": seconds, "warmup_s": warmup, "chunk_steps": chunk_steps,
              "episode_steps": EPISODE_STEPS, "obs": f"state float32[{OBS_DIM}]", "action": f"action float32[{ACT_DIM}]",
              "task": TASK, "max_inflight": MAX_INFLIGHT, "actor_backlog_chunks": BACKLOG,
              "training": "off: min_online_steps=10**12 (train_step returns at once), max_updates_per_s=0.1 (loop sleeps ~10 s)",
              "clients": "separate processes (multiprocessing spawn)", "mb": "10^6 bytes",
              "slices": max(1, min(5, int(seconds / 1.5))), "order": "fleetloop, raw, fleetloop, raw, ..."}
    runs, rows = [], []
    with quiet_fleetloop_logs(), tempfile.TemporaryDirectory(prefix="fleetloop-bench-ingest-") as tmp:
        for k in actor_counts:
            log_progress(f"ingest: {k} actor(s) / raw client(s), {seconds:g} s each path in alternating slices "
                         f"(+{warmup:g} s warm-up)")
            run = measure(k, seconds, warmup, chunk_steps, Path(tmp))
            runs.append(run)
            fl, raw = run["fleetloop"], run["raw_grpc"]
            rows += [row("steps/s", "steps/s", k, fl["steps_per_s"], raw["steps_per_s"], "higher",
                         "raw: bytes / bytes per step"),
                     row("chunks/s", "msg/s", k, fl["messages_per_s"], raw["messages_per_s"], "higher"),
                     row("throughput", "MB/s", k, fl["mb_per_s"], raw["mb_per_s"], "higher"),
                     row("server CPU per chunk", "us", k, fl["server_cpu_us_per_message"], raw["server_cpu_us_per_message"],
                         "lower", "CPU time of the serving process / messages"),
                     row("client CPU per chunk", "us", k, fl["client_cpu_us_per_message"], raw["client_cpu_us_per_message"],
                         "lower", "CPU time of the actor / raw client processes / acked messages")]
    notes = [f"{chunk_steps} steps per chunk, ~{runs[0]['raw_grpc']['message_bytes'][0]} bytes per chunk" if runs else "",
             "fleetloop: bytes/steps stored on the learner; raw: bytes received by a bytes-in/bytes-out gRPC handler",
             "fleetloop actors also record the episode (EpisodeRecorder) and spool every chunk to disk; raw clients "
             "resend prepared bytes: the client CPU row shows that share"]
    return {"bench": "ingest", "machine": machine_info(), "config": config, "rows": rows, "runs": runs,
            "notes": [n for n in notes if n]}
