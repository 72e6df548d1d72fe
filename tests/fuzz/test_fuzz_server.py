"""Fuzz target 2: the Handshake and the experience stream through a real gRPC server (the learner
in process, without Ray, on a free loopback port, as in tests/integration/test_bad_input.py).

Per case: the learner answers with the status a local oracle predicts (``parse_message`` +
``learner.ingest.validate`` + the ledger for chunks; the refused checks for handshakes), with a
message naming the field; a refused chunk adds exactly one to
``fleetloop_learner_rejected_chunks_total`` under a reason of that status; and afterwards a
known-good actor still handshakes and gets a chunk acked. The last test runs the real actor
runtime (FleetClient) against the same learner after all the fuzzing.
"""

from __future__ import annotations

import time
import uuid

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleetloop.codec import SUPPORTED_PROTOCOL_VERSIONS, encode, parse_message
from fleetloop.errors import FleetloopError, PermissionDenied
from fleetloop.v1 import fleetloop_pb2 as pb
from fleetloop.v1 import fleetloop_pb2_grpc as pb_grpc
from learner.config import LearnerConfig
from learner.ingest import validate
from learner.ledger import digest
from learner.process import build_learner
from tests.fuzz.record import RECORD
from tests.fuzz.strategies import (JOB, TASKS, TOKEN, ascii_token, byte_mutations, chunk_mutations, handshake_mutation,
                                   robot_specs, valid_chunk, valid_handshake)

pytestmark = [pytest.mark.timeout(300)]
MD = (("authorization", f"Bearer {TOKEN}"),)
MAX_BYTES = 256 * 1024
SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
OBS_SPECS, ACT_SPECS = robot_specs()


@pytest.fixture(scope="module")
def learner(tmp_path_factory):
    """One in-process learner for the module (its gRPC server, training thread and ingest log)."""
    cfg = LearnerConfig(state_dir=tmp_path_factory.mktemp("fuzz-learner"), tasks=TASKS, robot_tokens=[TOKEN], chunk_steps=20,
                        max_message_bytes=MAX_BYTES, max_updates_per_s=2, publish_every=10)
    impl = build_learner(cfg.model_dump_json()).serve()
    yield impl
    impl.stop()


@pytest.fixture(scope="module")
def wire(learner):
    """(channel, stub, raw stream callable) to the learner; the raw stream sends bytes as they are."""
    ch = grpc.insecure_channel(f"127.0.0.1:{learner.port}",
                               options=[("grpc.max_send_message_length", 4 << 20), ("grpc.max_receive_message_length", 4 << 20)])
    stream = ch.stream_stream("/fleetloop.v1.Learner/StreamExperience", request_serializer=lambda b: b,
                              response_deserializer=pb.Ack.FromString)
    handshake = ch.unary_unary("/fleetloop.v1.Learner/Handshake", request_serializer=lambda b: b,
                               response_deserializer=pb.HandshakeResponse.FromString)
    yield ch, pb_grpc.LearnerStub(ch), stream, handshake
    ch.close()


def rejected(impl) -> dict[str, float]:
    """Current fleetloop_learner_rejected_chunks_total by reason."""
    out = {}
    for metric in impl.core.metrics.registry.collect():
        if metric.name == "fleetloop_learner_rejected_chunks":
            for s in metric.samples:
                if s.name.endswith("_total"):
                    out[s.labels["reason"]] = s.value
    return out


def assert_alive(impl, wire) -> None:
    """A known-good actor still handshakes and gets a fresh chunk acked (not as a duplicate)."""
    _, stub, stream, _ = wire
    resp = stub.Handshake(valid_handshake("known-good"), metadata=MD, timeout=10)
    assert list(resp.run_config.task_ids) == TASKS
    acks = list(stream(iter([valid_chunk(f"good-{uuid.uuid4().hex}", 3, actor="known-good").SerializeToString()]),
                       metadata=MD, timeout=10))
    assert len(acks) == 1 and not acks[0].duplicate


def oracle(impl, raw: bytes, bound_actor: str | None = None):
    """What the learner must answer to ``raw`` on a stream bound to ``bound_actor`` (None: not yet bound):
    ("ack", chunk), ("dup", chunk) or ("error", FleetloopError, chunk). The learner's order: size and parse,
    the stream's actor binding, validation (also of resends), then the ledger (byte-identical resend = dup;
    other content under a stored key, a seq gap or a first_step jump refused)."""
    chunk = None
    try:
        chunk = parse_message(raw, pb.EpisodeChunk, MAX_BYTES)
        if bound_actor and chunk.actor_id != bound_actor:
            raise PermissionDenied(f"actor_id {chunk.actor_id!r} on a stream bound to {bound_actor!r}", field="actor_id")
        validate(chunk, JOB, set(TASKS), OBS_SPECS, ACT_SPECS, impl.core.version)
        with impl.core.ingestor.lock:
            dup = impl.core.ingestor.ledger.check(chunk.actor_id, chunk.episode_id, int(chunk.seq), int(chunk.first_step),
                                                  chunk.HasField("end"), digest(raw))
        return ("dup" if dup is True else "ack", chunk)
    except FleetloopError as exc:
        return ("error", exc, chunk)


@st.composite
def stream_case(draw):
    """1..4 serialised chunks (valid, field-mutated, byte-mutated, random, oversize) with fresh episode ids."""
    raws, descs = [], []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["valid", "fields", "fields", "bytes", "random", "oversize"]))
        chunk = valid_chunk(f"fz-{uuid.uuid4().hex}", draw(st.integers(1, 20)), end=draw(st.sampled_from([None, 1, 2])))
        if kind == "fields":
            descs.append("; ".join(draw(chunk_mutations(chunk, 2))) or "unmutated")
            raws.append(chunk.SerializeToString())
        elif kind == "bytes":
            raw, desc = draw(byte_mutations(chunk.SerializeToString()))
            raws.append(raw)
            descs.append(desc)
        elif kind == "random":
            raws.append(draw(st.binary(max_size=512)))
            descs.append("random bytes")
        elif kind == "oversize":
            raws.append(valid_chunk(f"fz-{uuid.uuid4().hex}", 1700).SerializeToString())
            descs.append("oversize")
        else:
            raws.append(chunk.SerializeToString())
            descs.append("valid")
    token = draw(st.one_of(st.just(TOKEN), st.just(TOKEN), st.just(TOKEN), st.none(), ascii_token))
    return raws, descs, token


@SETTINGS
@given(case=stream_case())
def test_stream_fuzz_status_counter_and_liveness(learner, wire, case):
    raws, descs, token = case
    _, _, stream, _ = wire
    md = () if token is None else (("authorization", f"Bearer {token}"),)
    before = rejected(learner)
    acks, error = [], None
    expected = []  # oracle per chunk up to (and including) the first refusal; computed as chunks are acked
    try:
        call = stream(iter(raws), metadata=md, timeout=20)
        for ack in call:
            acks.append(ack)
    except grpc.RpcError as err:
        error = err
    after = rejected(learner)
    grew = {r: after.get(r, 0) - before.get(r, 0) for r in after if after.get(r, 0) != before.get(r, 0)}
    where = f"case {descs} token={token!r}"
    if token != TOKEN:
        assert error is not None and error.code() == grpc.StatusCode.UNAUTHENTICATED, where
        assert not token or len(token) < 6 or token not in error.details(), where   # never echo a secret
        assert grew == {"unauthenticated:authorization": 1}, (where, grew)
        RECORD.case("server.stream", "UNAUTHENTICATED")
        assert_alive(learner, wire)
        return
    # replay the oracle against the learner's state *after* the stream: acked chunks are now in the ledger
    bound = None  # the stream's actor: the first chunk's (the learner binds it before validating)
    for i, raw in enumerate(raws):
        verdict = oracle(learner, raw, bound)
        if bound is None and verdict[-1] is not None and not isinstance(verdict[1], PermissionDenied):
            bound = verdict[-1].actor_id[:128] or None
        if i < len(acks):
            assert verdict[0] in ("dup", "ack"), (where, i, verdict)
            assert (acks[i].episode_id, acks[i].seq) == (verdict[1].episode_id, verdict[1].seq), where
            expected.append("ack")
            continue
        assert error is not None, (where, i, "stream ended without a status")
        code = error.code()
        if verdict[0] == "error":
            exc = verdict[1]
            assert code.name == exc.code, (where, code, error.details(), str(exc))
            assert exc.field in error.details(), (where, error.details())
            reason = f"{exc.code.lower()}:"
            assert sum(grew.values()) == 1 and next(iter(grew)).startswith(reason), (where, grew)
            RECORD.case("server.stream", code.name)
        else:  # oracle says ack, the server refused
            raise AssertionError(f"{where}: chunk {i} should have been acked, got {code.name}: {error.details()}")
        break
    else:
        assert error is None, (where, error.code(), error.details())
        assert not grew, (where, grew)
        RECORD.case("server.stream", "all-acked")
    assert_alive(learner, wire)


def specs_differ(declared, expected) -> bool:
    """The oracle's own spec comparison (independent of fleetloop.codec.specs_mismatch): names unique
    and the same {name: (dtype, shape)} as the job's."""
    names = [s.name for s in declared]
    key = {s.name: (int(s.dtype), list(s.shape)) for s in declared}
    return len(set(names)) != len(names) or key != {s.name: (int(s.dtype), list(s.shape)) for s in expected}


def handshake_expectation(req: pb.HandshakeRequest, token: str | None) -> dict[str, str]:
    """Every check ``req`` fails, as {gRPC code: word the message must contain}; empty = must succeed."""
    fails: dict[str, list[str]] = {}
    if req.protocol_version not in SUPPORTED_PROTOCOL_VERSIONS:
        fails.setdefault("FAILED_PRECONDITION", []).append("protocol_version")
    if req.job_id != JOB:
        fails.setdefault("NOT_FOUND", []).append("job_id")
    if token != TOKEN and not (token is None and req.credential == TOKEN):
        fails.setdefault("UNAUTHENTICATED", []).append("authorization")
    if not req.actor_id or len(req.actor_id) > 128:
        fails.setdefault("INVALID_ARGUMENT", []).append("actor_id")
    if req.kind != pb.ROBOT:
        fails.setdefault("FAILED_PRECONDITION", []).append("kind")
    if specs_differ(req.observation_specs, OBS_SPECS):
        fails.setdefault("FAILED_PRECONDITION", []).append("observation_specs")
    if specs_differ(req.action_specs, ACT_SPECS):
        fails.setdefault("FAILED_PRECONDITION", []).append("action_specs")
    if any(t not in TASKS for t in req.tasks):
        fails.setdefault("INVALID_ARGUMENT", []).append("tasks")
    return fails


@SETTINGS
@given(data=st.data())
def test_handshake_fuzz_status_and_liveness(learner, wire, data):
    _, stub, _, _ = wire
    req = valid_handshake(f"hs-{uuid.uuid4().hex[:8]}")
    fields = [data.draw(handshake_mutation(req)) for _ in range(data.draw(st.integers(1, 3)))]
    token = data.draw(st.one_of(st.just(TOKEN), st.just(TOKEN), st.none(), ascii_token))
    if token is None and data.draw(st.booleans()):
        req.credential = data.draw(st.sampled_from([TOKEN, "", "nope"]))
    md = () if token is None else (("authorization", f"Bearer {token}"),)
    fails = handshake_expectation(req, token)
    where = f"mutated {fields} token={token!r} credential={req.credential!r}"
    try:
        resp = stub.Handshake(req, metadata=md, timeout=10)
    except grpc.RpcError as err:
        code, details = err.code().name, err.details() or ""
        assert code in fails, (where, code, details, fails)
        assert any(word in details for word in fails[code]), (where, code, details)
        assert len(details) < 4000, (where, len(details))
        if code == "UNAUTHENTICATED":  # a presented credential is never echoed
            for secret in (token, req.credential):
                assert not secret or len(secret) < 6 or secret not in details, (where, details)
        RECORD.case("server.handshake", code)
    else:
        assert not fails, (where, "accepted", fails)
        assert list(resp.run_config.task_ids) == TASKS and resp.session_id
        RECORD.case("server.handshake", "accepted")
    assert_alive(learner, wire)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=st.one_of(st.binary(max_size=512), st.builds(lambda: valid_handshake().SerializeToString()).flatmap(byte_mutations)))
def test_handshake_bytes_fuzz(learner, wire, raw):
    """Raw and mutated bytes on the Handshake method: an error status (never a crash), server alive."""
    _, _, _, handshake = wire
    raw = raw[0] if isinstance(raw, tuple) else raw
    try:
        req = pb.HandshakeRequest.FromString(raw)
    except Exception:  # noqa: BLE001
        req = None
    try:
        handshake(raw, metadata=MD, timeout=10)
        outcome = "accepted"
        assert req is not None and not handshake_expectation(req, TOKEN), raw
    except grpc.RpcError as err:
        outcome = err.code().name
        assert err.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND,
                              grpc.StatusCode.UNAUTHENTICATED), (raw, err.code(), err.details())
        if req is None:  # undecodable: the server parses requests itself and names the message type
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "HandshakeRequest" in err.details(), (raw, err.details())
    RECORD.case("server.handshake_bytes", outcome)
    assert_alive(learner, wire)


def test_duplicate_and_huge_specs_are_refused_readably(learner, wire):
    """Findings codec-duplicate-spec-names and codec-unbounded-spec-message (fixed in fleetloop/codec.py)."""
    from fleetloop.codec import make_spec

    _, stub, _, _ = wire
    dup = valid_handshake("dup-specs")
    del dup.observation_specs[:]
    dup.observation_specs.extend([make_spec("state", "float32", [40]), make_spec("state", "float32", [39])])
    huge = valid_handshake("huge-specs")
    huge.observation_specs[0].name = "n" * 100_000
    huge.observation_specs[0].shape.extend([7] * 20_000)
    many = valid_handshake("many-specs")
    many.observation_specs.extend(make_spec(f"s{i}", "float32", [1]) for i in range(50_000))
    for req, word in ((dup, "more than once"), (huge, "observation_specs"), (many, "50001 specs")):
        with pytest.raises(grpc.RpcError) as info:
            stub.Handshake(req, metadata=MD, timeout=10)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION, (info.value.code(), info.value.details()[:200])
        assert word in info.value.details() and len(info.value.details()) < 2000, info.value.details()[:200]
        RECORD.case("server.examples", "FAILED_PRECONDITION")
    assert_alive(learner, wire)


# -- findings of this suite in learner/server.py and learner/ingest.py, fixed there (regression tests) ----------


def test_unknown_actor_kind_is_failed_precondition(learner, wire):
    _, stub, _, _ = wire
    req = valid_handshake("kind-7")
    req.kind = 7
    with pytest.raises(grpc.RpcError) as info:
        stub.Handshake(req, metadata=MD, timeout=10)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "kind" in info.value.details(), info.value.details()


def test_undecodable_handshake_is_invalid_argument(learner, wire):
    _, _, _, handshake = wire
    with pytest.raises(grpc.RpcError) as info:
        handshake(b"\xff\xff garbage", metadata=MD, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "HandshakeRequest" in info.value.details(), \
        (info.value.code(), info.value.details())


def test_handshake_refusals_are_counted(learner, wire):
    _, stub, _, _ = wire

    def totals() -> float:
        return sum(s.value for m in learner.core.metrics.registry.collect() if "handshake" in m.name or "rejected" in m.name
                   for s in m.samples if s.name.endswith("_total"))

    before = totals()
    for change in ({"protocol_version": 99}, {"job_id": "other"}, {"tasks": ["fly-v3"]}):
        req = valid_handshake("counted")
        for k, v in change.items():
            if isinstance(v, list):
                del getattr(req, k)[:]
                getattr(req, k).extend(v)
            else:
                setattr(req, k, v)
        with pytest.raises(grpc.RpcError):
            stub.Handshake(req, metadata=MD, timeout=10)
    assert totals() - before == 3


def test_first_step_past_int64_is_invalid_argument(learner, wire):
    _, _, stream, _ = wire
    chunk = valid_chunk(f"fs-{uuid.uuid4().hex}", 5)
    chunk.first_step = 2**63
    with pytest.raises(grpc.RpcError) as info:
        list(stream(iter([chunk.SerializeToString()]), metadata=MD, timeout=10))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "first_step" in info.value.details(), info.value.details()


@pytest.mark.timeout(120)
def test_episode_ended_before_first_step_does_not_stall_actor(learner, tmp_path):
    from fleetloop.client.runtime import FleetClient

    client = FleetClient(f"127.0.0.1:{learner.port}", JOB, "zero-step-robot", OBS_SPECS, ACT_SPECS, TASKS, credential=TOKEN,
                         spool_dir=str(tmp_path / "spool"))
    try:
        client.connect()
        client.begin_episode(TASKS[0]).end("aborted")
        _record_episode(client, 5)
        assert client.flush(15), f"spool not drained: {client.sender.last_error}"
    finally:
        client.close(flush_timeout=0)


def _record_episode(client, steps: int) -> None:
    ep = client.begin_episode(TASKS[0])
    for i in range(steps):
        ep.record(np.full(39, 0.01 * i, np.float32), np.zeros(4, np.float32), 0.0, intervened=i == 0)
    ep.end("success")


def test_real_actor_runtime_after_fuzzing(learner, tmp_path):
    """After every fuzz case above, the real actor runtime connects, verifies weights, streams an episode, gets it acked."""
    from fleetloop.client.runtime import FleetClient

    before = learner.core.audit()["stored_steps"][TASKS[0]]
    client = FleetClient(f"127.0.0.1:{learner.port}", JOB, "after-fuzz-robot", OBS_SPECS, ACT_SPECS, TASKS, credential=TOKEN,
                         spool_dir=str(tmp_path / "spool"))
    try:
        client.connect()
        assert client.current is not None and client.version >= 0
        _record_episode(client, 12)
        assert client.flush(30), client.sender.last_error
        end = time.monotonic() + 10  # the spool empties just before the sender counts the ack: poll, bounded
        while client.sender.acked < 1 and time.monotonic() < end:
            time.sleep(0.02)
        assert client.sender.acked >= 1 and client.sender.rejected == 0
    finally:
        client.close(flush_timeout=0)
    assert learner.core.audit()["stored_steps"][TASKS[0]] >= before + 12
    encode(np.zeros(1, np.float32))  # codec still importable/usable in this process
