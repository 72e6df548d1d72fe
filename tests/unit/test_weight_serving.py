"""learner.weight_serving: the one-copy chunk encoding parses as the same WeightChunk the library writes."""

import pytest

from fleetloop.v1 import fleetloop_pb2 as pb
from learner.weight_serving import chunks, encode_chunk, serialize_chunk


@pytest.mark.parametrize("version, offset, size", [(0, 0, 1), (3, 0, 127), (2 ** 40, 2 ** 33, 128), (7, 5, 300_000)])
def test_encoding_equals_the_library(version, offset, size):
    data = bytes(range(256)) * (size // 256) + bytes(range(size % 256))
    sha = "ab" * 32
    ours = encode_chunk(version, offset, memoryview(data), offset + size, sha)
    ref = pb.WeightChunk(version=version, offset=offset, data=data, total_size=offset + size, sha256=sha)
    assert pb.WeightChunk.FromString(ours) == ref
    assert serialize_chunk(ours) is ours and serialize_chunk(ref) == ref.SerializeToString()


def test_chunks_cover_the_blob_and_end_marker_rules():
    blob = bytes(range(250)) * 4
    got = [pb.WeightChunk.FromString(b) for _, b in chunks(4, "s", blob, 0, 300)]
    assert [c.offset for c in got] == [0, 300, 600, 900]
    assert b"".join(c.data for c in got) == blob and {c.total_size for c in got} == {1000}
    (end,) = [pb.WeightChunk.FromString(b) for _, b in chunks(4, "s", blob, 1000, 300)]  # resume at the end
    assert end.offset == 1000 and end.data == b"" and end.version == 4
    (empty,) = list(chunks(1, "s", b"", 0, 300))
    assert empty[0] == 0 and pb.WeightChunk.FromString(empty[1]).total_size == 0


# -- fleetloop.weight_wire.parse_chunk: the actor's zero-copy reader ---------------------------
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fleetloop.errors import IntegrityError  # noqa: E402
from fleetloop.weight_wire import parse_chunk  # noqa: E402


def _same(wire: bytes) -> None:
    ref = pb.WeightChunk.FromString(wire)
    got = parse_chunk(wire)
    assert (got.version, got.offset, bytes(got.data), got.total_size, got.sha256) == \
        (ref.version, ref.offset, ref.data, ref.total_size, ref.sha256)


@settings(max_examples=300, deadline=None)
@given(version=st.integers(0, 2 ** 64 - 1), offset=st.integers(0, 2 ** 64 - 1), data=st.binary(max_size=300),
       total=st.integers(0, 2 ** 64 - 1), sha=st.text(max_size=70))
def test_parse_equals_the_library(version, offset, data, total, sha):
    msg = pb.WeightChunk(version=version, offset=offset, data=data, total_size=total, sha256=sha)
    _same(msg.SerializeToString())
    _same(encode_chunk(version, offset, data, total, sha))


def test_parse_is_a_view_and_follows_protobuf_merge_rules():
    a = pb.WeightChunk(version=1, data=b"first", sha256="x").SerializeToString()
    b = pb.WeightChunk(version=2, data=b"second").SerializeToString()
    unknown = b"\x30\x07" + b"\x3a\x02hi" + b"\x41" + bytes(8) + b"\x4d" + bytes(4)  # fields 6 (varint), 7 (bytes), 8, 9
    for wire in (a + b, unknown + a, a + unknown):
        _same(wire)
    wire = pb.WeightChunk(data=b"payload").SerializeToString()
    got = parse_chunk(wire)
    assert isinstance(got.data, memoryview) and got.data.obj is wire


@settings(max_examples=500, deadline=None)
@given(wire=st.binary(max_size=64))
def test_garbage_is_refused_or_read_like_the_library(wire):
    try:
        ref = pb.WeightChunk.FromString(wire)
    except Exception:  # noqa: BLE001 - the library refuses it: so must we, as IntegrityError
        ref = None
    try:
        got = parse_chunk(wire)
    except IntegrityError as exc:
        assert exc.field == "chunk"
        return
    if ref is not None:
        assert (got.version, got.offset, bytes(got.data), got.total_size, got.sha256) == \
            (ref.version, ref.offset, ref.data, ref.total_size, ref.sha256)
