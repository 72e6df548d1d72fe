"""Compressed image tensors on the wire (``Tensor.encoding`` PNG or JPEG, one encoded image per frame).

Contract (the proto's ``TensorEncoding``): an encoded tensor is uint8 ``[..., H, W, C]`` with C = 1, 3
or 4 (JPEG: 1 or 3); ``frames`` holds one encoded image per ``[H, W, C]`` slice, in row-major order
of the leading dimensions, and ``data`` is empty. Decoding never trusts the sender:

- dtype, layout (C, non-empty H and W), an empty ``data`` and the frame count are checked before any
  image is opened;
- each frame's header (format, width, height, mode) is compared with the declared shape *before* its
  pixels are decoded, so a small file claiming a huge image (a decompression bomb) costs nothing;
- the decoded pixels must fill exactly ``[H, W, C]``.

Every refusal is :class:`~fleetloop.errors.InvalidArgument` naming the field (``<field>.frames[i]``,
``<field>.shape``, ...) and the offending value. Pillow does the image work: it ships with
matplotlib (a core dependency), and its wheels bundle libjpeg-turbo and zlib.
"""

from __future__ import annotations

import io
import math
from typing import Sequence

import numpy as np

from fleetloop.errors import InvalidArgument

#: Wire enum values of ``fleetloop.v1.TensorEncoding`` (kept here so the codec needs no generated code).
RAW, PNG, JPEG = 0, 1, 2
ENCODINGS: dict[str, int] = {"raw": RAW, "png": PNG, "jpeg": JPEG}
NAMES: dict[int, str] = {v: k.upper() for k, v in ENCODINGS.items()}
_FORMATS = {PNG: "PNG", JPEG: "JPEG"}
_CHANNELS = {PNG: (1, 3, 4), JPEG: (1, 3)}
_MODES = {1: "L", 3: "RGB", 4: "RGBA"}
UINT8 = 7  # DType.UINT8


def encoding_code(encoding: str | int) -> int:
    """Wire value of an encoding given by name ('raw', 'png', 'jpeg') or value; InvalidArgument otherwise."""
    if isinstance(encoding, str):
        code = ENCODINGS.get(encoding.lower())
    else:
        code = int(encoding) if int(encoding) in NAMES else None
    if code is None:
        raise InvalidArgument(f"encoding {encoding!r} is not one of {sorted(ENCODINGS)}", field="encoding", value=encoding)
    return code


def check_image_layout(shape: Sequence[int], encoding: int, field: str) -> tuple[int, int, int, int]:
    """(frames, H, W, C) of an encoded tensor of ``shape``; InvalidArgument naming ``field.shape`` unless
    it is ``[..., H, W, C]`` with H, W >= 1 and C allowed for ``encoding``."""
    shape = tuple(int(d) for d in shape)
    if len(shape) < 3:
        raise InvalidArgument(f"{NAMES[encoding]} tensors are [..., H, W, C]; shape {list(shape)} has {len(shape)} "
                              f"dimensions", field=f"{field}.shape", value=list(shape))
    h, w, c = shape[-3:]
    if c not in _CHANNELS[encoding] or h < 1 or w < 1:
        raise InvalidArgument(f"{NAMES[encoding]} images need H, W >= 1 and C in {list(_CHANNELS[encoding])}; "
                              f"shape {list(shape)}", field=f"{field}.shape", value=list(shape))
    return math.prod(shape[:-3]), h, w, c


def encode_frames(array: np.ndarray, encoding: str | int, quality: int = 90, png_level: int = 1) -> list[bytes]:
    """One encoded image per ``[H, W, C]`` slice of a uint8 ``array`` (row-major order of the leading
    dimensions). ``quality``: JPEG 1..95; ``png_level``: zlib level 0..9 (1: fast, most of the gain)."""
    from PIL import Image

    code = encoding_code(encoding)
    if code == RAW:
        raise InvalidArgument("encode_frames needs an image encoding ('png' or 'jpeg'), not 'raw'", field="encoding",
                              value="raw")
    arr = np.ascontiguousarray(array)
    if arr.dtype != np.uint8:
        raise InvalidArgument(f"{NAMES[code]} encodes uint8 images, got {arr.dtype}", field="dtype", value=str(arr.dtype))
    if not 1 <= int(quality) <= 95:
        raise InvalidArgument(f"quality {quality} must be in 1..95", field="quality", value=quality)
    if not 0 <= int(png_level) <= 9:
        raise InvalidArgument(f"png_level {png_level} must be in 0..9", field="png_level", value=png_level)
    n, h, w, c = check_image_layout(arr.shape, code, "array")
    flat = arr.reshape(n, h, w, c)
    opts = {"quality": int(quality)} if code == JPEG else {"compress_level": int(png_level)}
    out = []
    for img in flat:
        buf = io.BytesIO()
        Image.fromarray(img[:, :, 0] if c == 1 else img, _MODES[c]).save(buf, _FORMATS[code], **opts)
        out.append(buf.getvalue())
    return out


def decode_frames(frames: Sequence[bytes], shape: Sequence[int], encoding: int, field: str) -> np.ndarray:
    """Decode the ``frames`` of an encoded tensor of ``shape`` into a read-only uint8 array of that shape;
    see the module docstring for every check. ``shape`` must already have passed the layout-size check
    (:func:`fleetloop.codec.check_shape`)."""
    from PIL import Image

    if encoding not in _FORMATS:
        raise InvalidArgument(f"encoding {encoding} is not an image encoding ({sorted(NAMES[c] for c in _FORMATS)})",
                              field=f"{field}.encoding", value=encoding)
    n, h, w, c = check_image_layout(shape, encoding, field)
    if len(frames) != n:
        raise InvalidArgument(f"{len(frames)} frames for shape {[int(d) for d in shape]} (needs {n}: one per [H, W, C] "
                              f"image)", field=f"{field}.frames", value=len(frames))
    fmt, mode = _FORMATS[encoding], _MODES[c]
    out = np.empty((n, h, w, c), dtype=np.uint8)
    for i, blob in enumerate(frames):
        name = f"{field}.frames[{i}]"
        try:
            img = Image.open(io.BytesIO(blob), formats=(fmt,))  # header only: nothing decoded yet
        except Exception as exc:  # UnidentifiedImageError, truncated header, ...
            raise InvalidArgument(f"{len(blob)} bytes are not a {fmt} image: {type(exc).__name__}: {exc}"[:300],
                                  field=name, value=len(blob)) from None
        if img.size != (w, h) or img.mode != mode:
            raise InvalidArgument(f"{fmt} image is {img.size[0]}x{img.size[1]} {img.mode}; the tensor says {w}x{h} {mode}",
                                  field=name, value=[img.size[1], img.size[0], img.mode])
        try:
            pixels = np.asarray(img)  # decodes (Pillow releases the GIL while it does)
        except Exception as exc:  # truncated or corrupt image data
            raise InvalidArgument(f"{fmt} image data does not decode: {type(exc).__name__}: {exc}"[:300], field=name,
                                  value=len(blob)) from None
        if pixels.dtype != np.uint8 or pixels.size != h * w * c:
            raise InvalidArgument(f"{fmt} image decodes to {pixels.dtype} {list(pixels.shape)}, not uint8 [{h}, {w}, {c}]",
                                  field=name, value=list(pixels.shape))
        out[i] = pixels.reshape(h, w, c)
    result = out.reshape(tuple(int(d) for d in shape))
    result.flags.writeable = False
    return result
