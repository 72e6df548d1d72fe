"""Client processes of ``fleetloop bench ingest``: each hosts a share of the fleetloop actors and of
the raw-gRPC baseline streams (one process type, so 32 actors need not be 64 processes on 2 cores).

A worker (``multiprocessing`` spawn, started by :mod:`bench.ingest`) runs, for its actor indices:

- fleetloop actors: robot payloads use the real runtime (``FleetClient``: handshake, first verified
  policy, disk spool, background ``Sender``) and record episodes with :func:`bench.payloads.record_episode`;
  LLM payloads run what an LLM rollout server runs around its engine (handshake as kind LLM, ``Admit``
  for tickets, one group chunk per ticket into a disk ``Spool``, the same ``Sender``), with prebuilt
  completions instead of a vLLM engine. An actor produces while ``fl_active`` is set and more than
  ``backlog`` chunks are not unacknowledged in its spool (a robot never outruns its uplink forever);
- raw streams (threads): the same serialized chunks to ``RawServer.Ingest`` while ``raw_active`` is
  set, with at most ``raw_window`` unacknowledged messages (the actors' effective window).

CPU accounting: the main loop samples the process's CPU time every ~20 ms and books it to the path
that is active (fleetloop, raw or neither: the drain between slices), so the client CPU per message
is reported per path although both live in one process.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import RAW_INGEST, child_setup, cpu_seconds
from bench.payloads import PayloadSpec, RobotSource, llm_group_bytes, llm_group_template, record_episode, robot_messages, \
    robot_specs

ADMIT_BATCH = 8  # tickets per Admit (an LLM rollout server asks for a batch of prompts at once)


class _RobotActor:
    def __init__(self, idx: int, cfg: dict[str, Any], spec: PayloadSpec) -> None:
        from fleetloop.client.runtime import FleetClient

        obs_specs, act_specs = robot_specs(spec)
        self.client = FleetClient(cfg["learner"], cfg["job"], f"bench-actor-{idx}", obs_specs, act_specs, [cfg["task"]],
                                  spool_dir=str(Path(cfg["spool_root"]) / f"actor-{idx}"), max_inflight=cfg["max_inflight"],
                                  connect_timeout_s=60.0)
        self.client.connect()
        self.src = RobotSource(spec, 1000 + idx, cfg["episode_steps"])
        self.task, self.produced, self.sender, self.spool = cfg["task"], 0, self.client.sender, self.client.spool

    def produce(self) -> None:
        self.produced += record_episode(self.client, self.task, self.src)

    def close(self) -> None:
        self.client.close(flush_timeout=0)


class _LlmActor:
    def __init__(self, idx: int, cfg: dict[str, Any], spec: PayloadSpec) -> None:
        import grpc

        from fleetloop.client.runtime import channel_options
        from fleetloop.client.sender import Sender
        from fleetloop.client.spool import Spool
        from fleetloop.codec import PROTOCOL_VERSION
        from fleetloop.v1 import fleetloop_pb2 as pb
        from fleetloop.v1 import fleetloop_pb2_grpc as pb_grpc

        self.pb, self.job, self.actor_id = pb, cfg["job"], f"bench-llm-{idx}"
        self.channel = grpc.insecure_channel(cfg["learner"], options=channel_options())
        self.stub = pb_grpc.LearnerStub(self.channel)
        self.stub.Handshake(pb.HandshakeRequest(protocol_version=PROTOCOL_VERSION, job_id=self.job, actor_id=self.actor_id,
                                                kind=pb.LLM, tasks=[cfg["task"]]), timeout=60.0)
        self.spool = Spool(Path(cfg["spool_root"]) / f"actor-{idx}")
        stream = self.channel.stream_stream("/fleetloop.v1.Learner/StreamExperience", request_serializer=lambda b: b,
                                            response_deserializer=pb.Ack.FromString)
        self.sender = Sender(lambda it: stream(it), self.spool, self.job, self.actor_id, max_inflight=cfg["max_inflight"])
        self.sender.start()
        self.template = llm_group_template(self.actor_id, 1000 + idx, self.job, cfg["task"])
        self.produced = self.tickets = self.blocked = 0

    def produce(self) -> None:
        resp = self.stub.Admit(self.pb.AdmitRequest(job_id=self.job, actor_id=self.actor_id, rollouts=ADMIT_BATCH,
                                                    current_version=0), timeout=10.0)
        if not resp.ticket_ids:
            self.blocked += 1
            time.sleep(max(resp.retry_after_ms, 20) / 1000.0)
            return
        self.tickets += len(resp.ticket_ids)
        for ticket in resp.ticket_ids:
            episode, raw = llm_group_bytes(self.template, ticket)
            self.spool.put(episode, 0, raw)
            self.produced += 1

    def close(self) -> None:
        self.sender.stop()
        self.channel.close()


def raw_messages(spec: PayloadSpec, seed: int, job: str, task: str) -> list[bytes]:
    """The bytes a raw stream cycles: for robots the chunks of one episode as the actor records them
    (images: 16 steps, two chunks, so 32 streams stay within memory), for LLM 16 group chunks."""
    if not spec.robot:
        template = llm_group_template("bench-raw", seed, job, task)
        return [llm_group_bytes(template, f"{n:032x}")[1] for n in range(16)]
    steps = 16 if spec.images else 200
    return robot_messages(spec, "bench-raw", seed, steps, job, task)


class _RawStream:
    """One raw baseline stream (a thread): cycles ``messages`` while ``active``, ``window`` unacknowledged."""

    def __init__(self, target: str, messages: list[bytes], window: int, active, stop, life) -> None:
        self.target, self.messages, self.window, self.active, self.stop, self.life = target, messages, window, active, stop, life
        self.sent = self.acked = 0
        self.error: str | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import grpc

        from fleetloop.client.runtime import channel_options

        try:
            channel = grpc.insecure_channel(self.target, options=channel_options())
            grpc.channel_ready_future(channel).result(timeout=60)
            call_factory = channel.stream_stream(RAW_INGEST, request_serializer=lambda b: b, response_deserializer=lambda b: b)
            sem = threading.Semaphore(self.window)

            def requests():
                i = 0
                while not self.stop.is_set() and self.life.ok():
                    if not self.active.is_set():
                        self.active.wait(0.2)
                        continue
                    if not sem.acquire(timeout=0.5):
                        continue
                    yield self.messages[i % len(self.messages)]
                    i += 1
                    self.sent = i

            for _ack in call_factory(requests()):
                sem.release()
                self.acked += 1
            channel.close()
        except Exception as exc:  # reported to the parent, never hangs it
            self.error = repr(exc)[:300]


def worker(proc: int, cfg: dict[str, Any], ready_q, fl_active, raw_active, stop, result_q, hard_deadline_s: float) -> None:
    """Child process ``proc``: ``cfg["actors"]`` fleetloop actors and as many raw streams; see the module docstring."""
    actors: list = []
    try:
        life = child_setup(hard_deadline_s)
        spec = PayloadSpec(**cfg["spec"])
        msgs = raw_messages(spec, 4242 + proc, cfg["job"], cfg["task"])
        streams = [_RawStream(cfg["raw_target"], msgs, cfg["raw_window"], raw_active, stop, life) for _ in cfg["actors"]]
        for s in streams:
            s.thread.start()
        make = _RobotActor if spec.robot else _LlmActor
        actors = [make(i, cfg, spec) for i in cfg["actors"]]
        ready_q.put({"proc": proc, "ready": True})
        backlog = cfg["backlog"]
        cpu = {"fleetloop": 0.0, "raw": 0.0, "idle": 0.0}
        c0, t_sample = cpu_seconds(), time.monotonic()
        while not stop.is_set() and life.ok():
            fl = fl_active.is_set()
            if fl:
                progressed = False
                for a in actors:
                    if len(a.spool) <= backlog:
                        a.produce()
                        progressed = True
                if not progressed:
                    time.sleep(0.002)
            else:
                time.sleep(0.02)
            if time.monotonic() - t_sample >= 0.02:
                c1 = cpu_seconds()
                cpu["fleetloop" if fl else "raw" if raw_active.is_set() else "idle"] += c1 - c0
                c0, t_sample = c1, time.monotonic()
        reports = [{"idx": i, "produced": a.produced, "acked": a.sender.acked, "duplicates": a.sender.duplicates,
                    "rejected": a.sender.rejected, "reconnects": a.sender.reconnects, "spooled_at_stop": len(a.spool),
                    **({"tickets": a.tickets, "admit_blocked": a.blocked} if not spec.robot else {})}
                   for i, a in zip(cfg["actors"], actors)]
        for s in streams:
            s.thread.join(5.0)
        result_q.put({"proc": proc, "pid": os.getpid(), "actors": reports, "cpu_s": cpu,
                      "raw": [{"sent": s.sent, "acked": s.acked, "error": s.error} for s in streams]})
    except Exception as exc:  # report, never hang the parent
        ready_q.put({"idx": proc, "error": repr(exc)[:500]})
        result_q.put({"idx": proc, "error": repr(exc)[:500]})
    finally:
        for a in actors:
            try:
                a.close()
            except Exception:
                pass
