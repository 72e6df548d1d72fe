"""Child process of the load bench: many lightweight actors on one asyncio event loop.

Each :class:`LoadActor` is one robot's uplink without the robot: its own gRPC channel (its own TCP
connection: ``grpc.use_local_subchannel_pool``), a ``Handshake`` with its credential (learner
mode), then one ``StreamExperience`` stream over which it sends pre-built chunks
(:mod:`bench.load_data`) at ``hz`` steps per second (0 = as fast as its window allows) with at
most ``max_inflight`` unacknowledged, as ``fleetloop.client.sender.Sender`` does. Per ack it records the
latency (monotonic time from just before the chunk was written to the stream to the ack's
arrival), duplicates, ``backoff_ms`` hints (honoured: sending pauses that long) and, in learner
mode, that the ack names the chunk it acknowledges. A failed stream is counted by status code and
reopened with capped, jittered backoff; its unacknowledged chunks are resent first (the learner's
ledger acks them as duplicates if it had stored them).

Raw mode (the baseline) sends the same kind of bytes to ``bench.common.RawServer.Ingest``: no
handshake, acks are 2 opaque bytes.

Invariant reported per process: ``produced == acked + unacked_at_end`` (every chunk is either
acknowledged once or still held at the end; none is dropped silently).
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from array import array
from collections import deque
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, Field

_RETRY_HANDSHAKE = {"UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"}
_POISON = {"INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION", "OUT_OF_RANGE"}


class ProcPlan(BaseModel):
    """What one load process runs (built by :mod:`bench.load`, pickled to the child)."""

    proc: int = Field(ge=0, description="Index of this process.")
    actor_indices: list[int] = Field(description="Global indices of the actors this process drives.")
    mode: Literal["learner", "raw"] = Field(description="learner: the fleetloop contract; raw: the bytes baseline.")
    target: str = Field(description="gRPC target host:port.")
    job_id: str = Field(description="Job id stamped on every chunk and sent in the handshake.")
    tasks: list[str] = Field(min_length=1, description="Tasks (raw mode; learner mode uses the handshake's task ids).")
    token: str | None = Field(None, description="Robot credential (metadata 'authorization: Bearer'); never logged.")
    tls_ca: str | None = Field(None, description="CA file: connect with TLS when set.")
    chunk_steps: int = Field(ge=1, description="Steps per chunk.")
    max_episode_steps: int = Field(ge=1, description="Episode length limit (timeouts end there).")
    hz: float = Field(ge=0, description="Steps per second per actor; 0 = as fast as the window allows.")
    max_inflight: int = Field(ge=1, description="Unacknowledged chunks allowed on the wire per actor.")
    seed: int = Field(description="Seed of the episode bank and the actors' jitter.")
    ready_timeout_s: float = Field(gt=0, description="How long handshakes may retry before an actor counts as failed.")
    drain_timeout_s: float = Field(gt=0, description="After stop: how long to wait for outstanding acks.")
    hard_deadline_s: float = Field(gt=0, description="The process exits by then whatever happens (Lifeline).")


@dataclass
class Pending:
    """A produced chunk not yet acknowledged."""

    episode_id: str
    seq: int
    steps: int
    raw: bytes


def _pushback_s(err) -> float | None:
    """Seconds from a ``grpc-retry-pushback-ms`` trailer (None when absent or negative)."""
    try:
        for key, value in err.trailing_metadata() or ():
            if key == "grpc-retry-pushback-ms" and int(value) >= 0:
                return int(value) / 1000.0
    except (TypeError, ValueError):
        return None
    return None


class ProcStats:
    """Counters of all actors of one process (single-threaded: the event loop)."""

    def __init__(self) -> None:
        self.c: dict[str, int] = {k: 0 for k in (
            "connected", "connect_failed", "produced", "produced_steps", "written", "written_bytes", "acked",
            "acked_steps", "duplicates", "backoff_acks", "backoff_ms_total", "ack_mismatches", "rejected",
            "stream_opens", "reconnects", "schedule_slips", "unacked_at_end", "max_backlog")}
        self.errors: dict[str, int] = {}
        self.error_details: dict[str, str] = {}  # first message seen per rpc:code
        self.ack_time = array("d")      # wall-clock time of each ack
        self.latency = array("d")       # seconds from write to ack

    def error(self, rpc: str, code: str, details: str | None = None) -> None:
        key = f"{rpc}:{code}"
        self.errors[key] = self.errors.get(key, 0) + 1
        if details and key not in self.error_details:
            self.error_details[key] = details[:300]

    def snapshot(self) -> dict[str, Any]:
        return {"acked": self.c["acked"], "acked_steps": self.c["acked_steps"], "errors": sum(self.errors.values())}


class LoadActor:
    """One lightweight actor: channel, handshake, paced producer, one stream with a window."""

    def __init__(self, idx: int, plan: ProcPlan, bank, stats: ProcStats, stop: asyncio.Event) -> None:
        import grpc

        from fleetloop.channels import channel_options

        self.idx, self.plan, self.bank, self.stats, self.stop = idx, plan, bank, stats, stop
        self.actor_id = f"load-actor-{idx:04d}"
        self.metadata = (("authorization", f"Bearer {plan.token}"),) if plan.token else ()
        opts = channel_options() + [("grpc.use_local_subchannel_pool", 1)]
        if plan.tls_ca:
            from fleetloop.tls import channel_credentials
            self.channel = grpc.aio.secure_channel(plan.target, channel_credentials(plan.tls_ca), options=opts)
        else:
            self.channel = grpc.aio.insecure_channel(plan.target, options=opts)
        if plan.mode == "learner":
            from fleetloop.v1 import fleetloop_pb2 as pb
            self._ack_type = pb.Ack
            self._stream = self.channel.stream_stream("/fleetloop.v1.Learner/StreamExperience",
                                                      request_serializer=lambda b: b, response_deserializer=pb.Ack.FromString)
        else:
            from bench.common import RAW_INGEST
            self._ack_type = None
            self._stream = self.channel.stream_stream(RAW_INGEST, request_serializer=lambda b: b,
                                                      response_deserializer=lambda b: b)
        self.tasks = list(plan.tasks)
        self.version = 0
        self.pending: deque[Pending] = deque()
        self.inflight: deque[tuple[Pending, float]] = deque()
        self.wake = asyncio.Event()     # something to send, an ack arrived, or stop
        self.pause_until = 0.0
        self.rng = random.Random(plan.seed * 100_003 + idx)

    # -- connection ------------------------------------------------------------------------------
    async def connect(self, deadline: float) -> bool:
        """Handshake (learner mode), retrying transient refusals until ``deadline``; True when connected."""
        import grpc

        if self.plan.mode == "raw":
            return True
        from bench.load_data import load_specs
        from fleetloop.codec import PROTOCOL_VERSION
        from fleetloop.v1 import fleetloop_pb2 as pb

        obs, act = load_specs()
        req = pb.HandshakeRequest(protocol_version=PROTOCOL_VERSION, job_id=self.plan.job_id, actor_id=self.actor_id,
                                  kind=pb.ROBOT, observation_specs=obs, action_specs=act, tasks=self.plan.tasks,
                                  capabilities={"kind": "bench-load", "pacing_hz": f"{self.plan.hz:g}"})
        call = self.channel.unary_unary("/fleetloop.v1.Learner/Handshake", request_serializer=pb.HandshakeRequest.SerializeToString,
                                        response_deserializer=pb.HandshakeResponse.FromString)
        delay = 0.2
        while True:
            try:
                resp = await call(req, metadata=self.metadata, timeout=30.0)
                break
            except grpc.aio.AioRpcError as err:
                self.stats.error("Handshake", err.code().name, err.details())
                if err.code().name not in _RETRY_HANDSHAKE or time.monotonic() + delay > deadline:
                    return False
                await asyncio.sleep(delay * (0.5 + self.rng.random()))
                delay = min(5.0, delay * 2)
        self.tasks = [t for t in resp.run_config.task_ids if t in self.plan.tasks] or list(resp.run_config.task_ids)
        if resp.HasField("current_policy"):
            self.version = int(resp.current_policy.version)
        return True

    # -- producing ---------------------------------------------------------------------------------
    async def produce(self) -> None:
        """Make chunks at ``hz`` steps/s (episode after episode) until stop; the version of an
        episode is the newest learner version seen in an ack when it starts (as a robot that
        swaps between episodes)."""
        from bench.load_data import serialize_chunk

        hz, plan = self.plan.hz, self.plan
        dt = 1.0 / hz if hz > 0 else 0.0
        next_due = time.monotonic() + self.rng.random() * plan.chunk_steps * dt  # spread the fleet's phases
        n = self.idx * 7
        while not self.stop.is_set():
            episode = self.bank.episode(n)
            episode_id = f"{self.actor_id}-{uuid.uuid4().hex[:16]}"
            task, version = self.tasks[n % len(self.tasks)], self.version
            n += 1
            for seq, body in enumerate(episode.chunks):
                if dt:
                    next_due += body.steps * dt
                    wait = next_due - time.monotonic()
                    if wait > 0:
                        await asyncio.sleep(wait)
                    elif wait < -1.0:  # more than 1 s behind schedule: the offered load was not met
                        self.stats.c["schedule_slips"] += 1
                        next_due = time.monotonic()
                else:
                    while len(self.pending) >= 2 * plan.max_inflight and not self.stop.is_set():
                        self.wake.clear()
                        await self.wake.wait()
                if self.stop.is_set():
                    return
                raw = serialize_chunk(body, plan.job_id, self.actor_id, episode_id, seq, task, version,
                                      time.time() - body.steps * dt)
                self.pending.append(Pending(episode_id, seq, body.steps, raw))
                c = self.stats.c
                c["produced"] += 1
                c["produced_steps"] += body.steps
                c["max_backlog"] = max(c["max_backlog"], len(self.pending) + len(self.inflight))
                self.wake.set()

    # -- streaming ---------------------------------------------------------------------------------
    def _drained(self) -> bool:
        return self.stop.is_set() and not self.pending and not self.inflight

    async def stream(self, drain_deadline: list[float]) -> None:
        """Keep one stream up until stopped and drained (or the drain deadline passed)."""
        import grpc

        delay = 0.2
        while not self._drained() and not (self.stop.is_set() and time.monotonic() > drain_deadline[0]):
            try:
                await self._stream_once(drain_deadline)
                delay = 0.2
            except grpc.aio.AioRpcError as err:
                code = err.code().name
                self.stats.error("StreamExperience", code, err.details())
                self._requeue()
                if code in _POISON and self.pending:  # can never succeed: drop it, counted
                    self.pending.popleft()
                    self.stats.c["rejected"] += 1
                if self.stop.is_set() and time.monotonic() > drain_deadline[0]:
                    break
                self.stats.c["reconnects"] += 1
                pushback = _pushback_s(err)  # the learner's grpc-retry-pushback-ms, as fleetloop.client.sender honours it
                await asyncio.sleep(pushback if pushback is not None else delay * (0.5 + self.rng.random()))
                delay = min(5.0, delay * 2)
        self._requeue()

    def _requeue(self) -> None:
        """Unacknowledged chunks go back to the front of the queue, in order (resent first)."""
        while self.inflight:
            self.pending.appendleft(self.inflight.pop()[0])

    async def _stream_once(self, drain_deadline: list[float]) -> None:
        call = self._stream(metadata=self.metadata)
        self.stats.c["stream_opens"] += 1
        writer = asyncio.ensure_future(self._write(call, drain_deadline))
        try:
            while True:
                ack = await call.read()
                if ack is _EOF:
                    break
                self._on_ack(ack)
        finally:
            if not writer.done():
                writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)
        code = await call.code()
        if code.name != "OK":  # ended without an error raised by read(): count it too
            self.stats.error("StreamExperience", code.name)

    async def _write(self, call, drain_deadline: list[float]) -> None:
        import grpc

        c, plan = self.stats.c, self.plan
        try:
            while True:
                if self.stop.is_set() and (not self.pending or time.monotonic() > drain_deadline[0]):
                    if not self.inflight or time.monotonic() > drain_deadline[0]:
                        await call.done_writing()
                        return
                pause = self.pause_until - time.monotonic()
                if self.pending and len(self.inflight) < plan.max_inflight and pause <= 0:
                    p = self.pending.popleft()
                    self.inflight.append((p, time.monotonic()))
                    await call.write(p.raw)
                    c["written"] += 1
                    c["written_bytes"] += len(p.raw)
                    continue
                self.wake.clear()
                try:
                    await asyncio.wait_for(self.wake.wait(), timeout=pause if pause > 0 else 0.5)
                except asyncio.TimeoutError:
                    pass
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            return  # the reader sees the call's status

    def _on_ack(self, ack) -> None:
        now = time.monotonic()
        c = self.stats.c
        if not self.inflight:
            c["ack_mismatches"] += 1
            return
        p, sent_at = self.inflight.popleft()
        self.stats.latency.append(now - sent_at)
        self.stats.ack_time.append(time.time())
        c["acked"] += 1
        c["acked_steps"] += p.steps
        if self._ack_type is not None:
            if (ack.episode_id, ack.seq) != (p.episode_id, p.seq):
                c["ack_mismatches"] += 1
            c["duplicates"] += int(ack.duplicate)
            self.version = max(self.version, int(ack.learner_version))
            if ack.backoff_ms:
                c["backoff_acks"] += 1
                c["backoff_ms_total"] += int(ack.backoff_ms)
                self.pause_until = now + ack.backoff_ms / 1000.0
        self.wake.set()

    async def close(self) -> None:
        await self.channel.close(grace=None)


_EOF: Any = None  # set to grpc.aio.EOF on first use (keeps module import light)


async def _flags(go, stop, life, go_ev: asyncio.Event, stop_ev: asyncio.Event, actors: list[LoadActor]) -> None:
    """Mirror the parent's multiprocessing events into the loop; a dead parent or the hard deadline stops too."""
    while not stop_ev.is_set():
        if go.is_set():
            go_ev.set()
        if stop.is_set() or not life.ok():
            go_ev.set()
            stop_ev.set()
            for a in actors:
                a.wake.set()
            return
        await asyncio.sleep(0.05)


async def _progress(stats: ProcStats, proc: int, progress_q, stop_ev: asyncio.Event) -> None:
    while not stop_ev.is_set():
        progress_q.put({"proc": proc, **stats.snapshot()})
        await asyncio.sleep(1.0)


async def _main(plan: ProcPlan, go, stop, ready_q, progress_q, result_q, life) -> None:
    global _EOF
    import grpc

    from bench.common import cpu_seconds
    from bench.load_data import EpisodeBank

    _EOF = grpc.aio.EOF
    bank = EpisodeBank(plan.seed + plan.proc, plan.chunk_steps, plan.max_episode_steps)
    stats = ProcStats()
    go_ev, stop_ev = asyncio.Event(), asyncio.Event()
    actors = [LoadActor(i, plan, bank, stats, stop_ev) for i in plan.actor_indices]
    flags = asyncio.ensure_future(_flags(go, stop, life, go_ev, stop_ev, actors))
    deadline = time.monotonic() + plan.ready_timeout_s
    ok = await asyncio.gather(*(a.connect(deadline) for a in actors))
    live = [a for a, good in zip(actors, ok) if good]
    stats.c["connected"], stats.c["connect_failed"] = len(live), len(actors) - len(live)
    ready_q.put({"idx": plan.proc, "ready": True, "connected": len(live), "failed": len(actors) - len(live)})
    await go_ev.wait()
    cpu0, t0 = cpu_seconds(), time.time()
    progress = asyncio.ensure_future(_progress(stats, plan.proc, progress_q, stop_ev))
    drain_deadline = [float("inf")]
    work = [asyncio.ensure_future(a.produce()) for a in live] + [asyncio.ensure_future(a.stream(drain_deadline)) for a in live]
    await stop_ev.wait()
    t_stop = time.time()
    drain_deadline[0] = time.monotonic() + plan.drain_timeout_s
    done, not_done = await asyncio.wait(work, timeout=plan.drain_timeout_s + 10.0) if work else (set(), set())
    for task in not_done:  # a stream stuck past the drain deadline: cancel, count what it still held
        task.cancel()
    await asyncio.gather(*work, return_exceptions=True)
    if not_done:
        stats.errors["DRAIN:TIMEOUT"] = len(not_done)
    for t in done:
        if t.exception() is not None:
            stats.error("ACTOR", type(t.exception()).__name__)
    stats.c["unacked_at_end"] = sum(len(a.pending) + len(a.inflight) for a in live)
    progress.cancel()
    flags.cancel()
    await asyncio.gather(*(a.close() for a in actors), return_exceptions=True)
    result_q.put({"idx": plan.proc, "counters": stats.c, "errors": stats.errors,
                  "error_details": stats.error_details, "ack_time": bytes(stats.ack_time),
                  "latency": bytes(stats.latency), "t_go": t0, "t_stop": t_stop, "cpu_s": cpu_seconds() - cpu0,
                  "actors": len(actors), "intervention_share": bank.intervention_share()})


def load_process(plan_json: str, go, stop, ready_q, progress_q, result_q) -> None:
    """Entry point of one spawned load process (never raises: errors are reported on the queues)."""
    idx = -1
    try:
        from bench.common import child_setup

        plan = ProcPlan.model_validate_json(plan_json)
        idx = plan.proc
        life = child_setup(plan.hard_deadline_s)
        asyncio.run(_main(plan, go, stop, ready_q, progress_q, result_q, life))
    except BaseException as exc:  # report, never hang the parent
        msg = {"idx": idx, "error": repr(exc)[:500]}
        ready_q.put(msg)
        result_q.put(msg)
