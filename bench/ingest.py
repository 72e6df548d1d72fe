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

raw baseline (same K, same run, same window lengths):
  a generic stream-stream gRPC handler with identity serializers (bench.common.RawServer) in this
  process; K client processes send the very same serialized ``EpisodeChunk`` bytes (built with the
  real ``EpisodeRecorder``) with the same flow control as the actor's Sender (at most
  ``max_inflight`` = 32 unacknowledged messages); each message is acknowledged with 2 bytes.
  Reported: messages/s, MB/s and equivalent steps/s (bytes / bytes per step of the same episode).

ratio = fleetloop / raw (higher is better; 1.0 = fleetloop adds nothing over the transport).
"""

from __future__ import annotations

import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

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
def fleet_actor(idx: int, target: str, spool_dir: str, ready_q, go, stop, result_q, hard_deadline_s: float) -> None:
    """Child process: connect with the real runtime and record synthetic episodes until ``stop``."""
    client = None
    try:
        child_setup()
        from actor.main import robot_specs
        from actor.runtime import FleetClient

        obs_specs, act_specs = robot_specs()
        client = FleetClient(target, JOB, f"bench-actor-{idx}", obs_specs, act_specs, [TASK], spool_dir=spool_dir,
                             max_inflight=MAX_INFLIGHT, connect_timeout_s=60.0)
        client.connect()
        obs, act, rew = synthetic_episode(1000 + idx)
        rewards = [float(r) for r in rew]
        ready_q.put({"idx": idx, "ready": True})
        go.wait(hard_deadline_s)
        end_by = time.monotonic() + hard_deadline_s
        episodes = steps = 0
        waited = 0.0
        cpu0 = cpu_seconds()
        while not stop.is_set() and time.monotonic() < end_by:
            ep = client.begin_episode(TASK)
            for t in range(EPISODE_STEPS):
                ep.record(obs[t], act[t], rewards[t], False)
            ep.end("timeout")
            episodes += 1
            steps += EPISODE_STEPS
            t0 = time.monotonic()
            while len(client.spool) > BACKLOG and not stop.is_set():
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
def _learner_snapshot(core) -> dict[str, float]:
    reg, labels = core.metrics.registry, {"job": JOB}
    return {"t": time.monotonic(), "cpu": cpu_seconds(), "steps": float(core.status()["ingested_steps"]),
            "bytes": reg.get_sample_value("fleetloop_learner_ingested_bytes_total", labels) or 0.0,
            "chunks": reg.get_sample_value("fleetloop_learner_ingested_chunks_total", labels) or 0.0,
            "lat_sum": reg.get_sample_value("fleetloop_learner_ingest_latency_seconds_sum", labels) or 0.0,
            "lat_count": reg.get_sample_value("fleetloop_learner_ingest_latency_seconds_count", labels) or 0.0}


def measure_fleetloop(k: int, seconds: float, warmup: float, chunk_steps: int, tmp: Path) -> dict[str, Any]:
    impl = start_learner_in_process(tmp / f"learner-k{k}", chunk_steps)
    try:
        target = f"127.0.0.1:{impl.port}"
        with Children() as children:
            ctx = children.ctx
            ready_q, result_q, go, stop = ctx.Queue(), ctx.Queue(), ctx.Event(), ctx.Event()
            try:
                hard = READY_TIMEOUT_S + warmup + seconds + 60
                for i in range(k):
                    children.start(fleet_actor, i, target, str(tmp / f"spool-k{k}-{i}"), ready_q, go, stop, result_q, hard,
                                   name=f"bench-actor-{i}")
                wait_ready(ready_q, k, READY_TIMEOUT_S, children, "fleetloop actors")
                go.set()
                time.sleep(warmup)
                s0 = _learner_snapshot(impl.core)
                time.sleep(seconds)
                s1 = _learner_snapshot(impl.core)
            finally:
                stop.set()
            actors = collect(result_q, k, 30.0)
    finally:
        stop_learner_in_process(impl)
    dt = s1["t"] - s0["t"]
    chunks = s1["chunks"] - s0["chunks"]
    lat_n = s1["lat_count"] - s0["lat_count"]
    return {"window_s": dt, "steps": s1["steps"] - s0["steps"], "chunks": chunks, "bytes": s1["bytes"] - s0["bytes"],
            "steps_per_s": (s1["steps"] - s0["steps"]) / dt, "chunks_per_s": chunks / dt,
            "mb_per_s": (s1["bytes"] - s0["bytes"]) / dt / MB,
            "server_cpu_util": (s1["cpu"] - s0["cpu"]) / dt,
            "server_cpu_us_per_chunk": (s1["cpu"] - s0["cpu"]) / chunks * 1e6 if chunks else None,
            "mean_produce_to_store_s": (s1["lat_sum"] - s0["lat_sum"]) / lat_n if lat_n else None,
            "loadavg_1m_at_end": load_average(),
            "client_cpu_us_per_chunk": _client_cpu_per_message(actors, "acked_chunks"),
            "actors": sorted(actors, key=lambda a: a["idx"])}


def _client_cpu_per_message(reports: list[dict[str, Any]], count_key: str) -> float | None:
    """CPU time of the client processes (go -> stop, all threads) per acknowledged message, in us."""
    n = sum(r.get(count_key, 0) for r in reports)
    return sum(r.get("cpu_s", 0.0) for r in reports) / n * 1e6 if n else None


def measure_raw(k: int, seconds: float, warmup: float, chunk_steps: int) -> dict[str, Any]:
    messages = [episode_messages(chunk_steps, f"bench-raw-{i}", 1000 + i) for i in range(k)]
    episode_bytes = sum(len(m) for m in messages[0])
    bytes_per_step = episode_bytes / EPISODE_STEPS
    with RawServer() as server, Children() as children:
        ctx = children.ctx
        ready_q, result_q, go, stop = ctx.Queue(), ctx.Queue(), ctx.Event(), ctx.Event()
        try:
            hard = READY_TIMEOUT_S + warmup + seconds + 60
            for i in range(k):
                children.start(raw_ingest_client, i, server.target, messages[i], MAX_INFLIGHT, ready_q, go, stop, result_q,
                               hard, name=f"bench-raw-client-{i}")
            wait_ready(ready_q, k, READY_TIMEOUT_S, children, "raw gRPC clients")
            go.set()
            time.sleep(warmup)
            t0, c0, (m0, b0) = time.monotonic(), cpu_seconds(), server.counters()
            time.sleep(seconds)
            t1, c1, (m1, b1) = time.monotonic(), cpu_seconds(), server.counters()
        finally:
            stop.set()
        clients = collect(result_q, k, 30.0)
    dt = t1 - t0
    msgs, nbytes = m1 - m0, b1 - b0
    return {"window_s": dt, "messages": msgs, "bytes": nbytes, "messages_per_s": msgs / dt, "mb_per_s": nbytes / dt / MB,
            "equiv_steps_per_s": nbytes / bytes_per_step / dt, "server_cpu_util": (c1 - c0) / dt,
            "server_cpu_us_per_message": (c1 - c0) / msgs * 1e6 if msgs else None,
            "message_bytes": [len(m) for m in messages[0]], "bytes_per_step": bytes_per_step,
            "loadavg_1m_at_end": load_average(),
            "client_cpu_us_per_chunk": _client_cpu_per_message(clients, "acked"),
            "clients": sorted(clients, key=lambda c: c["idx"])}


def run_ingest(actor_counts: list[int], seconds: float, chunk_steps: int) -> dict[str, Any]:
    """Run both paths for every K in ``actor_counts``; returns the result document (rows + details)."""
    warmup = min(2.0, max(0.5, 0.2 * seconds))
    config = {"actors": actor_counts, "seconds": seconds, "warmup_s": warmup, "chunk_steps": chunk_steps,
              "episode_steps": EPISODE_STEPS, "obs": f"state float32[{OBS_DIM}]", "action": f"action float32[{ACT_DIM}]",
              "task": TASK, "max_inflight": MAX_INFLIGHT, "actor_backlog_chunks": BACKLOG,
              "training": "off: min_online_steps=10**12 (train_step returns at once), max_updates_per_s=0.1 (loop sleeps ~10 s)",
              "clients": "separate processes (multiprocessing spawn)", "mb": "10^6 bytes"}
    runs, rows = [], []
    with quiet_fleetloop_logs(), tempfile.TemporaryDirectory(prefix="fleetloop-bench-ingest-") as tmp:
        for k in actor_counts:
            log_progress(f"ingest: fleetloop, {k} actor(s), {seconds:g} s (+{warmup:g} s warm-up)")
            fl = measure_fleetloop(k, seconds, warmup, chunk_steps, Path(tmp))
            log_progress(f"ingest: raw gRPC, {k} client(s), {seconds:g} s (+{warmup:g} s warm-up)")
            raw = measure_raw(k, seconds, warmup, chunk_steps)
            runs.append({"actors": k, "fleetloop": fl, "raw_grpc": raw,
                         "ratio": {"steps_per_s": ratio(fl["steps_per_s"], raw["equiv_steps_per_s"]),
                                   "mb_per_s": ratio(fl["mb_per_s"], raw["mb_per_s"]),
                                   "chunks_per_s": ratio(fl["chunks_per_s"], raw["messages_per_s"])}})
            rows += [row("steps/s", "steps/s", k, fl["steps_per_s"], raw["equiv_steps_per_s"], "higher",
                         "raw: bytes / bytes per step"),
                     row("chunks/s", "msg/s", k, fl["chunks_per_s"], raw["messages_per_s"], "higher"),
                     row("throughput", "MB/s", k, fl["mb_per_s"], raw["mb_per_s"], "higher"),
                     row("server CPU per chunk", "us", k, fl["server_cpu_us_per_chunk"], raw["server_cpu_us_per_message"],
                         "lower", "CPU time of the serving process / messages"),
                     row("client CPU per chunk", "us", k, fl["client_cpu_us_per_chunk"], raw["client_cpu_us_per_chunk"],
                         "lower", "CPU time of the actor / raw client processes / acked messages")]
    notes = [f"{chunk_steps} steps per chunk, ~{runs[0]['raw_grpc']['message_bytes'][0]} bytes per chunk" if runs else "",
             "fleetloop: bytes/steps stored on the learner; raw: bytes received by a bytes-in/bytes-out gRPC handler",
             "fleetloop actors also record the episode (EpisodeRecorder) and spool every chunk to disk; raw clients "
             "resend prepared bytes: the client CPU row shows that share"]
    return {"bench": "ingest", "machine": machine_info(), "config": config, "rows": rows, "runs": runs,
            "notes": [n for n in notes if n]}
