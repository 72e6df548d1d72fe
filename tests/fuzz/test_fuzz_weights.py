"""Fuzz target 3: weight-chunk reassembly and verification on the actor (``fleetloop/client/weight_client.py``).

The one hand-written server of the suite, and why: the real learner serves chunks straight from its
content-addressed weight store and cannot be made to send wrong offsets, overlaps, foreign
versions, a lying size or digest, or a non-safetensors blob under a valid digest. So a small real
gRPC server (free loopback port) implements only SubscribeWeights and FetchWeights and plays back
whatever chunk list a case scripts; the client under test is the real WeightClient over a real
channel.

Contract held: for any mutated chunk stream or announcement, ``fetch_now`` either returns tensors
equal to the published ones (the stream was a faithful one) or raises IntegrityError naming a real
field, counted once in ``refused``; never another exception, never weights whose digest it did not
verify. The background client refuses bad transfers, counts them, offers nothing, and recovers
(verified weights pending) once good chunks come.
"""

from __future__ import annotations

import hashlib
import queue
import struct
import threading
import time
from collections import deque
from concurrent import futures

import grpc
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleetloop.client.weight_client import WeightClient
from fleetloop.errors import FleetloopError, IntegrityError
from fleetloop.v1 import fleetloop_pb2 as pb
from fleetloop.v1 import fleetloop_pb2_grpc as pb_grpc
from fleetloop.weights import state_dict_to_blob
from tests.fuzz.record import RECORD

pytestmark = [pytest.mark.timeout(240)]
JOB = "demo"
CHUNK = 96
FIELDS = {"size_bytes", "version", "sha256", "total_size", "offset", "data", "blob"}
STATE = {"w": torch.arange(24, dtype=torch.float32).reshape(4, 6), "b": torch.linspace(-1, 1, 6)}
BLOB = state_dict_to_blob(STATE)
SHA = hashlib.sha256(BLOB).hexdigest()


def announcement(version: int = 3, blob: bytes = BLOB) -> pb.WeightAnnouncement:
    return pb.WeightAnnouncement(version=version, sha256=hashlib.sha256(blob).hexdigest(), size_bytes=len(blob),
                                 format="safetensors", job_state="running")


def chunks_of(ann: pb.WeightAnnouncement, blob: bytes, size: int = CHUNK) -> list[pb.WeightChunk]:
    """What a faithful learner sends for ``ann`` (as learner/server.py FetchWeights)."""
    out = [pb.WeightChunk(version=ann.version, offset=o, data=blob[o:o + size], total_size=len(blob), sha256=ann.sha256)
           for o in range(0, len(blob), size)]
    return out or [pb.WeightChunk(version=ann.version, offset=0, data=b"", total_size=0, sha256=ann.sha256)]


class ScriptedWeights:
    """SubscribeWeights / FetchWeights playing back scripted announcements and chunk lists.

    ``plans`` holds one chunk list per coming FetchWeights call; when empty, the faithful chunks of
    ``good`` are served. :meth:`announce` streams an announcement to every live subscriber."""

    def __init__(self) -> None:
        self.plans: deque[list[pb.WeightChunk]] = deque()
        self.good: tuple[pb.WeightAnnouncement, bytes] = (announcement(), BLOB)
        self.subscribers: list[queue.Queue] = []
        self.subscribed = 0  # SubscribeWeights calls registered so far
        self.fetches = 0
        self.lock = threading.Lock()

    def announce(self, ann: pb.WeightAnnouncement) -> None:
        with self.lock:
            for q in self.subscribers:
                q.put(ann)

    def SubscribeWeights(self, req, context):
        q: queue.Queue = queue.Queue()
        with self.lock:
            self.subscribers.append(q)
            self.subscribed += 1
        try:
            while context.is_active():
                try:
                    yield q.get(timeout=0.2)
                except queue.Empty:
                    continue
        finally:
            with self.lock:
                self.subscribers.remove(q)

    def FetchWeights(self, req, context):
        with self.lock:
            self.fetches += 1
            plan = self.plans.popleft() if self.plans else chunks_of(*self.good)
        yield from plan


@pytest.fixture(scope="module")
def scripted():
    """A real gRPC server on a free loopback port with the scripted weight service; stopped at the end."""
    svc = ScriptedWeights()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    handlers = {
        "SubscribeWeights": grpc.unary_stream_rpc_method_handler(
            svc.SubscribeWeights, request_deserializer=pb.SubscribeRequest.FromString,
            response_serializer=pb.WeightAnnouncement.SerializeToString),
        "FetchWeights": grpc.unary_stream_rpc_method_handler(
            svc.FetchWeights, request_deserializer=pb.FetchRequest.FromString,
            response_serializer=pb.WeightChunk.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("fleetloop.v1.Learner", handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield svc, pb_grpc.LearnerStub(channel)
    channel.close()
    server.stop(grace=None).wait(5)


def _huge_header_blob() -> bytes:
    return struct.pack("<Q", 2**62) + b'{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}'


def _lying_header_blob() -> bytes:  # a tensor claiming 10^12 elements backed by 16 bytes
    header = b'{"w":{"dtype":"F32","shape":[1000000,1000000],"data_offsets":[0,16]}}'
    return struct.pack("<Q", len(header)) + header + bytes(16)


@st.composite
def weight_case(draw):
    """(announcement, chunk list, description, faithful?) with 0..3 mutations of stream or blob."""
    blob = BLOB
    kind = draw(st.sampled_from(["stream", "stream", "stream", "announcement", "blob", "faithful"]))
    if kind == "blob":  # the publisher itself sent a bad blob, under its own valid digest
        which = draw(st.sampled_from(["garbage", "huge_header", "lying_header", "truncated", "empty", "tail"]))
        blob = {"garbage": draw(st.binary(min_size=1, max_size=300)), "huge_header": _huge_header_blob(),
                "lying_header": _lying_header_blob(), "truncated": BLOB[:len(BLOB) // 2], "empty": b"",
                "tail": BLOB + b"\0" * draw(st.integers(1, 64))}[which]
        ann = announcement(blob=blob)
        return ann, chunks_of(ann, blob), f"blob:{which}", False
    ann = announcement()
    parts = chunks_of(ann, blob)
    if kind == "faithful":
        return ann, parts, "faithful", True
    if kind == "announcement":
        which = draw(st.sampled_from(["size+1", "size-1", "size_huge", "size0", "sha_wrong", "sha_empty", "version"]))
        bad = pb.WeightAnnouncement()
        bad.CopyFrom(ann)
        if which.startswith("size"):
            bad.size_bytes = {"size+1": len(blob) + 1, "size-1": len(blob) - 1, "size_huge": 10**15, "size0": 0}[which]
        elif which == "sha_wrong":
            bad.sha256 = hashlib.sha256(b"other").hexdigest()
        elif which == "sha_empty":
            bad.sha256 = ""
        else:
            bad.version = ann.version + 1
        return bad, parts, f"announcement:{which}", False
    descs = []
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["gap", "overlap", "drop_last", "drop_middle", "extra_bytes", "extra_chunk", "flip",
                                   "shorten", "version", "sha", "total", "empty_chunk", "duplicate", "swap"]))
        i = draw(st.integers(0, len(parts) - 1)) if parts else 0
        if not parts:
            break
        p = parts[i]
        if op == "gap":
            p.offset += draw(st.integers(1, 50))
        elif op == "overlap":
            p.offset = max(0, p.offset - draw(st.integers(1, 50))) if p.offset else p.offset + 1
        elif op == "drop_last":
            parts.pop()
        elif op == "drop_middle":
            parts.pop(i)
        elif op == "extra_bytes":
            p.data += draw(st.binary(min_size=1, max_size=32))
        elif op == "extra_chunk":
            parts.append(pb.WeightChunk(version=ann.version, offset=len(blob), data=draw(st.binary(max_size=32)),
                                        total_size=len(blob), sha256=ann.sha256))
        elif op == "flip":
            data = bytearray(p.data)
            if data:
                data[draw(st.integers(0, len(data) - 1))] ^= 1 << draw(st.integers(0, 7))
            p.data = bytes(data)
        elif op == "shorten":
            p.data = p.data[:-draw(st.integers(1, max(1, len(p.data))))]
        elif op == "version":
            p.version = draw(st.sampled_from([0, ann.version + 1, 2**64 - 1]))
        elif op == "sha":
            p.sha256 = draw(st.sampled_from(["", "0" * 64, SHA.upper()]))
        elif op == "total":
            p.total_size = draw(st.sampled_from([0, len(blob) + 1, 2**63]))
        elif op == "empty_chunk":
            parts.insert(i, pb.WeightChunk(version=ann.version, offset=p.offset, data=b"", total_size=len(blob), sha256=ann.sha256))
        elif op == "duplicate":
            dup = pb.WeightChunk()
            dup.CopyFrom(p)
            parts.insert(i, dup)
        elif op == "swap" and len(parts) > 1:
            j = (i + 1) % len(parts)
            parts[i], parts[j] = parts[j], parts[i]
        descs.append(f"{op}@{i}")
    body = parts[:-1] if parts and not parts[-1].data and parts[-1].offset == len(blob) else parts  # legal end marker
    faithful = b"".join(x.data for x in body) == blob and [x.offset for x in body] == list(range(0, len(blob), CHUNK)) \
        and all(x.version == ann.version and x.sha256 == ann.sha256 and x.total_size == len(blob) for x in parts)
    return ann, parts, "stream:" + ",".join(descs), faithful


def assert_same_state(state: dict[str, torch.Tensor]) -> None:
    assert set(state) == set(STATE)
    for k, v in STATE.items():
        assert torch.equal(state[k], v), k


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(case=weight_case())
def test_fetch_now_verifies_or_refuses_clearly(scripted, case):
    svc, stub = scripted
    ann, parts, desc, faithful = case
    client = WeightClient(stub, JOB, "fuzz-weights", (), fetch_timeout_s=10.0)
    svc.plans.append(parts)
    try:
        weights = client.fetch_now(ann)
    except IntegrityError as exc:
        assert not faithful, (desc, str(exc))
        assert exc.field in FIELDS and exc.field in str(exc), (desc, exc.field, str(exc))
        shown = str(exc.value)[:16] if exc.field == "sha256" else str(exc.value)  # digests are shown abbreviated
        assert shown in str(exc), (desc, exc.value, str(exc))
        assert client.refused == 1 and client.refusals == {exc.field: 1}, (desc, client.refusals)
        RECORD.case("weights.fetch_now", f"IntegrityError:{exc.field}")
    except Exception as exc:  # noqa: BLE001 - the property is "nothing else escapes"
        raise AssertionError(f"{desc}: {type(exc).__name__} escaped fetch_now: {exc}") from exc
    else:
        assert faithful, (desc, "unfaithful stream accepted")
        assert weights.sha256 == ann.sha256 == SHA and weights.version == ann.version
        assert_same_state(weights.state_dict)
        assert client.refused == 0
        RECORD.case("weights.fetch_now", "verified")
    finally:
        svc.plans.clear()


def _start(client: WeightClient, svc: ScriptedWeights) -> None:
    """Start the client and wait until its subscription is registered on the server."""
    before = svc.subscribed
    client.start()
    assert _wait(lambda: svc.subscribed > before)


def _announce(client: WeightClient, svc: ScriptedWeights, ann: pb.WeightAnnouncement) -> None:
    svc.announce(ann)


def _wait(predicate, limit_s: float = 20.0) -> bool:
    """Poll ``predicate`` until true or ``limit_s`` passes (a bound against hangs, not a timing assertion)."""
    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(bad=st.lists(weight_case().filter(lambda c: not c[3] and not c[2].startswith(("blob", "announcement"))),
                    min_size=1, max_size=5))
def test_background_client_refuses_counts_and_recovers(scripted, bad):
    """K bad transfers of an announced version, then faithful ones: the client offers nothing until a
    verified blob, counts every refusal, and ends with the published weights pending. Past 3 failed
    attempts it waits for the next announcement of the version (then re-announced here)."""
    svc, stub = scripted
    ann = announcement(version=7)
    svc.good = (ann, BLOB)
    for _, parts, _, _ in bad:
        for p in parts:  # the cases were scripted for version 3: same blob, announced as 7
            p.version = ann.version if p.version == 3 else p.version
        svc.plans.append(parts)
    client = WeightClient(stub, JOB, "fuzz-bg", (), current_version=-1, fetch_timeout_s=10.0)
    seen: list[int] = []
    client.on_verified = lambda w: seen.append(w.version)
    _start(client, svc)
    try:
        _announce(client, svc, ann)
        if len(bad) >= 3:  # three refusals use up the attempts of one announcement
            assert _wait(lambda: client.refused >= 3), client.refusals
            assert client.peek_pending_version() is None and not seen
            _announce(client, svc, ann)
        assert _wait(lambda: client.peek_pending_version() == ann.version), (client.refusals, [c[2] for c in bad])
        assert client.refused == len(bad), (client.refusals, [c[2] for c in bad])
        weights = client.pending()
        assert weights.sha256 == SHA and seen == [ann.version]
        assert_same_state(weights.state_dict)
        RECORD.case("weights.background", f"recovered after {len(bad)} refusals")
    finally:
        client.stop()
        svc.plans.clear()
        svc.good = (announcement(), BLOB)


def test_non_safetensors_blob_with_valid_digest_does_not_stop_the_fetcher(scripted):
    """Finding weights-not-safetensors: before the fix SafetensorError ended the fetch thread; now the
    blob is refused (field ``blob``), counted, and the next good version still arrives."""
    svc, stub = scripted
    garbage = b"\xff" * 64
    bad_ann = announcement(version=11, blob=garbage)
    svc.good = (bad_ann, garbage)
    client = WeightClient(stub, JOB, "fuzz-garbage", (), current_version=-1, fetch_timeout_s=10.0)
    _start(client, svc)
    try:
        _announce(client, svc, bad_ann)
        assert _wait(lambda: client.refusals.get("blob", 0) >= 3), client.refusals
        assert client.peek_pending_version() is None
        good = announcement(version=12)
        svc.good = (good, BLOB)
        _announce(client, svc, good)
        assert _wait(lambda: client.peek_pending_version() == 12), client.refusals
        assert_same_state(client.pending().state_dict)
        RECORD.case("weights.examples", "IntegrityError:blob then recovered")
    finally:
        client.stop()
        svc.good = (announcement(), BLOB)


def test_huge_announced_size_is_refused_before_allocation(scripted):
    """Finding weights-claimed-size-allocated: size_bytes=10^15 used to be bytearray()'d up front."""
    import tracemalloc

    svc, stub = scripted
    ann = announcement()
    ann.size_bytes = 10**15
    client = WeightClient(stub, JOB, "fuzz-huge", (), fetch_timeout_s=10.0)
    tracemalloc.start()
    try:
        with pytest.raises(IntegrityError, match="size_bytes 1000000000000000") as info:
            client.fetch_now(ann)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert info.value.field == "size_bytes" and peak < 1 << 20 and svc.fetches >= 0
    # under the cap, a lying size costs only the bytes that actually arrive
    ann.size_bytes = 8 << 30
    svc.plans.append(chunks_of(announcement(), BLOB))
    for p in svc.plans[0]:
        p.total_size = ann.size_bytes
    tracemalloc.start()
    try:
        with pytest.raises(FleetloopError, match=f"received {len(BLOB)} of {8 << 30}"):
            client.fetch_now(ann)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20
    RECORD.case("weights.examples", "IntegrityError:size_bytes")
