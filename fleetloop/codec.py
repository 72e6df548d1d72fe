"""Tensor codec and spec checks for the wire contract.

Contract: a :class:`Tensor` is ``dtype`` + ``shape`` + row-major little-endian ``data`` with
``len(data) == prod(shape) * itemsize``. Decoding never trusts the sender: every mismatch raises
:class:`~fleetloop.errors.InvalidArgument` naming the field and the offending value. No pickle.
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping, Sequence

import numpy as np

from fleetloop.errors import InvalidArgument

#: Bumped on any incompatible wire change; the handshake refuses a mismatch.
PROTOCOL_VERSION = 1

# DType enum values from fleetloop.v1 (kept here so the codec does not need generated code).
_DTYPES: dict[int, np.dtype] = {
    1: np.dtype("<f4"),
    2: np.dtype("<f2"),
    4: np.dtype("<f8"),
    5: np.dtype("<i8"),
    6: np.dtype("<i4"),
    7: np.dtype("u1"),
    8: np.dtype("?"),
}
_NAMES = {1: "FLOAT32", 2: "FLOAT16", 3: "BFLOAT16", 4: "FLOAT64", 5: "INT64", 6: "INT32", 7: "UINT8", 8: "BOOL"}
_CODES = {v.str: k for k, v in _DTYPES.items()}
_FLOAT_CODES = {1, 2, 4}


def dtype_code(dtype: np.dtype | str) -> int:
    """Wire enum value for a numpy dtype (little-endian forms only)."""
    dt = np.dtype(dtype).newbyteorder("<") if np.dtype(dtype).byteorder == ">" else np.dtype(dtype)
    try:
        return _CODES[dt.str]
    except KeyError:
        raise InvalidArgument(f"dtype {dt} has no wire encoding", field="dtype", value=str(dt)) from None


def dtype_name(code: int) -> str:
    """Human name of a wire dtype code (for error messages)."""
    return _NAMES.get(code, f"UNKNOWN({code})")


def encode(array: np.ndarray, out=None):
    """Fill (or create) a ``fleetloop.v1.Tensor`` from a numpy array."""
    if out is None:
        from fleetloop.v1 import fleetloop_pb2

        out = fleetloop_pb2.Tensor()
    arr = np.ascontiguousarray(array)
    code = dtype_code(arr.dtype)
    arr = arr.astype(_DTYPES[code], copy=False)
    out.dtype = code
    del out.shape[:]
    out.shape.extend(int(d) for d in arr.shape)
    out.data = arr.tobytes()
    return out


def decode(tensor, field: str = "tensor") -> np.ndarray:
    """Decode a ``fleetloop.v1.Tensor`` to a read-only numpy array, validating size and dtype."""
    code = int(tensor.dtype)
    if code not in _DTYPES:
        raise InvalidArgument(f"unsupported dtype {dtype_name(code)}", field=f"{field}.dtype", value=code)
    shape = tuple(int(d) for d in tensor.shape)
    if any(d < 0 for d in shape):
        raise InvalidArgument(f"negative dimension in shape {list(shape)}", field=f"{field}.shape", value=shape)
    dt = _DTYPES[code]
    expected = math.prod(shape) * dt.itemsize
    if len(tensor.data) != expected:
        raise InvalidArgument(
            f"data is {len(tensor.data)} bytes but dtype {dtype_name(code)} shape {list(shape)} needs {expected}",
            field=f"{field}.data",
            value=len(tensor.data),
        )
    return np.frombuffer(tensor.data, dtype=dt).reshape(shape)


def check_finite(array: np.ndarray, field: str) -> None:
    """Raise InvalidArgument if a float array holds NaN or inf (names the first bad index)."""
    if array.dtype.kind == "f" and array.size and not np.isfinite(array).all():
        bad = np.argwhere(~np.isfinite(array))[0]
        value = array[tuple(bad)]
        raise InvalidArgument(f"non-finite value {value} at index {bad.tolist()}", field=field, value=float(value))


def check_against_spec(array: np.ndarray, spec, steps: int, field: str) -> None:
    """Check a decoded [T, *spec.shape] array against a TensorSpec (dtype, shape, finiteness)."""
    want_dtype = _DTYPES.get(int(spec.dtype))
    if want_dtype is not None and array.dtype != want_dtype:
        raise InvalidArgument(
            f"dtype {array.dtype} does not match spec {spec.name!r} dtype {dtype_name(int(spec.dtype))}",
            field=f"{field}.dtype",
            value=str(array.dtype),
        )
    want = (steps, *[int(d) for d in spec.shape])
    if tuple(array.shape) != want:
        raise InvalidArgument(
            f"shape {list(array.shape)} does not match spec {spec.name!r} [T={steps}, {list(spec.shape)}]",
            field=f"{field}.shape",
            value=list(array.shape),
        )
    check_finite(array, field)


def make_spec(name: str, dtype: str, shape: Sequence[int], low: Iterable[float] = (), high: Iterable[float] = ()):
    """Build a ``fleetloop.v1.TensorSpec``."""
    from fleetloop.v1 import fleetloop_pb2

    return fleetloop_pb2.TensorSpec(
        name=name, dtype=dtype_code(np.dtype(dtype)), shape=list(shape), low=list(low), high=list(high)
    )


def spec_key(spec) -> tuple:
    """Comparable identity of a TensorSpec (name, dtype, shape)."""
    return (spec.name, int(spec.dtype), tuple(int(d) for d in spec.shape))


def describe_specs(specs: Iterable) -> str:
    """``name:DTYPE[shape]`` list for messages."""
    return ", ".join(f"{s.name}:{dtype_name(int(s.dtype))}{list(s.shape)}" for s in specs)


def specs_mismatch(declared: Iterable, expected: Iterable) -> str | None:
    """None if the two spec lists agree (order-free), else a message naming the difference."""
    d = {s.name: spec_key(s) for s in declared}
    e = {s.name: spec_key(s) for s in expected}
    if d == e:
        return None
    return f"declared [{describe_specs(declared)}] but the job expects [{describe_specs(expected)}]"


def decode_map(tensors: Mapping[str, object], specs: Sequence, steps: int, field: str) -> dict[str, np.ndarray]:
    """Decode a name->Tensor map, requiring exactly the spec names, each checked against its spec."""
    names = {s.name for s in specs}
    extra = set(tensors) - names
    if extra:
        name = sorted(extra)[0]
        raise InvalidArgument(f"unknown tensor {name!r}; expected {sorted(names)}", field=f"{field}[{name}]", value=name)
    out = {}
    for spec in specs:
        if spec.name not in tensors:
            raise InvalidArgument(f"missing tensor {spec.name!r}", field=f"{field}[{spec.name}]", value=None)
        arr = decode(tensors[spec.name], f"{field}[{spec.name}]")
        check_against_spec(arr, spec, steps, f"{field}[{spec.name}]")
        out[spec.name] = arr
    return out
