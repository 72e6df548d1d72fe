"""Weights as content-addressed safetensors blobs (no torch needed: the torch part is
:mod:`fleetloop.weights_torch`, imported only when torch tensors are asked for).

Contract: a policy's weights travel and rest as one safetensors blob (no pickle, no torch.save);
its identity is the sha256 hex digest of those exact bytes. Nothing loads a blob whose digest it
did not verify: :func:`load_verified` (a whole blob in memory) and :func:`verified_views` (a blob
received piece by piece into a :class:`BlobAssembler`, hashed as it arrived, returned as zero-copy
views) are the only ways in.

Tensor formats (``fmt``): ``"torch"`` (the default everywhere, as before: ``torch.Tensor`` s, needs
torch) or ``"numpy"`` (``numpy.ndarray`` s, no torch: robots that run their policy elsewhere, the
``fleetloop-client`` wheel); :func:`resolve_format` maps ``"auto"`` to torch when it is importable,
else numpy. Both formats parse the blob with the same checks (:func:`parse_header`). In numpy,
the dtypes numpy lacks are widened exactly to float32 (a copy): ``BF16``, ``F8_E4M3``, ``F8_E5M2``;
every other tensor is a view of the buffer unless its offset is misaligned (then a copy).
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any, Mapping, NamedTuple

import numpy as np

from fleetloop.errors import IntegrityError, InvalidArgument

#: The safetensors library's header limit (100 MB).
MAX_HEADER_BYTES = 100_000_000
#: safetensors dtype name -> bytes per element (the library's set).
DTYPE_SIZES: dict[str, int] = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
                               "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
#: safetensors dtype name -> numpy dtype, for the dtypes numpy has (little-endian, as stored).
NUMPY_DTYPES: dict[str, np.dtype] = {name: np.dtype(code) for name, code in (
    ("BOOL", "?"), ("U8", "u1"), ("I8", "i1"), ("I16", "<i2"), ("U16", "<u2"), ("F16", "<f2"), ("I32", "<i4"),
    ("U32", "<u4"), ("F32", "<f4"), ("I64", "<i8"), ("U64", "<u8"), ("F64", "<f8"))}
FORMATS = ("torch", "numpy")


def sha256_hex(blob: bytes | memoryview) -> str:
    """Hex sha256 of ``blob``."""
    return hashlib.sha256(blob).hexdigest()


def resolve_format(fmt: str = "auto") -> str:
    """``"torch"`` or ``"numpy"`` for a tensor-format setting (``"auto"``: torch when it can be
    imported, else numpy); InvalidArgument naming ``tensor_format`` for anything else."""
    if fmt == "auto":
        try:
            import torch  # noqa: F401
        except ImportError:
            return "numpy"
        return "torch"
    if fmt not in FORMATS:
        raise InvalidArgument(f"tensor format {fmt!r} is not one of {['auto', *FORMATS]}", field="tensor_format", value=fmt)
    return fmt


def state_dict_to_blob(state_dict: Mapping[str, Any], metadata: dict[str, str] | None = None) -> bytes:
    """Serialise a torch state dict to safetensors bytes (tensors made contiguous, moved to CPU)."""
    from fleetloop.weights_torch import state_dict_to_blob as to_blob

    return to_blob(state_dict, metadata)


def arrays_to_blob(arrays: Mapping[str, np.ndarray], metadata: dict[str, str] | None = None) -> bytes:
    """Serialise numpy arrays to safetensors bytes (no torch; made C-contiguous little-endian)."""
    from safetensors.numpy import save

    return save({k: np.ascontiguousarray(v).astype(np.asarray(v).dtype.newbyteorder("<"), copy=False)
                 for k, v in arrays.items()}, metadata=metadata)


def _check_digest(actual: str, expected: str, size: int) -> None:
    if actual != expected:
        raise IntegrityError(f"weights digest mismatch: expected {expected[:16]}..., got {actual[:16]}... ({size} bytes)",
                             field="sha256", value=actual)


def load_verified(blob: bytes, expected_sha256: str, fmt: str = "torch") -> dict[str, Any]:
    """Verify ``blob`` against ``expected_sha256`` and return its tensors (``fmt``: see the module
    docstring; torch goes through the safetensors library, numpy through :func:`tensors_from_safetensors`
    on a copy of the blob). Raises IntegrityError (and loads nothing) when the digest differs."""
    _check_digest(sha256_hex(blob), expected_sha256, len(blob))
    if resolve_format(fmt) == "numpy":
        return tensors_from_safetensors(bytearray(blob), "numpy")
    from safetensors.torch import load as st_load

    return st_load(bytes(blob))


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
        move the bytes under them; the views keep the buffer object alive, not its size)."""
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


def verified_views(assembled: BlobAssembler, expected_sha256: str, fmt: str = "torch") -> dict[str, Any]:
    """Check ``assembled``'s digest against ``expected_sha256``, then return its tensors as views of
    its buffer (no copy: :func:`tensors_from_safetensors`). The same contract as
    :func:`load_verified`: IntegrityError (field ``sha256``) and nothing loaded when the digest
    differs; IntegrityError (field ``blob``) when the verified bytes are not valid safetensors."""
    _check_digest(assembled.hexdigest(), expected_sha256, len(assembled))
    assembled.close()
    return tensors_from_safetensors(assembled.buffer, fmt)


class TensorEntry(NamedTuple):
    """One tensor of a parsed safetensors header: absolute byte ``offset`` in the blob, element ``count``."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    count: int
    itemsize: int


def _bad(msg: str, size: int) -> IntegrityError:
    return IntegrityError(f"{size}-byte blob is not valid safetensors: {msg}", field="blob", value=size)


def parse_header(buffer: bytes | bytearray | memoryview) -> list[TensorEntry]:
    """The tensors of a safetensors blob, validated as the safetensors library does: header length
    within the blob and at most :data:`MAX_HEADER_BYTES`; a JSON object of ``{"dtype", "shape",
    "data_offsets"}`` entries (plus an optional ``__metadata__`` map of strings); known dtypes
    (:data:`DTYPE_SIZES`); each tensor's byte length equal to its element count times its dtype's
    size; the tensors, ordered by offset, tile the data section exactly (no gap, no overlap, nothing
    after the last). Anything else raises IntegrityError (field ``blob``) naming the problem."""
    size = len(buffer)
    if size < 8:
        raise _bad("shorter than the 8-byte header length", size)
    n = int.from_bytes(bytes(buffer[:8]), "little")
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
    spans = []
    for name, spec in header.items():
        if not isinstance(spec, dict) or set(spec) != {"dtype", "shape", "data_offsets"}:
            raise _bad(f"tensor {name[:60]!r}: entry must have exactly dtype, shape, data_offsets", size)
        dtype, shape, offs = spec["dtype"], spec["shape"], spec["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
            raise _bad(f"tensor {name[:60]!r}: unknown dtype {str(dtype)[:20]!r}", size)
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise _bad(f"tensor {name[:60]!r}: shape {str(shape)[:60]} is not a list of non-negative integers", size)
        if not (isinstance(offs, list) and len(offs) == 2 and all(type(o) is int for o in offs) and 0 <= offs[0] <= offs[1]):
            raise _bad(f"tensor {name[:60]!r}: data_offsets {str(offs)[:60]} is not [begin, end] with begin <= end", size)
        count, itemsize = math.prod(shape), DTYPE_SIZES[dtype]
        if count * itemsize != offs[1] - offs[0]:
            raise _bad(f"tensor {name[:60]!r}: shape {shape} of {dtype} needs {count * itemsize} bytes, data_offsets "
                       f"give {offs[1] - offs[0]}", size)
        spans.append((offs[0], offs[1], TensorEntry(name, dtype, tuple(shape), start + offs[0], count, itemsize)))
    spans.sort(key=lambda e: (e[0], e[1]))
    at = 0
    for begin, end, entry in spans:
        if begin != at:
            raise _bad(f"tensor {entry.name[:60]!r} starts at {begin}, expected {at} (gap or overlap)", size)
        at = end
    if at != data_len:
        raise _bad(f"tensors cover {at} of the {data_len} data bytes", size)
    return [entry for _, _, entry in spans]


def tensors_from_safetensors(buffer: bytearray, fmt: str = "torch") -> dict[str, Any]:
    """Parse a safetensors blob held in a writable ``buffer`` (:func:`parse_header`: every check,
    IntegrityError field ``blob``) and return its tensors in ``fmt`` as views of it (they share its
    memory and keep the buffer object alive; the caller must never resize it afterwards:
    :meth:`BlobAssembler.close`). Misaligned tensors (never produced by the library, which aligns
    data), empty ones and, in numpy, the widened dtypes (module docstring) are copies."""
    entries = parse_header(buffer)
    if resolve_format(fmt) == "torch":
        from fleetloop.weights_torch import tensor_views

        return tensor_views(buffer, entries)
    return {e.name: _numpy_view(buffer, e) for e in entries}


def _numpy_view(buffer: bytearray, e: TensorEntry) -> np.ndarray:
    """One tensor of ``buffer`` as a numpy array (see :func:`tensors_from_safetensors`)."""
    dtype = NUMPY_DTYPES.get(e.dtype)
    if dtype is None:  # BF16, F8: no numpy dtype; widened exactly to float32
        raw = np.frombuffer(buffer, dtype=np.uint8, count=e.count * e.itemsize, offset=e.offset)
        return _widen(raw, e.dtype).reshape(e.shape)
    if e.count == 0:
        return np.empty(e.shape, dtype=dtype)
    if e.offset % e.itemsize:
        raw = np.frombuffer(buffer, dtype=np.uint8, count=e.count * e.itemsize, offset=e.offset).copy()
        return raw.view(dtype).reshape(e.shape)
    return np.frombuffer(buffer, dtype=dtype, count=e.count, offset=e.offset).reshape(e.shape)


def _f8_table(exp_bits: int, bias: int, finite_only: bool) -> np.ndarray:
    """float32 value of each of the 256 bytes of an 8-bit float (sign, ``exp_bits``, the rest mantissa)."""
    man_bits = 7 - exp_bits
    out = np.empty(256, np.float32)
    for byte in range(256):
        sign = -1.0 if byte & 0x80 else 1.0
        exp, man = (byte >> man_bits) & ((1 << exp_bits) - 1), byte & ((1 << man_bits) - 1)
        top = exp == (1 << exp_bits) - 1
        if finite_only and top and man == (1 << man_bits) - 1:   # E4M3FN: S.1111.111 is NaN, no infinities
            value = float("nan")
        elif not finite_only and top:                             # E5M2: IEEE-like infinities and NaNs
            value = sign * float("inf") if man == 0 else float("nan")
        elif exp == 0:
            value = sign * man * 2.0 ** (1 - bias - man_bits)
        else:
            value = sign * (1 + man / (1 << man_bits)) * 2.0 ** (exp - bias)
        out[byte] = value
    return out


_F8 = {"F8_E4M3": (4, 7, True), "F8_E5M2": (5, 15, False)}
_F8_TABLES: dict[str, np.ndarray] = {}


def _widen(raw: np.ndarray, dtype: str) -> np.ndarray:
    """float32 copy of little-endian ``BF16`` / ``F8_*`` bytes (exact: every value is a float32)."""
    if dtype == "BF16":
        halves = raw.copy().view("<u2") if raw.size else np.empty(0, "<u2")
        return (halves.astype(np.uint32) << 16).view(np.float32)
    if dtype not in _F8_TABLES:
        _F8_TABLES[dtype] = _f8_table(*_F8[dtype])
    return _F8_TABLES[dtype][raw]
