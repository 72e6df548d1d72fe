"""A pool of reusable benchmark client processes: each runs either a real fleetloop actor or a raw
gRPC client for one command at a time (used by ``bench.latency`` and ``bench.utilisation``).

A worker is spawned once (paying the imports once) and then runs commands until told to stop:

- ``fleet``: the real actor runtime (``FleetClient`` + ``EpisodeRecorder`` + disk spool + background
  ``Sender``) recording synthetic 200-step episodes, paced at ``hz`` steps/s like a robot control
  loop (random phase per actor) or unpaced (``hz`` 0: as fast as the uplink allows, at most
  ``2 x MAX_INFLIGHT`` chunks waiting in the spool). Each step's production time can be stamped into
  its own observation (``state[0] + state[1]`` = seconds since ``base``; ``state[2]`` the worker
  index; ``state[3]`` the step counter). ``Spool.put`` is wrapped to timestamp each chunk.
- ``raw``: steps at ``hz``; every C steps one message of prepared bytes, prefixed with a 16-byte
  :data:`HEADER` (client, message number, send time), over one gRPC stream to a
  ``bench.common.RawServer``, with the Sender's window of unacknowledged messages.

Clock: ``time.time()`` (one machine: the bench process and the workers share it).
"""

from __future__ import annotations

import struct
import threading
import time
from typing import Any

from bench.common import EPISODE_STEPS, JOB, TASK, Children, child_setup, wait_ready

HEADER = struct.Struct("<IId")  # raw message header: client index, message number, send time (unix s)
MAX_INFLIGHT = 32
READY_TIMEOUT_S = 180.0


def _stamp(obs, now: float, base: float, idx: int, counter: int):
    import numpy as np

    o = obs.copy()
    rel = now - base
    o[0] = np.float32(rel)
    o[1] = np.float32(rel - float(o[0]))
    o[2] = np.float32(idx)
    o[3] = np.float32(counter)
    return o


def _run_fleet(idx: int, cmd: dict[str, Any], life) -> dict[str, Any]:
    """One fleetloop actor for one command (see :func:`worker`)."""
    import numpy as np

    from actor.main import robot_specs
    from fleetloop.client.runtime import FleetClient
    from bench.ingest import synthetic_episode

    obs_specs, act_specs = robot_specs()
    client = FleetClient(cmd["target"], JOB, f"{cmd['prefix']}-{idx}", obs_specs, act_specs, [TASK],
                         spool_dir=cmd["spool"], max_inflight=MAX_INFLIGHT, connect_timeout_s=60.0)
    from fleetloop.v1 import fleetloop_pb2 as pb

    puts: list[tuple[str, int, float, int]] = []  # (episode, seq, spooled at, first step): chunks vary in size
    put = client.spool.put

    def timed_put(episode_id: str, seq: int, raw: bytes) -> None:
        put(episode_id, seq, raw)
        puts.append((episode_id, seq, time.time(), pb.EpisodeChunk.FromString(raw).first_step))

    client.spool.put = timed_put
    try:
        client.connect()
        obs, act, rew = synthetic_episode(2000 + idx)
        rewards = [float(r) for r in rew]
        hz, base, intervene = float(cmd["hz"]), float(cmd["base"]), cmd.get("intervene", "all")
        rng = np.random.default_rng(idx)
        dt = 1.0 / hz if hz > 0 else 0.0
        start = time.monotonic()
        end_at = start + float(cmd["seconds"])
        next_due = start + (rng.random() * cmd.get("chunk_steps", 1) * dt if dt else 0.0)
        counter = slips = episodes = swaps = 0
        versions: dict[int, int] = {}
        while time.monotonic() < end_at and life.ok():
            if cmd.get("swap") and client.swap_if_ready() is not None:
                swaps += 1
            ep = client.begin_episode(TASK)
            versions[ep.version] = versions.get(ep.version, 0) + 1
            for t in range(EPISODE_STEPS):
                if dt:
                    wait = next_due - time.monotonic()
                    if wait > 0:
                        time.sleep(wait)
                    elif wait < -1.0:  # more than 1 s behind: the machine could not keep the rate
                        slips += 1
                        next_due = time.monotonic()
                    next_due += dt
                elif len(client.spool) > 2 * MAX_INFLIGHT:  # unpaced: never outrun the uplink forever
                    while len(client.spool) > 2 * MAX_INFLIGHT and life.ok() and time.monotonic() < end_at:
                        time.sleep(0.002)
                if time.monotonic() >= end_at:
                    break
                o = _stamp(obs[t], time.time(), base, idx, counter) if cmd.get("stamp", True) else obs[t]
                intervened = True if intervene == "all" else (t // 25) % 3 == 2
                ep.record(o, act[t], rewards[t], intervened)
                counter += 1
            ep.end("timeout")
            episodes += 1
        flushed = client.flush(float(cmd.get("flush_s", 60.0)))
        return {"idx": idx, "steps": counter, "episodes": episodes, "chunks": len(puts), "puts": puts,
                "acked": client.sender.acked, "rejected": client.sender.rejected, "flushed": flushed,
                "spooled_at_end": len(client.spool), "slips": slips, "swaps": swaps,
                "versions": {str(k): v for k, v in versions.items()}}
    finally:
        client.close(flush_timeout=0)


def _run_raw(idx: int, cmd: dict[str, Any], life) -> dict[str, Any]:
    """One raw gRPC client for one command: paced steps, one message of the same bytes per C steps."""
    import queue as queue_mod

    import numpy as np

    from bench.common import RAW_INGEST, raw_channel

    body, chunk, hz = cmd["body"], int(cmd["chunk_steps"]), float(cmd["hz"])
    max_wait = float(cmd.get("max_chunk_wait_s") or 0.0)  # seal like EpisodeRecorder's time cap (same bytes per message)
    channel = raw_channel(cmd["target"])
    import grpc

    grpc.channel_ready_future(channel).result(timeout=30)
    factory = channel.stream_stream(RAW_INGEST, request_serializer=lambda b: b, response_deserializer=lambda b: b)
    window = threading.Semaphore(MAX_INFLIGHT)
    outbox: queue_mod.Queue = queue_mod.Queue()
    sent_at: list[float] = []

    def requests():
        n = 0
        while True:
            item = outbox.get()
            if item is None:
                return
            window.acquire()
            now = time.time()
            sent_at.append(now)
            yield HEADER.pack(idx, n, now) + item
            n += 1

    call = factory(requests())
    acked = [0]

    def read_acks():
        for _ in call:
            window.release()
            acked[0] += 1

    reader = threading.Thread(target=read_acks, daemon=True)
    reader.start()
    rng = np.random.default_rng(idx)
    dt = 1.0 / hz
    start = time.monotonic()
    end_at = start + float(cmd["seconds"])
    next_due = start + rng.random() * chunk * dt
    step_times: list[list[float]] = []
    pending: list[float] = []
    while time.monotonic() < end_at and life.ok():
        wait = next_due - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        next_due += dt
        pending.append(time.time())
        if len(pending) == chunk or (max_wait and time.time() - pending[0] >= max_wait):
            step_times.append(pending)
            pending = []
            outbox.put(body)
    outbox.put(None)
    reader.join(30.0)
    channel.close()
    return {"idx": idx, "messages": len(step_times), "acked": acked[0], "step_times": step_times}


def worker(idx: int, cmd_q, ready_q, result_q, hard_deadline_s: float) -> None:
    """Child process: run commands until ``None``. A command is a dict with ``mode`` ``fleet`` (the
    real actor runtime: ``target``, ``spool``, ``prefix``, ``hz`` (0 = unpaced), ``seconds``,
    ``base``, ``chunk_steps``, optional ``intervene`` 'all' | 'third', ``swap``, ``stamp``) or ``raw``
    (``target``, ``body``, ``chunk_steps``, ``hz``, ``seconds``); each answers one result dict."""
    import queue as queue_mod

    try:
        life = child_setup(hard_deadline_s)
        import fleetloop.client.runtime  # noqa: F401  (import cost paid before 'ready')
        ready_q.put({"idx": idx, "ready": True})
    except Exception as exc:
        ready_q.put({"idx": idx, "error": repr(exc)[:500]})
        return
    while life.ok():
        try:
            cmd = cmd_q.get(timeout=0.5)
        except queue_mod.Empty:
            continue
        if cmd is None:
            return
        try:
            result_q.put((_run_fleet if cmd["mode"] == "fleet" else _run_raw)(idx, cmd, life))
        except Exception as exc:  # report, never hang the parent
            result_q.put({"idx": idx, "error": repr(exc)[:500]})


class Pool:
    """``n`` :func:`worker` processes (spawned once, reused for every configuration)."""

    def __init__(self, children: Children, n: int, hard_deadline_s: float) -> None:
        ctx = children.ctx
        self.ready_q, self.result_q = ctx.Queue(), ctx.Queue()
        self.cmd_qs = [ctx.Queue() for _ in range(n)]
        for i in range(n):
            children.start(worker, i, self.cmd_qs[i], self.ready_q, self.result_q, hard_deadline_s, name=f"bench-worker-{i}")
        wait_ready(self.ready_q, n, READY_TIMEOUT_S, children, "benchmark workers")

    def run(self, cmds: list[dict[str, Any]], timeout: float) -> list[dict[str, Any]]:
        """Send ``cmds[i]`` to worker i, wait for every answer (RuntimeError naming a failed one)."""
        import queue as queue_mod

        for q, cmd in zip(self.cmd_qs, cmds):
            q.put(cmd)
        got, deadline = [], time.monotonic() + timeout
        while len(got) < len(cmds):
            try:
                msg = self.result_q.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue_mod.Empty:
                raise TimeoutError(f"{len(got)} of {len(cmds)} workers answered within {timeout:.0f} s") from None
            if msg.get("error"):
                raise RuntimeError(f"worker {msg.get('idx')} failed: {msg['error']}")
            got.append(msg)
        return sorted(got, key=lambda m: m["idx"])

    def close(self) -> None:
        for q in self.cmd_qs:
            q.put(None)
