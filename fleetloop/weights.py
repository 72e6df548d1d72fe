"""Weights as content-addressed safetensors blobs.

Contract: a policy's weights travel and rest as one safetensors blob (no pickle, no torch.save);
its identity is the sha256 hex digest of those exact bytes. Nothing loads a blob whose digest it
did not verify: :func:`load_verified` (a whole blob in memory) and :func:`verified_views` (a blob
received piece by piece into a :class:`BlobAssembler`, hashed as it arrived, returned as zero-copy
tensor views) are the only ways in.
"""

from __future__ import annotations

import hashlib
import json
import math

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fleetloop.errors import IntegrityError


def sha256_hex(blob: bytes | memoryview) -> str:
    """Hex sha256 of ``blob``."""
    return hashlib.sha256(blob).hexdigest()


def state_dict_to_blob(state_dict: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """Serialise a state dict to safetensors bytes (tensors made contiguous, moved to CPU)."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    return st_save(tensors, metadata=metadata)


def load_verified(blob: bytes, expected_sha256: str) -> dict[str, torch.Tensor]:
    """Verify ``blob`` against ``expected_sha256`` and return its tensors.

    Raises IntegrityError (and loads nothing) when the digest differs.
    """
    actual = sha256_hex(blob)
    if actual != expected_sha256:
        raise IntegrityError(
            f"weights digest mismatch: expected {expected_sha256[:16]}..., got {actual[:16]}... ({len(blob)} bytes)",
            field="sha256",
            value=actual,
        )
    return st_load(bytes(blob))


# -- streaming, zero-copy path (actors) ---------------------------------------------------------
#: safetensors dtype names -> torch dtypes (the library's set, as far as torch has them).
_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
    "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
}
for _name, _attr in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"), ("F8_E4M3", "float8_e4m3fn"),
                     ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        _DTYPES[_name] = getattr(torch, _attr)
#: The safetensors library's header limit (100 MB).
MAX_HEADER_BYTES = 100_000_000


class BlobAssembler:
    """Receives a blob piece by piece: appends each piece to one growing ``bytearray`` and feeds it
    to sha256 as it arrives, so the digest is ready when the last byte is (no second pass over the
    blob) and no list of pieces is joined (no second copy).

    Memory grows only with the bytes appended (``bytearray`` growth is amortised and, for large
    buffers, glibc's ``realloc`` remaps pages instead of copying them); nothing is allocated from a
    size the sender claims. The digest covers exactly the bytes in :attr:`buffer`, in order."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self._sha = hashlib.sha256()
        self.closed = False

    def close(self) -> None:
        """No more pieces: called before tensors are made views of :attr:`buffer` (a resize would
        move the bytes under them; torch keeps the buffer object alive, not its size)."""
        self.closed = True

    def __len__(self) -> int:
        return len(self.buffer)

    def append(self, data: bytes | memoryview) -> None:
        """Add the next piece (hashlib releases the GIL for pieces over 2 KiB)."""
        if self.closed:
            raise ValueError("BlobAssembler is closed: its buffer backs tensors and must not grow")
        self.buffer += data
        self._sha.update(data)

    def hexdigest(self) -> str:
        """sha256 (hex) of everything appended so far."""
        return self._sha.hexdigest()


def verified_views(assembled: BlobAssembler, expected_sha256: str) -> dict[str, torch.Tensor]:
    """Check ``assembled``'s digest against ``expected_sha256``, then return its tensors as views of
    its buffer (no copy: :func:`tensors_from_safetensors`). The same contract as
    :func:`load_verified`: IntegrityError (field ``sha256``) and nothing loaded when the digest
    differs; IntegrityError (field ``blob``) when the verified bytes are not valid safetensors."""
    actual = assembled.hexdigest()
    if actual != expected_sha256:
        raise IntegrityError(f"weights digest mismatch: expected {expected_sha256[:16]}..., got {actual[:16]}... "
                             f"({len(assembled)} bytes)", field="sha256", value=actual)
    assembled.close()
    return tensors_from_safetensors(assembled.buffer)


def _bad(msg: str, size: int) -> IntegrityError:
    return IntegrityError(f"{size}-byte blob is not valid safetensors: {msg}", field="blob", value=size)


def tensors_from_safetensors(buffer: bytearray) -> dict[str, torch.Tensor]:
    """Parse a safetensors blob held in a writable ``buffer`` and return its tensors as views of it
    (they share its memory and keep the buffer object alive; the caller must never resize it
    afterwards: :meth:`BlobAssembler.close`). Misaligned tensors (never produced by the library, which aligns data) and empty ones
    are copied instead.

    Validation matches the safetensors library's: header length within the blob and at most
    :data:`MAX_HEADER_BYTES`; a JSON object of ``{"dtype", "shape", "data_offsets"}`` entries (plus
    an optional ``__metadata__`` map of strings); known dtypes; each tensor's byte length equal to
    its element count times its dtype's size; the tensors, ordered by offset, tile the data section
    exactly (no gap, no overlap, nothing after the last). Anything else raises IntegrityError
    (field ``blob``) naming the problem."""
    size = len(buffer)
    if size < 8:
        raise _bad("shorter than the 8-byte header length", size)
    n = int.from_bytes(buffer[:8], "little")
    if n > MAX_HEADER_BYTES or 8 + n > size:
        raise _bad(f"header length {n} runs past the blob or the {MAX_HEADER_BYTES}-byte limit", size)
    try:
        header = json.loads(bytes(buffer[8:8 + n]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise _bad(f"header is not UTF-8 JSON ({str(exc)[:100]})", size) from None
    if not isinstance(header, dict):
        raise _bad(f"header is a JSON {type(header).__name__}, not an object", size)
    meta = header.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise _bad("__metadata__ is not a map of strings", size)
    start, data_len = 8 + n, size - 8 - n
    entries = []
    for name, spec in header.items():
        if not isinstance(spec, dict) or set(spec) != {"dtype", "shape", "data_offsets"}:
            raise _bad(f"tensor {name[:60]!r}: entry must have exactly dtype, shape, data_offsets", size)
        dtype, shape, offs = spec["dtype"], spec["shape"], spec["data_offsets"]
        if dtype not in _DTYPES:
            raise _bad(f"tensor {name[:60]!r}: unknown dtype {str(dtype)[:20]!r}", size)
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise _bad(f"tensor {name[:60]!r}: shape {str(shape)[:60]} is not a list of non-negative integers", size)
        if not (isinstance(offs, list) and len(offs) == 2 and all(type(o) is int for o in offs) and 0 <= offs[0] <= offs[1]):
            raise _bad(f"tensor {name[:60]!r}: data_offsets {str(offs)[:60]} is not [begin, end] with begin <= end", size)
        count = math.prod(shape)
        itemsize = torch.empty((), dtype=_DTYPES[dtype]).element_size()
        if count * itemsize != offs[1] - offs[0]:
            raise _bad(f"tensor {name[:60]!r}: shape {shape} of {dtype} needs {count * itemsize} bytes, data_offsets "
                       f"give {offs[1] - offs[0]}", size)
        entries.append((offs[0], offs[1], name, _DTYPES[dtype], shape, count, itemsize))
    entries.sort(key=lambda e: (e[0], e[1]))
    at = 0
    for begin, end, name, *_ in entries:
        if begin != at:
            raise _bad(f"tensor {name[:60]!r} starts at {begin}, expected {at} (gap or overlap)", size)
        at = end
    if at != data_len:
        raise _bad(f"tensors cover {at} of the {data_len} data bytes", size)
    out: dict[str, torch.Tensor] = {}
    for begin, _end, name, dtype, shape, count, itemsize in entries:
        offset = start + begin
        if count == 0:
            out[name] = torch.empty(shape, dtype=dtype)
        elif offset % itemsize:
            raw = torch.frombuffer(buffer, dtype=torch.uint8, count=count * itemsize, offset=offset).clone()
            out[name] = raw.view(dtype).reshape(shape)
        else:
            out[name] = torch.frombuffer(buffer, dtype=dtype, count=count, offset=offset).reshape(shape)
    return out
