"""Step -> trainable latency: a step produced on a robot until the learner's sampler can draw it, vs raw gRPC.

fleetloop path (per chunk size C and actor count K, ``fleetloop bench latency``):
  an in-process learner (``bench.common.start_learner_in_process``: the real LearnerCore, gRPC server
  and training thread, training idle) asks actors for chunks of C steps. K actor processes
  (``spawn``) run the real actor runtime (``FleetClient`` + ``EpisodeRecorder`` + disk spool +
  background ``Sender``) paced at ``hz`` steps/s like a robot control loop (200-step episodes, random
  phase per actor). Every step is an operator correction (``intervened=True``), so under HG-DAgger
  it is trainable the moment it is stored.

  Clocks (one machine, one system clock, ``time.time()`` everywhere):

  - **produced**: wall time taken just before ``EpisodeRecorder.record``, written into the step's
    own observation (``state[0] + state[1]``: seconds since the bench's base time, split into a
    float32 and its float32 residual so the float32 observation carries it to ~1 us);
  - **spooled**: the actor's ``Spool.put`` of the chunk (wrapped in the child to timestamp it): the
    chunk is sealed, serialised and on disk; from here the ``Sender`` thread ships it;
  - **received**: entry of ``Ingestor.ingest`` on the learner (wrapped by the bench): the gRPC
    message arrived and was parsed;
  - **trainable**: the row's ``insert_times`` in the replay store, set by ``ReplayStore.add_online``
    under the ingest lock just before the row becomes visible to ``ReplayStore.sample`` (the
    sampler's training step takes the same lock); no learner file is modified.

  step -> trainable = trainable - produced, for every stored step (matched by the actor index and
  step counter also carried in the observation). Its parts: chunking wait (produced -> spooled),
  send (spooled -> received: sender hand-off, transport, parse) and ingest (received -> trainable:
  validation, ingest-log append, store).

raw baseline (same K, same C, same rate, same run, after the fleetloop phase):
  K client processes produce steps at the same ``hz`` and, every C steps, send the very same
  serialised EpisodeChunk bytes (built with the real ``EpisodeRecorder``) prefixed by a 16-byte
  header (client, message number, send time) over one gRPC stream to a bytes-in handler
  (``bench.common.RawServer``, subclassed to timestamp each receive) in this process. Raw
  step -> received = receive time - each step's production time (the physical floor for chunks of
  C steps at ``hz``); raw one-way = receive time - send time (compare with fleetloop's spooled ->
  trainable).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from bench.common import (EPISODE_STEPS, TASK, Children, RawServer, log_progress, machine_info, quiet_fleetloop_logs,
                          row, start_learner_in_process, stop_learner_in_process)
from bench.fleet_pool import HEADER, MAX_INFLIGHT, READY_TIMEOUT_S, Pool

PCTS = (50, 90, 99)


class LatencyConfig(BaseModel):
    """Flags of ``fleetloop bench latency`` (validated; a bad value names the flag)."""

    model_config = ConfigDict(extra="forbid")

    actors: list[int] = Field([1, 4, 16], min_length=1, description="Actor counts K (each also the raw client count).")
    chunk_steps: list[int] = Field([5, 50], min_length=1, description="Steps per chunk C asked of the actors (50 = the learner default).")
    hz: float = Field(30.0, gt=0, le=2000, description="Steps per second per actor (a robot's control rate).")
    seconds: float = Field(20.0, gt=0, le=600, description="Production time per path (fleetloop, raw) per (C, K).")
    warmup_s: float = Field(2.0, ge=0, le=60, description="Steps produced this long after a phase starts are not in the percentiles.")
    goal_chunk_steps: int = Field(5, ge=1, description="Chunk size of the goal row (a few steps: the streaming setting).")
    max_chunk_wait_s: float = Field(0.5, ge=0, le=3600, description="The learner's max_chunk_wait_s (its default 0.5; 0: "
                                                                     "chunks fill to C steps); the raw clients seal alike.")


# -- measurements ----------------------------------------------------------------------------------
class TimedRawServer(RawServer):
    """RawServer whose ``Ingest`` records (client, message, send time, receive time) per message."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.seen: list[tuple[int, int, float, float]] = []

    def _ingest(self, request_iterator, context):
        for raw in request_iterator:
            now = time.time()
            client, n, sent = HEADER.unpack_from(raw)
            self.seen.append((client, n, sent, now))
            with self._lock:
                self.messages += 1
                self.bytes += len(raw)
            yield b"\x08\x01"


def percentiles(values) -> dict[str, float | None]:
    """P50/P90/P99, max and mean of ``values`` (seconds); None for an empty sample."""
    import numpy as np

    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return {**{f"p{p}": None for p in PCTS}, "max": None, "mean": None, "n": 0}
    return {**{f"p{p}": float(np.percentile(v, p)) for p in PCTS}, "max": float(v.max()), "mean": float(v.mean()),
            "n": int(v.size)}


def quantiles(values, points: int = 200) -> list[float]:
    """``values`` summarised as ``points`` evenly spaced quantiles (min .. max): a sample whose
    empirical CDF is the CDF of ``values`` (what the renderer draws for a ``*_cdf`` plot)."""
    import numpy as np

    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return []
    return [round(float(x), 6) for x in np.quantile(v, np.linspace(0.0, 1.0, points))]


def fleet_phase(pool: Pool, k: int, chunk: int, cfg: LatencyConfig, tmp: Path, base: float) -> dict[str, Any]:
    """The fleetloop path for K actors and chunks of C steps; per-step latencies and their parts."""
    import numpy as np

    from learner.api import LearnerHooks

    recv: dict[tuple[str, int], tuple[float, float]] = {}

    def on_ingest(chunk_msg, t0: float, t1: float, duplicate: bool) -> None:  # the learner's public hook
        recv[(chunk_msg.episode_id, int(chunk_msg.seq))] = (t0, t1)

    impl = start_learner_in_process(tmp / f"learner-c{chunk}-k{k}", chunk, cfg.max_chunk_wait_s,
                                    hooks=LearnerHooks(on_ingest=on_ingest))
    ingestor = impl.core.ingestor
    try:
        cmds = [{"mode": "fleet", "target": f"127.0.0.1:{impl.port}", "spool": str(tmp / f"spool-c{chunk}-k{k}-{i}"),
                 "prefix": f"lat-c{chunk}-k{k}", "hz": cfg.hz, "seconds": cfg.seconds, "base": base, "chunk_steps": chunk}
                for i in range(k)]
        actors = pool.run(cmds, timeout=cfg.seconds + 180.0)
        keys = {episode: k for (_actor, episode), k in ingestor.episode_keys().items()}  # all stored: actors ended
        with ingestor.lock:
            arr = impl.core.replay.export(TASK, "online")
    finally:
        stop_learner_in_process(impl)
    obs = arr["obs.state"].astype(np.float64)
    produced = base + obs[:, 0] + obs[:, 1]
    trainable = arr["insert_times"]
    ident = obs[:, 2].astype(np.int64) * (1 << 32) + obs[:, 3].astype(np.int64)
    # per step: the chunk it travelled in (episode key, first step of the chunk) -> spooled and received
    # times; chunks vary in size (sealed at C steps or after max_chunk_wait_s), so each row is mapped
    # to the chunk of its episode with the largest first step <= its step
    t_put, t_recv, firsts_of = [], [], {}
    for a in actors:
        for episode_id, seq, put_at, first in a["puts"]:
            r = recv.get((episode_id, seq))
            if r is not None and episode_id in keys:
                firsts_of.setdefault(keys[episode_id], []).append((first, len(t_put)))
                t_put.append(put_at)
                t_recv.append(r[0])
    for v in firsts_of.values():
        v.sort()
    lookup = {kk: (np.array([f for f, _ in v]), np.array([i for _, i in v])) for kk, v in firsts_of.items()}

    def chunk_of(kk: int, step: int) -> int:
        if kk not in lookup:
            return -1
        firsts, index = lookup[kk]
        j = int(np.searchsorted(firsts, step, side="right")) - 1
        return int(index[j]) if j >= 0 else -1

    rows_chunk = np.array([chunk_of(int(kk), int(s)) for kk, s in zip(arr["episode_keys"], arr["steps"])], dtype=np.int64)
    put_arr, recv_arr = np.asarray(t_put + [np.nan]), np.asarray(t_recv + [np.nan])
    spooled, received = put_arr[rows_chunk], recv_arr[rows_chunk]
    measured = produced >= (produced.min() if produced.size else 0.0) + cfg.warmup_s
    lat = trainable - produced
    sent_steps = sum(a["steps"] for a in actors)
    return {
        "actors": k, "chunk_steps": chunk, "steps_sent": sent_steps, "steps_stored": int(lat.size),
        "steps_unique": int(np.unique(ident).size), "steps_measured": int(measured.sum()),
        "chunks_spooled": sum(a["chunks"] for a in actors), "chunks_received": len(recv),
        "actors_detail": [{k2: v for k2, v in a.items() if k2 != "puts"} for a in actors],
        "step_to_trainable_s": percentiles(lat[measured]),
        "parts_s": {"chunking_wait": percentiles((spooled - produced)[measured]),
                    "send": percentiles((received - spooled)[measured]),
                    "ingest": percentiles((trainable - received)[measured])},
        "spooled_to_trainable_s": percentiles((trainable - spooled)[measured]),
        "_lat": lat[measured],
    }


def raw_phase(pool: Pool, k: int, chunk: int, cfg: LatencyConfig) -> dict[str, Any]:
    """The raw path for K clients and chunks of C steps (same bytes, same rate)."""
    import numpy as np

    from bench.ingest import episode_messages

    body = episode_messages(chunk, "lat-raw", 7)[0]
    with TimedRawServer() as server:
        cmds = [{"mode": "raw", "target": server.target, "body": body, "chunk_steps": chunk, "hz": cfg.hz,
                 "max_chunk_wait_s": cfg.max_chunk_wait_s,
                 "seconds": cfg.seconds} for _ in range(k)]
        clients = pool.run(cmds, timeout=cfg.seconds + 120.0)
        seen = list(server.seen)
    got = {(c, n): (sent, rcv) for c, n, sent, rcv in seen}
    first = min((c["step_times"][0][0] for c in clients if c["step_times"]), default=0.0)
    step_lat, one_way = [], []
    for c in clients:
        for n, times in enumerate(c["step_times"]):
            sr = got.get((c["idx"], n))
            if sr is None:
                continue
            t = np.asarray(times)
            keep = t >= first + cfg.warmup_s
            step_lat.append(sr[1] - t[keep])
            if keep.any():
                one_way.append(sr[1] - sr[0])
    lat = np.concatenate(step_lat) if step_lat else np.zeros(0)
    return {"actors": k, "chunk_steps": chunk, "message_bytes": len(body) + HEADER.size,
            "messages_sent": sum(c["messages"] for c in clients), "messages_received": len(seen),
            "step_to_received_s": percentiles(lat), "one_way_s": percentiles(one_way), "_lat": lat}


def run_latency(cfg: LatencyConfig) -> dict[str, Any]:
    """Every (C, K): the fleetloop phase, then the raw phase; returns the result document."""
    t0 = time.monotonic()
    base = time.time()
    runs, rows, plots = [], [], {}
    with quiet_fleetloop_logs(), tempfile.TemporaryDirectory(prefix="fleetloop-bench-latency-") as tmpdir, \
            Children() as children:
        tmp = Path(tmpdir)
        n = max(cfg.actors)
        hard = READY_TIMEOUT_S + len(cfg.actors) * len(cfg.chunk_steps) * (2 * cfg.seconds + 240)
        log_progress(f"latency: starting {n} worker processes")
        pool = Pool(children, n, hard)
        try:
            for chunk in cfg.chunk_steps:
                series_fl: dict[str, list] = {}
                for k in cfg.actors:
                    log_progress(f"latency: C={chunk} steps/chunk, K={k} actor(s) at {cfg.hz:g} Hz, {cfg.seconds:g} s per path")
                    fl = fleet_phase(pool, k, chunk, cfg, tmp, base)
                    raw = raw_phase(pool, k, chunk, cfg)
                    plots[f"latency_c{chunk}_k{k}_cdf"] = {
                        "title": f"step latency CDF, {chunk} steps/chunk, {k} actor(s) at {cfg.hz:g} Hz "
                                 f"({fl['steps_measured']} steps; drawn from 200 quantiles)",
                        "series": {"fleetloop step->trainable": quantiles(fl.pop("_lat")),
                                   "raw gRPC step->received": quantiles(raw.pop("_lat"))},
                        "xlabel": "seconds", "ylabel": "share of steps"}
                    series_fl[str(k)] = [fl["step_to_trainable_s"]["p99"], raw["step_to_received_s"]["p99"]]
                    runs.append({"fleetloop": fl, "raw_grpc": raw})
                    a, b = fl["step_to_trainable_s"], raw["step_to_received_s"]
                    tag = f"C={chunk}"
                    for p in ("p50", "p90", "p99", "max"):
                        rows.append(row(f"step->trainable {p.upper()} ({tag})", "s", k, a[p], b[p], "lower",
                                        "raw: same chunking and rate, step produced -> raw handler received"))
                    rows.append(row(f"chunk spooled->trainable P50 ({tag})", "s", k, fl["spooled_to_trainable_s"]["p50"],
                                    raw["one_way_s"]["p50"], "lower", "raw: message send -> handler receive"))
                    rows.append(row(f"chunk spooled->trainable P99 ({tag})", "s", k, fl["spooled_to_trainable_s"]["p99"],
                                    raw["one_way_s"]["p99"], "lower", "raw: message send -> handler receive"))
                plots[f"p99_vs_actors_c{chunk}"] = {
                    "x": [int(k) for k in series_fl], "xlabel": "actors", "ylabel": "P99 seconds",
                    "series": {"fleetloop step->trainable": [v[0] for v in series_fl.values()],
                               "raw gRPC step->received": [v[1] for v in series_fl.values()]}}
        finally:
            pool.close()
    goals, notes = _goals_and_notes(cfg, runs)
    profile = _profile(cfg, runs)
    config = cfg.model_dump() | {"episode_steps": EPISODE_STEPS, "task": TASK, "max_inflight": MAX_INFLIGHT,
                                 "training": "idle (bench.common.start_learner_in_process)",
                                 "steps": "every step an operator correction (trainable under HG-DAgger)",
                                 "clock": "time.time() on one machine (actor, learner and raw server share it)"}
    return {"bench": "latency", "machine": machine_info(), "config": config,
            "command": _command(cfg), "wall_s": round(time.monotonic() - t0, 1), "rows": rows, "goals": goals,
            "plots": plots, "runs": runs, "notes": notes} | ({"profile": profile} if profile else {})


def _command(cfg: LatencyConfig) -> str:
    return (f"fleetloop bench latency --actors {','.join(map(str, cfg.actors))} --chunk-steps "
            f"{','.join(map(str, cfg.chunk_steps))} --hz {cfg.hz:g} --seconds {cfg.seconds:g} --out F.json")


def _dominant(fl: dict[str, Any]) -> str:
    parts = {k: v["mean"] or 0.0 for k, v in fl["parts_s"].items()}
    total = sum(parts.values()) or 1.0
    return ", ".join(f"{k} {v * 1e3:.1f} ms ({v / total:.0%})" for k, v in parts.items())


def _profile(cfg: LatencyConfig, runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Where a step's time goes (mean per stage) for the largest chunk size at the most actors."""
    kmax, cmax = max(cfg.actors), max(cfg.chunk_steps)
    fl = next((r["fleetloop"] for r in runs if r["fleetloop"]["chunk_steps"] == cmax and r["fleetloop"]["actors"] == kmax), None)
    if fl is None:
        return None
    parts = {k: v["mean"] or 0.0 for k, v in fl["parts_s"].items()}
    total = sum(parts.values()) or 1.0
    return {"what": f"mean step->trainable split by stage, {cmax} steps/chunk, {kmax} actors at {cfg.hz:g} Hz "
                    f"(timestamps, not a sampling profiler: the time is waiting, not CPU)",
            "top": [[k, round(v, 6), round(v / total, 4)] for k, v in sorted(parts.items(), key=lambda kv: -kv[1])]}


def _goals_and_notes(cfg: LatencyConfig, runs: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    goals, notes = [], []
    kmax = max(cfg.actors)
    for chunk in sorted(set(cfg.chunk_steps)):
        run = next((r for r in runs if r["fleetloop"]["chunk_steps"] == chunk and r["fleetloop"]["actors"] == kmax), None)
        if run is None or run["fleetloop"]["step_to_trainable_s"]["p99"] is None:
            continue
        fl, raw_p99 = run["fleetloop"], run["raw_grpc"]["step_to_received_s"]["p99"]
        p99 = fl["step_to_trainable_s"]["p99"]
        wait = cfg.max_chunk_wait_s
        floor = (chunk - 1) / cfg.hz if not wait else min((chunk - 1) / cfg.hz, wait)
        met = p99 < 1.0
        limit = "" if met else (
            f"chunking: a step waits for the rest of its chunk (the first step up to {floor:.2f} s: (C-1)/hz"
            f"{f', capped by max_chunk_wait_s {wait:g} s' if wait else ''}) plus one more step period, because "
            f"EpisodeRecorder seals a chunk when the next step is recorded (fleetloop/client/runtime.py); mean parts: {_dominant(fl)}; "
            f"raw gRPC with the same chunking: P99 {raw_p99:.2f} s, so no transport can meet it with this chunking. "
            f"Fix: max_chunk_wait_s <= 0.9 s (learner config) or chunk_steps <= {int(cfg.hz * 0.9)} at {cfg.hz:g} Hz")
        sealed = f", sealed after {cfg.max_chunk_wait_s:g} s" if cfg.max_chunk_wait_s else ""
        goals.append({"goal": f"step->trainable P99 < 1 s ({kmax} actors at {cfg.hz:g} Hz, {chunk} steps/chunk{sealed})",
                      "target": 1.0, "measured": p99, "unit": "s", "met": met, "limit": limit})
        notes.append(f"C={chunk}, {kmax} actors: mean step->trainable {fl['step_to_trainable_s']['mean'] * 1e3:.1f} ms = "
                     f"{_dominant(fl)}; chunking floor (C-1)/2/hz mean = {(chunk - 1) / 2 / cfg.hz * 1e3:.1f} ms, "
                     f"+1/hz = {1e3 / cfg.hz:.1f} ms for the seal at the next step")
    # the goal of the issue is stated for the streaming setting: keep that one first
    goals.sort(key=lambda g: 0 if f", {cfg.goal_chunk_steps} steps/chunk" in g["goal"] else 1)
    notes.append("parts: chunking wait = produced -> Spool.put on the actor; send = Spool.put -> Ingestor.ingest entry on "
                 "the learner (sender thread hand-off, gRPC, parse); ingest = Ingestor.ingest entry -> row in the replay store")
    notes.append("raw baseline: clients produce at the same rate and send each chunk's bytes the moment its C-th step "
                 "exists, or at the first step after max_chunk_wait_s (the same cap the actors get; no spool, no seal at "
                 "the next step), so raw step->received is the floor of chunking + transport")
    notes.append(f"max_chunk_wait_s {cfg.max_chunk_wait_s:g} s (the learner's default; RunConfig.max_chunk_wait_s). Before "
                 "the time-based seal existed (commit 0831664 and earlier: chunks only sealed full) the 50-step goal row "
                 "measured P99 1.67 s")
    return goals, notes


# -- CLI -------------------------------------------------------------------------------------------
def _ints(text: str, flag: str) -> list[int]:
    try:
        vals = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        vals = []
    if not vals or any(v < 1 for v in vals):
        raise ValueError(f"{flag} {text!r} must be comma-separated positive integers")
    return vals


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of ``fleetloop bench latency``."""
    p.add_argument("--actors", default="1,4,16", help="actor counts K (comma-separated)")
    p.add_argument("--chunk-steps", default="5,50", help="steps per chunk C (comma-separated; 50 = learner default)")
    p.add_argument("--hz", type=float, default=30.0, help="steps per second per actor")
    p.add_argument("--seconds", type=float, default=20.0, help="production time per path per (C, K)")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of each phase left out of the percentiles")
    p.add_argument("--max-chunk-wait-s", type=float, default=0.5,
                   help="the learner's max_chunk_wait_s (a chunk is sealed after this long; 0: only when full)")
    p.add_argument("--out", required=True, help="result JSON path")


def config_from_args(args: argparse.Namespace) -> LatencyConfig:
    """The validated config (ValueError naming the flag and value)."""
    try:
        return LatencyConfig(actors=_ints(args.actors, "--actors"), chunk_steps=_ints(args.chunk_steps, "--chunk-steps"),
                             hz=args.hz, seconds=args.seconds, warmup_s=args.warmup,
                             goal_chunk_steps=min(_ints(args.chunk_steps, "--chunk-steps")),
                             max_chunk_wait_s=getattr(args, "max_chunk_wait_s", 0.5))
    except ValidationError as exc:
        err = exc.errors()[0]
        raise ValueError(f"--{str(err['loc'][0]).replace('_', '-')} {err.get('input')!r}: {err['msg']}") from None


def main(args: argparse.Namespace) -> int:
    """Run, write the JSON, print the table; 2 on a bad flag."""
    from bench.runner import run_reported

    return run_reported("latency", args, lambda a: (lambda cfg=config_from_args(a): run_latency(cfg)))
