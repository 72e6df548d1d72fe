"""The ``WeightChunk`` wire format, written and read without copying the payload.

A FetchWeights chunk is a protobuf ``WeightChunk`` (version=1, offset=2, data=3, total_size=4,
sha256=5). The generated code copies ``data`` on every step (slice -> bytes -> message -> wire on
the learner; wire -> message -> ``.data`` on the actor). These two functions are the same format
with the payload copied once when written (:func:`encode_chunk`) and not at all when read
(:func:`parse_chunk` returns a ``memoryview`` into the received message). Both are checked
against the generated code in tests/unit/test_weight_serving.py; anything :func:`parse_chunk`
cannot read as a WeightChunk raises IntegrityError (field ``chunk``), never another exception.
"""

from __future__ import annotations

from typing import NamedTuple

from fleetloop.errors import IntegrityError
from fleetloop.v1 import fleetloop_pb2 as pb

_DATA_TAG = b"\x1a"  # field 3 (data), wire type 2 (length-delimited)
_MAX_VARINT_BYTES = 10


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def encode_chunk(version: int, offset: int, data: bytes | memoryview, total_size: int, sha256: str) -> bytes:
    """The wire bytes of ``WeightChunk(version, offset, data, total_size, sha256)``, copying ``data``
    once: a protobuf message is the concatenation of its fields, so the small fields are serialized
    by the generated code and field 3 is appended as tag + length + the bytes."""
    head = pb.WeightChunk(version=version, offset=offset, total_size=total_size, sha256=sha256).SerializeToString()
    if not len(data):
        return head
    return b"".join((head, _DATA_TAG, _varint(len(data)), data))


class Chunk(NamedTuple):
    """A parsed WeightChunk; ``data`` is a view into the received message (no copy)."""

    version: int
    offset: int
    data: memoryview
    total_size: int
    sha256: str


def _bad(msg: str, wire_len: int) -> IntegrityError:
    return IntegrityError(f"{wire_len}-byte weight chunk is not a valid WeightChunk: {msg}", field="chunk", value=wire_len)


def _read_varint(view: memoryview, pos: int, wire_len: int) -> tuple[int, int]:
    value = shift = 0
    for i in range(_MAX_VARINT_BYTES):
        if pos >= len(view):
            raise _bad("truncated varint", wire_len)
        byte = view[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value & ((1 << 64) - 1), pos
        shift += 7
    raise _bad("varint longer than 10 bytes", wire_len)


def parse_chunk(wire: bytes) -> Chunk:
    """Read a serialized WeightChunk as protobuf does (fields in any order, the last occurrence of a
    field wins, unknown fields skipped), with ``data`` as a view into ``wire``. Wrong wire types,
    truncation, groups and non-UTF-8 ``sha256`` raise IntegrityError (field ``chunk``)."""
    view = memoryview(wire)
    n = len(view)
    version = offset = total = 0
    data = view[0:0]
    sha = b""
    pos = 0
    while pos < n:
        key, pos = _read_varint(view, pos, n)
        field, wtype = key >> 3, key & 7
        if field == 0:
            raise _bad("field number 0", n)
        if wtype == 0:
            value, pos = _read_varint(view, pos, n)
            if field == 1:
                version = value
            elif field == 2:
                offset = value
            elif field == 4:
                total = value
            elif field in (3, 5):
                raise _bad(f"field {field} is length-delimited, got a varint", n)
        elif wtype == 2:
            length, pos = _read_varint(view, pos, n)
            if length > n - pos:
                raise _bad(f"field {field} of {length} bytes runs past the message", n)
            if field == 3:
                data = view[pos:pos + length]
            elif field == 5:
                sha = bytes(view[pos:pos + length])
            elif field in (1, 2, 4):
                raise _bad(f"field {field} is a varint, got length-delimited", n)
            pos += length
        elif wtype in (1, 5):
            if field in (1, 2, 3, 4, 5):
                raise _bad(f"field {field} has wire type {wtype}", n)
            pos += 8 if wtype == 1 else 4
            if pos > n:
                raise _bad("truncated fixed-width field", n)
        else:
            raise _bad(f"wire type {wtype} (groups or invalid) in field {field}", n)
    try:
        sha256 = sha.decode("utf-8")
    except UnicodeDecodeError:
        raise _bad("sha256 is not UTF-8", n) from None
    return Chunk(version, offset, data, total, sha256)
