"""Serving a weight blob as FetchWeights chunks, with one copy of the bytes per chunk.

``pb.WeightChunk(data=bytes(view[a:b])).SerializeToString()`` copies each chunk's bytes three
times (slice to bytes, into the message, into the wire string) in Python, under the GIL, for every
actor that fetches. :func:`chunks` yields the same wire bytes made by
:func:`fleetloop.weight_wire.encode_chunk` (one copy: a ``memoryview`` slice joined once); they
parse as the identical ``WeightChunk`` (tests/unit/test_weight_serving.py). :func:`serialize_chunk`
is the handler's response serializer and passes such bytes through (messages are still serialized).
"""

from __future__ import annotations

from typing import Iterator

from fleetloop.v1 import fleetloop_pb2 as pb
from fleetloop.weight_wire import encode_chunk

__all__ = ["chunks", "encode_chunk", "serialize_chunk"]


def chunks(version: int, sha256: str, blob: bytes, offset: int, chunk_bytes: int) -> Iterator[tuple[int, bytes]]:
    """(payload length, wire bytes) of each chunk of ``blob`` from ``offset`` in ``chunk_bytes`` pieces,
    then the empty end marker when the blob is empty or ``offset`` is its end (as FetchWeights always did)."""
    view = memoryview(blob)
    size = len(blob)
    for off in range(int(offset), size, chunk_bytes):
        data = view[off:off + chunk_bytes]
        yield len(data), encode_chunk(version, off, data, size, sha256)
    if size == 0 or offset == size:
        yield 0, encode_chunk(version, size, b"", size, sha256)


def serialize_chunk(msg: pb.WeightChunk | bytes) -> bytes:
    """Response serializer of FetchWeights: bytes from :func:`encode_chunk` as they are, a message serialized."""
    return msg if isinstance(msg, bytes) else msg.SerializeToString()
