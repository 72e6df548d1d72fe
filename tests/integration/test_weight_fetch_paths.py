"""The actor's weight fetch paths against a real learner (in-process, real gRPC on a free port):
the zero-copy path (``WeightClient(channel=...)``: chunks parsed by fleetloop.weight_wire, hashed
on arrival, tensors as views) and the generated-code path give the same verified tensors as the
safetensors library; a tampered or malformed chunk stream is refused (IntegrityError naming the
field), counted, and never offered."""

import hashlib
import time
from concurrent import futures

import grpc
import pytest
import torch
from safetensors.torch import load as st_load

from fleetloop.client.weight_client import WeightClient
from bench.common import JOB, start_learner_in_process, stop_learner_in_process
from fleetloop.errors import IntegrityError
from fleetloop.v1 import fleetloop_pb2 as pb
from fleetloop.v1 import fleetloop_pb2_grpc as pb_grpc
from fleetloop.weight_wire import encode_chunk
from fleetloop.weights import state_dict_to_blob

pytestmark = pytest.mark.timeout(120)


def _blob(seed: int) -> bytes:
    g = torch.Generator().manual_seed(seed)
    return state_dict_to_blob({"w": torch.randn(300, 700, generator=g), "b": torch.randn(700, generator=g).double(),
                               "i": torch.arange(11)})


def _ann(info) -> pb.WeightAnnouncement:
    return pb.WeightAnnouncement(version=info.version, sha256=info.sha256, size_bytes=info.size_bytes, format="safetensors")


@pytest.fixture(scope="module")
def learner(tmp_path_factory):
    impl = start_learner_in_process(tmp_path_factory.mktemp("learner"))
    channel = grpc.insecure_channel(f"127.0.0.1:{impl.port}")
    try:
        yield impl, channel
    finally:
        channel.close()
        stop_learner_in_process(impl)


def _equal(state, blob: bytes) -> None:
    ref = st_load(blob)
    assert set(state) == set(ref)
    for k, v in ref.items():
        assert state[k].dtype == v.dtype and torch.equal(state[k], v), k


@pytest.mark.parametrize("zero_copy", [True, False])
def test_both_paths_verify_the_published_blob(learner, zero_copy):
    impl, channel = learner
    blob = _blob(1)
    info = impl.core.weights.publish(blob, 1)
    client = WeightClient(pb_grpc.LearnerStub(channel), JOB, "fetch-paths", (), channel=channel if zero_copy else None)
    weights = client.fetch_now(_ann(info))
    _equal(weights.state_dict, blob)
    t = weights.timings
    assert t["fetch_start"] <= t["downloaded"] <= t["verified"] and client.fetched == 1 and client.refused == 0


def test_background_client_on_the_zero_copy_path_gets_new_versions(learner):
    impl, channel = learner
    client = WeightClient(pb_grpc.LearnerStub(channel), JOB, "fetch-paths-bg", (), current_version=0, channel=channel)
    client.start()
    try:
        blob = _blob(2)
        info = impl.core.weights.publish(blob, 2)
        deadline = time.monotonic() + 30
        while client.peek_pending_version() != info.version and time.monotonic() < deadline:
            time.sleep(0.05)
        weights = client.pending()
        assert weights is not None and weights.version == info.version
        _equal(weights.state_dict, blob)
    finally:
        client.stop()


class _Tampering:
    """FetchWeights that sends raw wire bytes: the faithful chunks of ``blob`` with ``mutate`` applied."""

    def __init__(self) -> None:
        self.blob, self.mutate = b"", lambda wires: wires

    def fetch(self, request: bytes, context):
        sha = hashlib.sha256(self.blob).hexdigest()
        wires = [encode_chunk(3, off, self.blob[off:off + 4096], len(self.blob), sha)
                 for off in range(0, len(self.blob), 4096)]
        yield from self.mutate(wires)


@pytest.fixture(scope="module")
def tampering():
    svc = _Tampering()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    handler = grpc.unary_stream_rpc_method_handler(svc.fetch, request_deserializer=lambda b: b,
                                                   response_serializer=lambda b: b)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("fleetloop.v1.Learner",
                                                                          {"FetchWeights": handler}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield svc, channel
    finally:
        channel.close()
        server.stop(grace=None).wait(5)


def _flip_last_payload_byte(wires):
    last = bytearray(wires[-1])
    last[-1] ^= 0x01
    return wires[:-1] + [bytes(last)]


@pytest.mark.parametrize("mutate, field", [
    (_flip_last_payload_byte, "sha256"),                       # a bit flipped in the payload: digest refuses it
    (lambda w: w[:-1], "size_bytes"),                          # the last chunk missing
    (lambda w: [w[0], b"\xff\xff\xff"] + w[1:], "chunk"),      # bytes that are no WeightChunk
    (lambda w: [w[0] + b"\x1a\x7f"] + w[1:], "chunk"),         # a field running past its message
    (lambda w: [w[1]] + w[:1] + w[2:], "offset"),              # reordered
])
def test_zero_copy_path_refuses_bad_streams(tampering, mutate, field):
    svc, channel = tampering
    svc.blob, svc.mutate = _blob(3), mutate
    ann = pb.WeightAnnouncement(version=3, sha256=hashlib.sha256(svc.blob).hexdigest(), size_bytes=len(svc.blob))
    client = WeightClient(pb_grpc.LearnerStub(channel), JOB, "fetch-paths-bad", (), channel=channel, fetch_timeout_s=10)
    with pytest.raises(IntegrityError) as info:
        client.fetch_now(ann)
    assert info.value.field == field and client.refusals == {field: 1} and client.fetched == 0
    svc.mutate = lambda w: w
    _equal(client.fetch_now(ann).state_dict, svc.blob)  # the same client, a faithful stream: verified
