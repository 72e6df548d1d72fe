"""Network chaos: a TCP proxy between one robot and the learner drops (connection refused), stalls
(forwards nothing either way) and resets (cuts live connections); stalled peers hold streams open
and stop reading acks; raw sockets connect and say nothing. Holds: actors back off and resume, a
stalled peer never stops another actor's chunks from being acked, stalled streams are ended and
their threads freed, the stream cap refuses extra streams with a retryable RESOURCE_EXHAUSTED and
the actor keeps those chunks, and after every fault each step is stored exactly once.

The learner runs in-process on a real gRPC server on a free loopback port (its Ray-actor body,
without Ray); robots are real Meta-World robots on the real actor runtime.
"""

from __future__ import annotations

import socket
import threading
import time

import grpc
import pytest

from actor.main import robot_specs
from fleetloop.client.runtime import FleetClient
from fleetloop.codec import PROTOCOL_VERSION
from fleetloop.v1 import fleetloop_pb2 as pb
from fleetloop.v1 import fleetloop_pb2_grpc as pb_grpc
from learner.config import LearnerConfig
from learner.process import LearnerProcess, build_learner
from learner.staleness import StalenessConfig
from tests.chaos.procs import write_summary
from tests.helpers.chunks import robot_chunk
from tests.helpers.control_plane import wait_for
from tests.helpers.tcp_proxy import TcpProxy
from tests.integration.helpers import RobotThread

TASKS = ["reach-v3"]
MD = (("authorization", "Bearer tok"),)


class ChaosProxy(TcpProxy):
    """TcpProxy that can also *stall*: while ``stalled`` it forwards nothing in either direction
    (bytes already read are held, new connections are accepted but not served), like a black-holed
    route; TCP stays up, so only keepalives and timeouts notice."""

    stalled = False

    def _pump(self, src: socket.socket, dst: socket.socket, downstream: bool) -> None:
        try:
            while True:
                data = src.recv(65536)
                while self.stalled and not self._stop.is_set():
                    time.sleep(0.02)
                if not data:
                    break
                if downstream and self.drop_downstream:
                    continue
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.close()
                except OSError:
                    pass


def wait_until(predicate, timeout: float, what: str, interval: float = 0.05):
    """Poll ``predicate`` until truthy; fail naming ``what`` after ``timeout`` s (a bound, not a measurement)."""
    return wait_for(predicate, timeout, interval=interval, what=what)


def metric(impl: LearnerProcess, name: str, **labels) -> float:
    return impl.core.metrics.registry.get_sample_value(name, {"job": impl.core.job, **labels}) or 0.0


@pytest.fixture()
def learner(tmp_path):
    cfg = LearnerConfig(state_dir=tmp_path / "learner", tasks=TASKS, robot_tokens=["tok"], chunk_steps=20,
                        publish_every=10, max_updates_per_s=20, keepalive_time_s=1.0, keepalive_timeout_s=1.0,
                        stream_idle_timeout_s=4.0, max_backoff_ms=1000, grpc_workers=16, max_streams=4,
                        max_subscriptions=4, staleness=StalenessConfig(bound=100_000))  # resent chunks are old: keep them all
    impl = build_learner(cfg.model_dump_json()).serve()
    yield impl
    impl.stop()


@pytest.mark.timeout(300)
def test_drop_stall_reset_one_robot_others_unaffected_exactly_once(learner, tmp_path):
    proxy = ChaosProxy("127.0.0.1", learner.port)
    a = RobotThread(proxy.target, "robot-a", TASKS, tmp_path / "spool-a", "tok", episodes=10_000, seed=1)
    b = RobotThread(f"127.0.0.1:{learner.port}", "robot-b", TASKS, tmp_path / "spool-b", "tok", episodes=10_000, seed=2)
    a.client.sender.ack_timeout_s = 2.0  # a stalled link is noticed by the actor itself, not only by keepalive
    sa, sb = a.client.sender, b.client.sender
    b_progress: dict[str, int] = {}
    a.start(), b.start()
    try:
        wait_until(lambda: sa.acked >= 5 and sb.acked >= 5, 90, "both robots acked")

        # -- drop: the learner's address refuses connections for a while ------------------------------
        proxy.refuse = True
        proxy.cut()
        b0, r0 = sb.acked, sa.reconnects
        wait_until(lambda: sa.reconnects >= r0 + 2 and len(a.client.spool) > 0 and sb.acked >= b0 + 5, 60,
                   "robot-a retrying with its spool growing while robot-b streams on")
        b_progress["drop"] = sb.acked - b0
        a0 = sa.acked
        proxy.refuse = False
        wait_until(lambda: sa.acked >= a0 + 5, 60, "robot-a resuming after the drop")

        # -- stall: nothing is forwarded either way, TCP stays up ------------------------------------
        proxy.stalled = True
        b0, t0 = sb.acked, sa.ack_timeouts
        wait_until(lambda: sa.ack_timeouts > t0 and sb.acked >= b0 + 5 and learner.servicer.guard.open_count("StreamExperience") <= 1,
                   60, "robot-a's stall noticed on both sides (its learner stream freed) while robot-b streams on")
        b_progress["stall"] = sb.acked - b0
        a0 = sa.acked
        proxy.stalled = False
        wait_until(lambda: sa.acked >= a0 + 5, 60, "robot-a resuming after the stall")

        # -- reset: live connections cut mid-stream ---------------------------------------------------
        b0, a0, r0 = sb.acked, sa.acked, sa.reconnects
        proxy.cut()
        wait_until(lambda: sa.reconnects > r0 and sa.acked >= a0 + 5 and sb.acked >= b0 + 5, 60, "both resuming after the reset")
        b_progress["reset"] = sb.acked - b0
    finally:
        a.stop_flag.set(), b.stop_flag.set()
        a.join(120), b.join(120)
    try:
        assert a.error is None and b.error is None, (a.error, b.error)
        for r in (a, b):
            assert r.client.flush(60), f"{r.client.actor_id} spool not drained"
        assert all(n >= 5 for n in b_progress.values()), b_progress
        audit = learner.core.audit()
        sent = a.stats.steps + b.stats.steps
        assert audit["duplicates_stored"] == 0
        assert sum(audit["stored_steps"].values()) == sent
        assert learner.core.status()["ingested_steps"] == sent
        assert metric(learner, "fleetloop_learner_received_steps_total", task="reach-v3") == sent
        assert sa.rejected == 0 and sb.rejected == 0, "a network fault must never quarantine a chunk"
        assert sb.reconnects == 0, "robot-b was never disturbed"
        assert audit["episodes_with_mixed_versions"] == 0
        write_summary("network_faults", {
            "faults": ["drop", "stall", "reset"], "steps_sent": sent, "steps_stored": sum(audit["stored_steps"].values()),
            "duplicates_stored": audit["duplicates_stored"], "other_actor_acks_during_fault": b_progress,
            "faulted_actor": {"reconnects": sa.reconnects, "ack_timeouts": sa.ack_timeouts, "duplicates_acked": sa.duplicates,
                              "rejected": sa.rejected},
            "learner_streams_idle_closed": metric(learner, "fleetloop_learner_streams_closed_total", rpc="StreamExperience",
                                                  reason="idle_timeout")})
    finally:
        for r in (a, b):
            r.client.close(flush_timeout=0)
        proxy.close()


def _stalled_call(stub_stream, hold: threading.Event, chunks: list[bytes] = ()):
    """A StreamExperience that sends ``chunks`` then nothing until ``hold`` is set, and never reads acks."""
    def requests():
        yield from chunks
        hold.wait()
    return stub_stream(requests(), metadata=MD)


@pytest.mark.timeout(180)
def test_stalled_peers_cannot_starve_newcomers(learner, tmp_path):
    target = f"127.0.0.1:{learner.port}"
    guard = learner.servicer.guard
    hold = threading.Event()
    channels = [grpc.insecure_channel(target) for _ in range(5)]
    streams = [ch.stream_stream("/fleetloop.v1.Learner/StreamExperience", request_serializer=lambda b: b,
                                response_deserializer=pb.Ack.FromString) for ch in channels]
    sockets: list[socket.socket] = []
    newcomer = None
    try:
        # raw sockets: 60 say nothing, 60 send half an HTTP/2 preface; none may take a server thread
        for i in range(120):
            s = socket.create_connection(("127.0.0.1", learner.port), timeout=5)
            if i % 2:
                s.sendall(b"PRI * HTTP/2.0\r\n")
            sockets.append(s)
        # four stalled actors fill the stream cap; one of them sent two chunks and stopped reading acks
        stalled = [_stalled_call(streams[0], hold, [robot_chunk("demo", "deaf", "ep-deaf", i, 0).SerializeToString()
                                                    for i in range(2)])]
        stalled += [_stalled_call(streams[i], hold) for i in range(1, 4)]
        wait_until(lambda: guard.open_count("StreamExperience") == 4, 30, "four stalled streams admitted")
        # one more is refused at once with a retryable RESOURCE_EXHAUSTED that names the cap
        extra = _stalled_call(streams[4], hold)
        with pytest.raises(grpc.RpcError) as info:
            next(extra)
        err = info.value
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_streams" in err.details() and "cap of 4" in err.details(), err.details()
        assert dict(err.trailing_metadata())["grpc-retry-pushback-ms"] == "1000"
        # threads were kept free: a newcomer's handshake is answered while every stream slot is held
        obs, act = robot_specs()
        hs = pb_grpc.LearnerStub(channels[4]).Handshake(
            pb.HandshakeRequest(protocol_version=PROTOCOL_VERSION, job_id="demo", actor_id="newcomer", kind=pb.ROBOT,
                                observation_specs=obs, action_specs=act, tasks=TASKS), metadata=MD, timeout=5)
        assert hs.run_config.task_ids == TASKS
        # a newcomer on the real runtime, its spool already full: refused first (kept, backs off), then served
        newcomer = FleetClient(target, "demo", "newcomer", obs, act, TASKS, credential="tok", spool_dir=str(tmp_path / "spool-n"))
        for seq in range(6):
            newcomer.spool.put("ep-new", seq, robot_chunk("demo", "newcomer", "ep-new", seq, 0, n=10,
                                                          end=1 if seq == 5 else None).SerializeToString())
        newcomer.connect()
        assert newcomer.flush(60), "the newcomer's chunks were never all acknowledged"
        assert newcomer.sender.throttled >= 1, "the newcomer should have met the full stream cap first"
        assert newcomer.sender.rejected == 0 and not list((tmp_path / "spool-n" / "rejected").glob("*.chunk"))
        # the stalled streams were ended by the learner with a clear, retryable status
        for call in stalled:
            with pytest.raises(grpc.RpcError) as info:
                for _ in call:  # the deaf peer first gets its two acks
                    pass
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "stream idle" in info.value.details()
            assert "stream_idle_timeout_s 4" in info.value.details()
        assert metric(learner, "fleetloop_learner_streams_closed_total", rpc="StreamExperience", reason="idle_timeout") >= 4
        assert metric(learner, "fleetloop_learner_streams_closed_total", rpc="StreamExperience", reason="over_cap") >= 2
        audit = learner.core.audit()
        assert audit["stored_steps"]["reach-v3"] == 2 * 10 + 6 * 10 and audit["duplicates_stored"] == 0
        write_summary("stalled_peers", {
            "raw_silent_sockets": len(sockets), "stalled_streams": len(stalled), "max_streams": 4,
            "refused_over_cap": metric(learner, "fleetloop_learner_streams_closed_total", rpc="StreamExperience", reason="over_cap"),
            "ended_idle": metric(learner, "fleetloop_learner_streams_closed_total", rpc="StreamExperience", reason="idle_timeout"),
            "newcomer_throttled": newcomer.sender.throttled, "newcomer_rejected": newcomer.sender.rejected,
            "stored_steps": audit["stored_steps"]["reach-v3"]})
        newcomer.close(flush_timeout=0)
        newcomer = None
        wait_until(lambda: guard.open_count("SubscribeWeights") == 0, 30, "the newcomer's subscription released")
        # weight subscriptions have their own cap; the server stays responsive past it
        subs = [pb_grpc.LearnerStub(channels[i]).SubscribeWeights(pb.SubscribeRequest(job_id="demo", actor_id=f"s{i}"),
                                                                  metadata=MD) for i in range(4)]
        for sub in subs:
            assert next(sub).version >= 0
        wait_until(lambda: guard.open_count("SubscribeWeights") >= 4, 30, "four subscriptions open")
        with pytest.raises(grpc.RpcError) as info:
            next(pb_grpc.LearnerStub(channels[4]).SubscribeWeights(pb.SubscribeRequest(job_id="demo", actor_id="s5"),
                                                                   metadata=MD, timeout=10))
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_subscriptions" in info.value.details()
        for sub in subs:
            sub.cancel()
    finally:
        hold.set()
        for s in sockets:
            s.close()
        if newcomer is not None:
            newcomer.close(flush_timeout=0)
        for ch in channels:
            ch.close()
    wait_until(lambda: guard.open_count("StreamExperience") == 0 and guard.open_count("SubscribeWeights") == 0, 30,
               "every guarded stream released")


@pytest.mark.timeout(120)
def test_actor_idle_close_holds_no_learner_thread(learner, tmp_path):
    """An actor with nothing to send closes its stream itself, so idle fleets do not pin threads;
    it reopens one as soon as it has a chunk."""
    obs, act = robot_specs()
    client = FleetClient(f"127.0.0.1:{learner.port}", "demo", "idler", obs, act, TASKS, credential="tok",
                         spool_dir=str(tmp_path / "spool-i"))
    client.sender.idle_close_s = 0.5
    try:
        client.connect()
        client.spool.put("ep-i", 0, robot_chunk("demo", "idler", "ep-i", 0, 0).SerializeToString())
        assert client.flush(30)
        wait_until(lambda: client.sender.idle_closes >= 1 and learner.servicer.guard.open_count("StreamExperience") == 0,
                   30, "the idle stream closed by the actor")
        client.spool.put("ep-i", 1, robot_chunk("demo", "idler", "ep-i", 1, 0, end=1).SerializeToString())
        assert client.flush(30)
        assert client.sender.rejected == 0 and client.sender.reconnects == 0
        assert learner.core.audit()["stored_steps"]["reach-v3"] == 20
        assert metric(learner, "fleetloop_learner_streams_closed_total", rpc="StreamExperience", reason="idle_timeout") == 0
    finally:
        client.close(flush_timeout=0)


def test_chaos_proxy_stall_holds_bytes_then_delivers():
    """The test's own proxy: a stall delivers nothing, and what was sent arrives after it."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    proxy = ChaosProxy("127.0.0.1", srv.getsockname()[1])
    try:
        cli = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
        up, _ = srv.accept()
        up.settimeout(0.5)
        proxy.stalled = True
        cli.sendall(b"held")
        with pytest.raises(socket.timeout):
            up.recv(16)
        proxy.stalled = False
        up.settimeout(5)
        assert up.recv(16) == b"held"
        cli.close(), up.close()
    finally:
        proxy.close()
        srv.close()

