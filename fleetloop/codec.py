"""Tensor codec and spec checks for the wire contract.

Contract: a :class:`Tensor` is ``dtype`` + ``shape`` + row-major little-endian ``data`` with
``len(data) == prod(shape) * itemsize``. Decoding never trusts the sender: every mismatch raises
:class:`~fleetloop.errors.InvalidArgument` naming the field and the offending value. No pickle.

Decoding is zero-copy and bounded: the shape is checked (at most :data:`MAX_NDIM` dimensions, none
negative, a layout of at most :data:`MAX_LAYOUT_BYTES` even when a dimension is 0) and compared with
the byte length *before* any array is built, so a shape claiming 10^12 elements costs nothing.
Raw wire bytes become messages only through :func:`parse_message` (size limit first, then parse),
which raises only FleetloopError subclasses. ``tests/fuzz`` holds these contracts with hypothesis.

Compressed images (``Tensor.encoding`` PNG / JPEG, one encoded image per ``[H, W, C]`` frame in
``frames``): :func:`encode` writes them with ``encoding="png"|"jpeg"``, :func:`decode` validates and
decodes them (:mod:`fleetloop.image_codec`); :func:`decode_map` compares a tensor's declared shape with
its spec *before* decoding any frame, so no image larger than the job's spec is ever decompressed.

Spec lists (an actor's handshake against the job's) are compared order-free by name, bounds
included: :func:`spec_problems` lists every difference per tensor, :func:`check_specs` refuses with
FailedPrecondition naming the first tensor (``observation_specs[corner3]``), and every message about
specs is bounded in size whatever was declared.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

import numpy as np

from fleetloop import image_codec
from fleetloop.errors import FailedPrecondition, InvalidArgument, ResourceExhausted

#: Bumped on any incompatible wire change; the handshake refuses a mismatch.
PROTOCOL_VERSION = 2
#: Versions a learner still serves: 1 (robots before LLM rollouts existed) and 2 (LLM rollouts: CompletionGroup, Admit).
SUPPORTED_PROTOCOL_VERSIONS = frozenset({1, 2})

#: DType enum values from fleetloop.v1 -> little-endian numpy dtypes (kept here so the codec does not
#: need generated code); public: actors size their buffers with it.
WIRE_DTYPES: dict[int, np.dtype] = {
    1: np.dtype("<f4"),
    2: np.dtype("<f2"),
    4: np.dtype("<f8"),
    5: np.dtype("<i8"),
    6: np.dtype("<i4"),
    7: np.dtype("u1"),
    8: np.dtype("?"),
}
_NAMES = {1: "FLOAT32", 2: "FLOAT16", 3: "BFLOAT16", 4: "FLOAT64", 5: "INT64", 6: "INT32", 7: "UINT8", 8: "BOOL"}
_CODES = {v.str: k for k, v in WIRE_DTYPES.items()}
_FLOAT_CODES = {1, 2, 4}

#: Most dimensions a wire tensor may have (numpy's own limit is 64; robots need <= 5: [T, cam, H, W, C]).
MAX_NDIM = 16
#: Largest layout a shape may describe, in bytes, counting a 0 dimension as 1 (numpy refuses layouts
#: past 2^63 even for empty arrays; anything near this is an attack or a bug, never data).
MAX_LAYOUT_BYTES = 1 << 40
#: Most bytes one compressed (PNG / JPEG) tensor may decode to when no spec bounds it (256 MiB).
MAX_DECODED_IMAGE_BYTES = 1 << 28


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


def encode(array: np.ndarray, out=None, encoding: str | int = "raw", quality: int = 90, png_level: int = 1):
    """Fill (or create) a ``fleetloop.v1.Tensor`` from a numpy array.

    ``encoding`` 'raw' (default): row-major bytes in ``data``. 'png' (lossless) or 'jpeg' (lossy,
    ``quality`` 1..95): a uint8 ``[..., H, W, C]`` array as one encoded image per frame in ``frames``
    (see :mod:`fleetloop.image_codec`; ``png_level`` is the zlib level)."""
    if out is None:
        from fleetloop.v1 import fleetloop_pb2

        out = fleetloop_pb2.Tensor()
    arr = np.ascontiguousarray(array)
    code = dtype_code(arr.dtype)
    arr = arr.astype(WIRE_DTYPES[code], copy=False)
    enc = image_codec.encoding_code(encoding)
    out.dtype = code
    del out.shape[:]
    out.shape.extend(int(d) for d in arr.shape)
    del out.frames[:]
    out.encoding = enc
    if enc == image_codec.RAW:
        out.data = arr.tobytes()
    else:
        out.data = b""
        out.frames.extend(image_codec.encode_frames(arr, enc, quality=quality, png_level=png_level))
    return out


def check_shape(shape: Sequence[int], itemsize: int, field: str) -> tuple[int, ...]:
    """Validate a wire shape before anything is allocated; returns it as a tuple of ints.

    Refuses (InvalidArgument naming ``field`` and the shape) more than :data:`MAX_NDIM` dimensions,
    a negative dimension, and a layout past :data:`MAX_LAYOUT_BYTES` (0 dimensions counted as 1).
    """
    shape = tuple(int(d) for d in shape)
    if len(shape) > MAX_NDIM:
        raise InvalidArgument(f"shape has {len(shape)} dimensions (at most {MAX_NDIM})", field=f"{field}.shape",
                              value=len(shape))
    if any(d < 0 for d in shape):
        raise InvalidArgument(f"negative dimension in shape {list(shape)}", field=f"{field}.shape", value=list(shape))
    layout = math.prod(max(d, 1) for d in shape) * itemsize
    if layout > MAX_LAYOUT_BYTES:
        raise InvalidArgument(f"shape {list(shape)} describes {layout} bytes (layout limit {MAX_LAYOUT_BYTES})",
                              field=f"{field}.shape", value=list(shape))
    return shape


def decode(tensor, field: str = "tensor", max_decoded_bytes: int = MAX_DECODED_IMAGE_BYTES,
           headers_only: bool = False) -> np.ndarray:
    """Decode a ``fleetloop.v1.Tensor`` to a read-only numpy array, validating dtype, shape and size.

    Raw: zero-copy (a view of ``tensor.data``); nothing is allocated before every check passed.
    PNG / JPEG: uint8 only, at most ``max_decoded_bytes`` decoded, every frame checked (see
    :mod:`fleetloop.image_codec`). With ``headers_only`` an encoded tensor is not decoded: the same
    checks on the headers only (:func:`fleetloop.image_codec.check_frames`), and the result is an
    object array of its frames (bytes) shaped ``shape[:-3]``.
    """
    code = int(tensor.dtype)
    if code not in WIRE_DTYPES:
        known = f" ({_NAMES[code]})" if code in _NAMES else ""
        raise InvalidArgument(f"unsupported dtype {code}{known}; the wire carries {sorted(_NAMES[c] for c in WIRE_DTYPES)}",
                              field=f"{field}.dtype", value=code)
    dt = WIRE_DTYPES[code]
    shape = check_shape(tensor.shape, dt.itemsize, field)
    if tensor.encoding:
        return _decode_images(tensor, code, shape, field, max_decoded_bytes, headers_only)
    if len(tensor.frames):
        raise InvalidArgument(f"a RAW tensor carries its values in data, not in {len(tensor.frames)} frames",
                              field=f"{field}.frames", value=len(tensor.frames))
    expected = math.prod(shape) * dt.itemsize
    if len(tensor.data) != expected:
        raise InvalidArgument(
            f"data is {len(tensor.data)} bytes but dtype {dtype_name(code)} shape {list(shape)} needs {expected}",
            field=f"{field}.data",
            value=len(tensor.data),
        )
    return np.frombuffer(tensor.data, dtype=dt).reshape(shape)


def _decode_images(tensor, code: int, shape: tuple[int, ...], field: str, max_decoded_bytes: int,
                   headers_only: bool = False) -> np.ndarray:
    enc = int(tensor.encoding)
    if enc not in image_codec.NAMES:
        raise InvalidArgument(f"unknown encoding {enc}; the wire carries {sorted(image_codec.NAMES.values())}",
                              field=f"{field}.encoding", value=enc)
    if code != image_codec.UINT8:
        raise InvalidArgument(f"{image_codec.NAMES[enc]} tensors are UINT8, not {dtype_name(code)}", field=f"{field}.dtype",
                              value=code)
    if tensor.data:
        raise InvalidArgument(f"an encoded ({image_codec.NAMES[enc]}) tensor carries its values in frames; data must be "
                              f"empty, got {len(tensor.data)} bytes", field=f"{field}.data", value=len(tensor.data))
    size = math.prod(shape)
    if size > max_decoded_bytes:
        raise InvalidArgument(f"shape {list(shape)} decodes to {size} bytes (limit {max_decoded_bytes})",
                              field=f"{field}.shape", value=list(shape))
    if not headers_only:
        return image_codec.decode_frames(tensor.frames, shape, enc, field)
    frames = list(tensor.frames)
    image_codec.check_frames(frames, shape, enc, field)
    out = np.empty(len(frames), dtype=object)
    out[:] = frames
    return out.reshape(shape[:-3])


def parse_message(raw: bytes, message_cls, max_bytes: int | None = None, field: str = "message"):
    """Parse wire bytes into ``message_cls`` (a generated protobuf class), never trusting them.

    Size first: more than ``max_bytes`` -> ResourceExhausted (field ``message_size``, value the
    length) without parsing. Then any parse failure (truncated, bad wire type, invalid UTF-8 in a
    string, nesting too deep) -> InvalidArgument naming ``field`` and the length. Nothing else escapes.
    """
    if max_bytes is not None and len(raw) > max_bytes:
        raise ResourceExhausted(f"message of {len(raw)} bytes exceeds max_message_bytes {max_bytes}",
                                field="message_size", value=len(raw))
    try:
        return message_cls.FromString(raw)
    except Exception as exc:  # DecodeError, RecursionError, ...: all mean "not this message"
        name = getattr(getattr(message_cls, "DESCRIPTOR", None), "name", message_cls.__name__)
        raise InvalidArgument(f"{len(raw)} bytes are not a valid {name}: {type(exc).__name__}: {exc}"[:300],
                              field=field, value=len(raw)) from None


def check_finite(array: np.ndarray, field: str) -> None:
    """Raise InvalidArgument if a float array holds NaN or inf (names the first bad index)."""
    if array.dtype.kind == "f" and array.size and not np.isfinite(array).all():
        bad = np.argwhere(~np.isfinite(array))[0]
        value = array[tuple(bad)]
        raise InvalidArgument(f"non-finite value {value} at index {bad.tolist()}", field=field, value=float(value))


def check_against_spec(array: np.ndarray, spec, steps: int, field: str) -> None:
    """Check a decoded [T, *spec.shape] array against a TensorSpec (dtype, shape, finiteness)."""
    want_dtype = WIRE_DTYPES.get(int(spec.dtype))
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
    """Comparable identity of a TensorSpec (name, dtype, shape); bounds are compared by :func:`spec_problems`."""
    return (spec.name, int(spec.dtype), tuple(int(d) for d in spec.shape))


class _Spec(NamedTuple):
    name: str
    dtype: int
    shape: tuple[int, ...]
    low: tuple[float, ...]
    high: tuple[float, ...]


def _norm(spec) -> _Spec:
    """One spec in a comparable form: a wire ``TensorSpec`` (dtype as enum code), a ``SpecModel`` or
    a dict (dtype as a numpy name, e.g. from :mod:`fleetloop.presets`)."""
    get = spec.get if isinstance(spec, Mapping) else (lambda k, d=None: getattr(spec, k, d))
    dtype = get("dtype", "float32")
    if isinstance(dtype, (int, np.integer)) and not isinstance(dtype, bool):
        code = int(dtype)
    else:
        try:
            code = dtype_code(np.dtype(str(dtype)))
        except TypeError:
            raise InvalidArgument(f"spec {str(get('name'))[:40]!r} has unknown dtype {str(dtype)[:40]!r}",
                                  field="dtype", value=str(dtype)[:40]) from None
    return _Spec(str(get("name", "")), code, tuple(int(d) for d in get("shape", ()) or ()),
                 tuple(float(x) for x in get("low", ()) or ()), tuple(float(x) for x in get("high", ()) or ()))


#: What :class:`SpecProblem` reports, in the order problems of one tensor are listed.
SPEC_PROBLEM_KINDS = ("duplicate", "unexpected", "dtype", "shape", "bounds", "missing")


class SpecProblem(NamedTuple):
    """One difference between a declared spec list and the expected one, for the tensor ``name``.

    ``what`` is one of :data:`SPEC_PROBLEM_KINDS`; ``declared`` / ``expected`` are that property on
    each side: ``dtype`` the wire names (``"FLOAT32"``), ``shape`` lists of ints, ``bounds`` dicts
    ``{"low": [...], "high": [...]}``; ``unexpected`` has the declared shape and ``expected`` None,
    ``missing`` the expected shape and ``declared`` None; ``duplicate`` has how often the name was
    declared (expected 1)."""

    name: str
    what: str
    declared: Any
    expected: Any


def _same_bounds(a: tuple[float, ...], b: tuple[float, ...], size: int) -> bool:
    """Equal bounds: one value stands for every element (the wire contract); floats compared with a
    small tolerance (the wire carries float32); NaN never equals anything."""
    a = a * size if len(a) == 1 and size > 1 else a
    b = b * size if len(b) == 1 and size > 1 else b
    return len(a) == len(b) and all(math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-6) for x, y in zip(a, b))


def spec_problems(declared: Iterable, expected: Iterable) -> list[SpecProblem]:
    """Every difference between ``declared`` and ``expected`` spec lists, compared order-free by name
    (wire ``TensorSpec``, ``SpecModel`` or dicts on either side); empty when they agree.

    Per declared name, in declared order: ``duplicate`` (the name appears more than once: a later
    entry must not hide an earlier one), else ``unexpected`` (not expected), else each of ``dtype``,
    ``shape`` and ``bounds`` (``low``/``high``; compared only when the shapes agree) that differs.
    Then ``missing`` for each expected name not declared, in expected order."""
    dec, exp = [_norm(s) for s in declared], {}
    for s in expected:
        n = _norm(s)
        exp[n.name] = n
    counts = Counter(s.name for s in dec)
    problems: list[SpecProblem] = []
    seen: set[str] = set()
    for d in dec:
        if d.name in seen:
            continue
        seen.add(d.name)
        e = exp.get(d.name)
        if counts[d.name] > 1:
            problems.append(SpecProblem(d.name, "duplicate", counts[d.name], 1))
        elif e is None:
            problems.append(SpecProblem(d.name, "unexpected", list(d.shape), None))
        else:
            if d.dtype != e.dtype:
                problems.append(SpecProblem(d.name, "dtype", dtype_name(d.dtype), dtype_name(e.dtype)))
            if d.shape != e.shape:
                problems.append(SpecProblem(d.name, "shape", list(d.shape), list(e.shape)))
            elif not (_same_bounds(d.low, e.low, math.prod(d.shape)) and _same_bounds(d.high, e.high, math.prod(d.shape))):
                problems.append(SpecProblem(d.name, "bounds", {"low": list(d.low), "high": list(d.high)},
                                            {"low": list(e.low), "high": list(e.high)}))
    problems.extend(SpecProblem(name, "missing", None, list(e.shape)) for name, e in exp.items() if name not in seen)
    return problems


def _short_name(name: str) -> str:
    return name if len(name) <= 40 else f"{name[:40]}..."


def _short_list(values: Sequence, limit: int = 8) -> str:
    values = list(values)
    return str(values) if len(values) <= limit else f"{str(values[:limit])[:-1]}, ... ({len(values)} values)]"


def _capped(value: Any, limit: int = 64) -> Any:
    """A problem's value small enough for an error (lists cut to ``limit`` items)."""
    if isinstance(value, dict):
        return {k: _capped(v, limit) for k, v in value.items()}
    return value[:limit] if isinstance(value, list) else value


def describe_problem(p: SpecProblem) -> str:
    """One line for a :class:`SpecProblem` (names cut to 40 characters, long lists shortened)."""
    name = repr(_short_name(p.name))
    if p.what == "duplicate":
        return f"{name} is declared {p.declared} times"
    if p.what == "unexpected":
        return f"{name} {_short_shape(p.declared)} is not a tensor of the job"
    if p.what == "missing":
        return f"{name} {_short_shape(p.expected)} is missing"
    if p.what == "dtype":
        return f"{name} has dtype {p.declared} but the job expects {p.expected}"
    if p.what == "shape":
        return f"{name} has shape {_short_shape(p.declared)} but the job expects {_short_shape(p.expected)}"
    d, e = p.declared, p.expected
    return (f"{name} has bounds low {_short_list(d['low'])} high {_short_list(d['high'])} but the job expects "
            f"low {_short_list(e['low'])} high {_short_list(e['high'])}")


def describe_specs(specs: Iterable, limit: int = 600) -> str:
    """``name:DTYPE[shape]`` list for messages, at most ``limit`` characters (a hostile spec list
    must not turn an error message into megabytes of status details)."""
    specs = list(specs)
    parts, size = [], 0
    for s in specs:
        if size > limit:  # stop early: a list of 10^5 specs is described by its first few
            break
        n = _norm(s)
        parts.append(f"{n.name[:40]}:{dtype_name(n.dtype)}{_short_shape(n.shape)}")
        size += len(parts[-1]) + 2
    text = ", ".join(parts)
    return text if len(text) <= limit and len(parts) == len(specs) else f"{text[:limit]}... ({len(specs)} specs)"


def _short_shape(shape) -> str:
    dims = [int(d) for d in shape]
    return str(dims) if len(dims) <= MAX_NDIM else f"{dims[:MAX_NDIM]}+{len(dims) - MAX_NDIM} dims"


def _mismatch_text(declared: list, expected: list, problems: list[SpecProblem]) -> str | None:
    if not problems:
        return None
    repeated = sorted(p.name for p in problems if p.what == "duplicate")
    if repeated:
        shown = ", ".join(repr(n[:40]) for n in repeated[:8])
        return f"declared [{describe_specs(declared)}] names [{shown}] more than once"
    return f"declared [{describe_specs(declared)}] but the job expects [{describe_specs(expected)}]"


def specs_mismatch(declared: Iterable, expected: Iterable) -> str | None:
    """None if the two spec lists agree (order-free, bounds included: :func:`spec_problems`), else a
    message naming the whole declared list (and the expected one, or the repeated names).

    A declared list with a repeated name never agrees (the later entry must not hide the earlier one).
    """
    declared, expected = list(declared), list(expected)
    return _mismatch_text(declared, expected, spec_problems(declared, expected))


def check_specs(declared: Iterable, expected: Iterable, field: str) -> None:
    """Refuse ``declared`` unless it agrees with ``expected`` (:func:`spec_problems`).

    Raises :class:`~fleetloop.errors.FailedPrecondition` with ``field`` ``"<field>[<tensor>]"`` of
    the first problem's tensor (name cut to 40 characters) and ``value`` its declared property (the
    shape; the dtype or bounds for such a problem; None for a missing tensor; the count for a
    repeated name). The message names that problem, how many more there are, and the whole declared
    list (at most a few hundred characters, whatever was declared)."""
    declared, expected = list(declared), list(expected)
    problems = spec_problems(declared, expected)
    if not problems:
        return
    first = problems[0]
    more = f" (and {len(problems) - 1} more problem{'s' if len(problems) > 2 else ''})" if len(problems) > 1 else ""
    where = f"{field}[{_short_name(first.name)}]"
    raise FailedPrecondition(f"{where}: {describe_problem(first)}{more}; {_mismatch_text(declared, expected, problems)}",
                             field=where, value=_capped(first.declared))


def decode_map(tensors: Mapping[str, object], specs: Sequence, steps: int, field: str,
               keep_encoded: bool = False) -> dict[str, np.ndarray]:
    """Decode a name->Tensor map, requiring exactly the spec names, each checked against its spec.
    ``keep_encoded``: a PNG/JPEG tensor is checked on its frame headers only and kept as its frames
    (:func:`decode` with ``headers_only``: an object array ``[T, *spec.shape[:-3]]`` of bytes)."""
    names = {s.name for s in specs}
    extra = set(tensors) - names
    if extra:
        name = sorted(extra)[0]
        raise InvalidArgument(f"unknown tensor {name!r}; expected {sorted(names)}", field=f"{field}[{name}]", value=name)
    out = {}
    for spec in specs:
        if spec.name not in tensors:
            raise InvalidArgument(f"missing tensor {spec.name!r}", field=f"{field}[{spec.name}]", value=None)
        tensor = tensors[spec.name]
        if tensor.encoding:  # shape against the spec before any frame is decompressed
            want = [steps, *(int(d) for d in spec.shape)]
            if list(tensor.shape) != want:
                raise InvalidArgument(f"shape {list(tensor.shape)[:MAX_NDIM]} does not match spec {spec.name!r} "
                                      f"[T={steps}, {want[1:]}]", field=f"{field}[{spec.name}].shape",
                                      value=list(tensor.shape)[:MAX_NDIM])
        arr = decode(tensor, f"{field}[{spec.name}]", headers_only=keep_encoded)
        if arr.dtype == object and int(spec.dtype) == image_codec.UINT8:
            out[spec.name] = arr  # frames: the tensor's shape was checked against the spec above
            continue
        check_against_spec(arr, spec, steps, f"{field}[{spec.name}]")
        out[spec.name] = arr
    return out
