"""An independent client, written only from ``proto/fleetloop/v1/fleetloop.proto``, against a real
learner (gRPC on a free loopback port; real redis-server for enrolled credentials). It uses the raw
generated stubs and builds every tensor by hand from the proto's words (dtype, shape, little-endian
bytes): no fleetloop client, codec or test-helper code. Covers issue 17, items 1-7:

1. a learner without credentials serves loopback only; beyond loopback it is refused at start
   (naming ``host`` and ``robot_tokens``) unless ``allow_unauthenticated``, which is exported;
2. validation before the duplicate check; the ledger is keyed by (job, actor, episode, seq); a
   resend with other content is FAILED_PRECONDITION naming the key;
3. streams, handshakes and subscriptions are bound to the actors a credential was enrolled for;
4. out-of-order seqs, first_step jumps and out-of-bound actions are refused naming the field (a seq
   gap, chunks the actor set aside, is accepted and counted: the proto's words changed, see there);
5. an oversized chunk (past the old transport headroom) gets the learner's own refusal with the
   do-not-retry pushback trailer;
6. revoking an enrollment closes the robot's open stream and its fleet-table row says "revoked";
7. a wildcard bind reports an address robots can dial, not 127.0.0.1.
"""

from __future__ import annotations

import json
import socket
import threading
import time

import grpc
import numpy as np
import pytest
from pydantic import ValidationError

from fleetloop.v1 import fleetloop_pb2 as pb
from fleetloop.v1 import fleetloop_pb2_grpc as pb_grpc
from learner.config import LearnerConfig
from learner.process import build_learner
from services.control.jobspec import JobSpec
from services.control.state import StateStore
from tests.helpers.control_plane import start_redis

pytestmark = pytest.mark.timeout(180)
TASK = "reach-v3"


# -- the proto's words, by hand --------------------------------------------------------------------
def tensor(arr: np.ndarray, dtype: int) -> pb.Tensor:
    """Tensor as the proto says: row-major little-endian bytes, prod(shape) * itemsize."""
    return pb.Tensor(dtype=dtype, shape=list(arr.shape), data=np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<")).tobytes())


def chunk(job: str, actor: str, episode: str, seq: int, first_step: int, n: int = 5, *, action: float = 0.5,
          reward: float = 0.0, end: int | None = None, state_bytes: int = 0) -> pb.EpisodeChunk:
    """``n`` steps of a 39-float state / 4-float action robot; ``state_bytes`` > 0 adds steps until the
    observations alone are about that many bytes (an oversized but otherwise valid chunk)."""
    if state_bytes:
        n = max(n, state_bytes // (39 * 4))
    c = pb.EpisodeChunk(job_id=job, actor_id=actor, episode_id=episode, seq=seq, task_id=TASK, behavior_version=0,
                        first_step=first_step, produced_at=time.time())
    c.observations["state"].CopyFrom(tensor(np.full((n, 39), 0.1, np.float32), pb.FLOAT32))
    c.actions["action"].CopyFrom(tensor(np.full((n, 4), action, np.float32), pb.FLOAT32))
    c.rewards.CopyFrom(tensor(np.full(n, reward, np.float32), pb.FLOAT32))
    c.interventions.CopyFrom(tensor(np.zeros(n, np.bool_), pb.BOOL))
    if end is not None:
        c.end.outcome = end
    return c


def specs() -> tuple[list[pb.TensorSpec], list[pb.TensorSpec]]:
    return ([pb.TensorSpec(name="state", dtype=pb.FLOAT32, shape=[39])],
            [pb.TensorSpec(name="action", dtype=pb.FLOAT32, shape=[4], low=[-1.0] * 4, high=[1.0] * 4)])


def send(stub, chunks, md=()) -> list[pb.Ack]:
    """One StreamExperience call with these chunks; the acks (raises the call's error)."""
    return list(stub.StreamExperience(iter(chunks), metadata=md, timeout=20))


def refusal(stub, chunks, md=()) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        send(stub, chunks, md)
    return info.value


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


@pytest.fixture()
def learner(tmp_path):
    """A learner built from a config dict (in-process, real gRPC server on a free loopback port)."""
    made = []

    def make(**cfg):
        impl = build_learner(LearnerConfig(state_dir=tmp_path / f"l{len(made)}", tasks=[TASK], **cfg).model_dump_json()).serve()
        made.append(impl)
        ch = grpc.insecure_channel(f"127.0.0.1:{impl.port}", options=[("grpc.max_send_message_length", 64 << 20),
                                                                      ("grpc.max_receive_message_length", 64 << 20)])
        return impl, pb_grpc.LearnerStub(ch)

    yield make
    for impl in made:
        impl.stop()


@pytest.fixture()
def redis_store(tmp_path):
    server = start_redis(tmp_path / "redis")
    yield StateStore(server.url), server.url
    server.stop()


def metric(impl, name: str, **labels) -> float | None:
    return impl.core.metrics.registry.get_sample_value(name, {"job": impl.core.cfg.job_id, **labels})


# -- 1. no anonymous learner beyond loopback -------------------------------------------------------------
def test_open_learner_beyond_loopback_is_refused_unless_allowed(learner, caplog):
    with pytest.raises(ValidationError) as info:
        LearnerConfig(host="0.0.0.0")
    assert "host '0.0.0.0'" in str(info.value) and "robot_tokens" in str(info.value)
    LearnerConfig(host="0.0.0.0", robot_tokens=["t"])        # with credentials it may
    impl, stub = learner(host="0.0.0.0", allow_unauthenticated=True)
    assert metric(impl, "fleetloop_learner_unauthenticated", host="0.0.0.0") == 1
    acks = send(stub, [chunk(impl.core.cfg.job_id, "anon", "e1", 0, 0)])
    assert len(acks) == 1                                      # it does accept anonymous callers (on purpose)


def test_default_learner_without_credentials_listens_on_loopback_only(learner):
    from learner.exposure import route_address
    impl, stub = learner()
    assert metric(impl, "fleetloop_learner_unauthenticated", host="127.0.0.1") == 1
    assert len(send(stub, [chunk(impl.core.cfg.job_id, "a", "e", 0, 0)])) == 1
    routed = route_address()
    if routed is None:
        pytest.skip("this machine has no non-loopback interface to probe")
    with pytest.raises(OSError):
        socket.create_connection((routed, impl.port), timeout=2).close()


# -- 2. validate first, ledger keyed by (job, actor, episode, seq), digest --------------------------------
def test_resend_is_validated_and_compared_not_blindly_acked(learner):
    impl, stub = learner()
    job = impl.core.cfg.job_id
    first = chunk(job, "a", "ep", 0, 0)
    assert [a.duplicate for a in send(stub, [first])] == [False]
    assert [a.duplicate for a in send(stub, [first])] == [True]  # byte-identical resend: duplicate
    nan = chunk(job, "a", "ep", 0, 0, reward=float("nan"))
    err = refusal(stub, [nan])
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "rewards" in err.details()
    other_job = chunk("other-job", "a", "ep", 0, 0)
    assert refusal(stub, [other_job]).code() == grpc.StatusCode.NOT_FOUND
    changed = chunk(job, "a", "ep", 0, 0, action=0.25)
    err = refusal(stub, [changed])
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "'a'" in err.details() and "'ep'" in err.details() and "seq 0" in err.details()
    # the same (episode, seq) of another actor is another key: stored, not a duplicate
    assert [a.duplicate for a in send(stub, [chunk(job, "b", "ep", 0, 0)])] == [False]
    assert impl.core.ingestor.steps_total == 10


# -- 3. identity binding --------------------------------------------------------------------------------
def test_streams_are_bound_to_the_enrolled_actor(learner, redis_store):
    store, url = redis_store
    job = store.create_job(JobSpec(name="bind", tasks=[TASK]), created_by="test")
    arm1, _ = store.enroll(job.id, "arm-1", by="test")
    fleet, _ = store.enroll(job.id, "fleet", by="test", actors=["sim-*"])
    impl, stub = learner(job_id=job.id, control_redis_url=url)
    obs, act = specs()
    hs = lambda actor, tok: stub.Handshake(pb.HandshakeRequest(  # noqa: E731
        protocol_version=1, job_id=job.id, actor_id=actor, kind=pb.ROBOT, observation_specs=obs, action_specs=act,
        tasks=[TASK]), metadata=bearer(tok), timeout=10)
    assert hs("arm-1", arm1).session_id
    with pytest.raises(grpc.RpcError) as info:
        hs("arm-2", arm1)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED and "arm-2" in info.value.details()
    err = refusal(stub, [chunk(job.id, "arm-2", "e", 0, 0)], bearer(arm1))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED and "'arm-2'" in err.details()
    assert len(send(stub, [chunk(job.id, "arm-1", "e", 0, 0)], bearer(arm1))) == 1
    # a fleet credential may act as any sim-*, but one stream is one actor
    err = refusal(stub, [chunk(job.id, "sim-0", "f0", 0, 0), chunk(job.id, "sim-1", "f1", 0, 0)], bearer(fleet))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED and "bound to actor 'sim-0'" in err.details()
    with pytest.raises(grpc.RpcError) as info:
        next(stub.SubscribeWeights(pb.SubscribeRequest(job_id=job.id, actor_id="arm-9"), metadata=bearer(fleet), timeout=10))
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert impl.core.ingestor.steps_total == 10                 # arm-1's chunk and sim-0's first chunk only


# -- 4. the episode contract ----------------------------------------------------------------------------
def test_out_of_order_seq_first_step_jump_and_out_of_bound_actions_are_refused(learner):
    """The proto's words (as changed by issue 17): seq increases; a gap means the actor set chunks aside and is
    accepted, counted and logged (the rest of the episode is kept); a skipped seq arriving later is out of
    order (FAILED_PRECONDITION); first_step follows the previous chunk; actions lie within the spec's bounds."""
    impl, stub = learner()
    job = impl.core.cfg.job_id
    send(stub, [chunk(job, "a", "gap", 0, 0), chunk(job, "a", "gap", 2, 10)])      # seq 1 was set aside
    assert metric(impl, "fleetloop_learner_seq_gaps_total") == 1
    err = refusal(stub, [chunk(job, "a", "gap", 1, 5)])
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "out of order" in err.details()
    err = refusal(stub, [chunk(job, "a", "gap", 3, 12)])
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "first_step 12" in err.details() and "expected 15" in err.details()
    send(stub, [chunk(job, "a", "ep", 0, 0)])
    err = refusal(stub, [chunk(job, "a", "ep", 1, 7)])
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "first_step 7" in err.details() and "expected 5" in err.details()
    err = refusal(stub, [chunk(job, "a", "ep2", 0, 0, action=1.5)])
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "actions[action]" in err.details() and "1.5" in err.details()
    send(stub, [chunk(job, "a", "ep", 1, 5, end=pb.SUCCESS)])
    err = refusal(stub, [chunk(job, "a", "ep", 2, 10)])
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "end" in err.details()
    assert impl.core.ingestor.steps_total == 20
    online = impl.core.replay.export(TASK, "online")
    assert float(np.abs(online["actions"]).max()) <= 1.0


# -- 5. oversized chunks get the learner's refusal ------------------------------------------------------
def test_oversized_chunk_gets_the_learners_refusal_not_a_transport_error(learner):
    impl, stub = learner(max_message_bytes=4 << 20)
    job = impl.core.cfg.job_id
    big = chunk(job, "a", "ep", 0, 0, state_bytes=6 << 20)       # past max + 1 MiB (the old transport limit)
    assert big.ByteSize() > (4 << 20) + (1 << 20)
    err = refusal(stub, [big])
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_message_bytes" in err.details() and str(4 << 20) in err.details()
    assert dict(err.trailing_metadata() or ())["grpc-retry-pushback-ms"] == "-1"
    assert metric(impl, "fleetloop_learner_rejected_chunks_total", reason="resource_exhausted:message_size") == 1


# -- 6. revocation closes open streams ------------------------------------------------------------------
def test_revocation_closes_the_open_stream_and_marks_the_row(learner, redis_store):
    store, url = redis_store
    job = store.create_job(JobSpec(name="rev", tasks=[TASK]), created_by="test")
    token, enrollment = store.enroll(job.id, "arm-1", by="test")
    impl, stub = learner(job_id=job.id, control_redis_url=url)
    obs, act = specs()
    stub.Handshake(pb.HandshakeRequest(protocol_version=1, job_id=job.id, actor_id="arm-1", kind=pb.ROBOT,
                                       observation_specs=obs, action_specs=act, tasks=[TASK]),
                   metadata=bearer(token), timeout=10)
    revoked = threading.Event()
    sent = []

    def chunks():
        for seq in range(400):  # up to 80 s of chunks at 5 Hz; the stream must end long before
            if revoked.is_set() and len(sent) > 200:
                return
            sent.append(seq)
            yield chunk(job.id, "arm-1", "ep", seq, seq * 5)
            time.sleep(0.2)

    acks = []
    call = stub.StreamExperience(chunks(), metadata=bearer(token), timeout=90)
    with pytest.raises(grpc.RpcError) as info:
        for ack in call:
            acks.append(ack)
            if len(acks) == 3:
                store.revoke_enrollment(job.id, enrollment.id, by="test")
                revoked.set()
                revoked_at = len(acks)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED and "revoked" in info.value.details()
    after = len(acks) - revoked_at
    assert after <= 40, f"{after} chunks stored after the revocation"  # 2 s re-check at 5 chunks/s: ~10-15
    assert impl.core.ingestor.steps_total == len(acks) * 5
    assert impl.core.metrics.registry.get_sample_value(
        "fleetloop_learner_streams_closed_total", {"job": job.id, "rpc": "StreamExperience", "reason": "revoked"}) == 1
    deadline = time.monotonic() + 20
    rows = {}
    while time.monotonic() < deadline:
        rows = {r["actor_id"]: r for r in store.actors(job.id)}
        if rows.get("arm-1", {}).get("status") == "revoked":
            break
        time.sleep(0.3)
    assert rows["arm-1"]["status"] == "revoked", rows


# -- 7. the advertised target ---------------------------------------------------------------------------
def test_wildcard_bind_reports_an_address_robots_can_dial(learner):
    from learner.exposure import route_address
    impl, _ = learner(host="0.0.0.0", robot_tokens=["t"])
    routed = route_address()
    if routed is None:
        assert impl.host != "0.0.0.0"
    else:
        assert impl.host == routed and impl.host != "127.0.0.1"
        with grpc.insecure_channel(f"{impl.host}:{impl.port}") as ch:  # and it is dialable there
            grpc.channel_ready_future(ch).result(timeout=10)
    impl2, _ = learner(host="0.0.0.0", robot_tokens=["t"], advertise_host="learner.example.com")
    assert impl2.host == "learner.example.com"
    assert json.loads(json.dumps(impl2.address()))["host"] == "learner.example.com"
