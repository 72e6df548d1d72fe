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

Header-only checks (:func:`check_frames`, for a receiver that keeps the frames compressed and decodes
them later): the same checks up to the pixels, without decoding any: format, width, height and mode
from the header (JPEG: simplejpeg's header reader when it is installed, else Pillow's; PNG: the IHDR
chunk, 8-bit L / RGB / RGBA), plus the end marker (JPEG ``FF D9``, PNG ``IEND``), which catches a
truncated frame. A frame whose *body* is corrupt passes them; it fails when decoded
(:func:`decode_frame_into`, simplejpeg for JPEG when chosen, else Pillow).
"""

from __future__ import annotations

import io
import math
import struct
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


def _frames_layout(frames: Sequence[bytes], shape: Sequence[int], encoding: int, field: str) -> tuple[int, int, int, int]:
    """(frames, H, W, C) once the encoding is an image one, the layout allowed and the frame count
    right (the checks :func:`decode_frames` and :func:`check_frames` share, before any frame is read)."""
    if encoding not in _FORMATS:
        raise InvalidArgument(f"encoding {encoding} is not an image encoding ({sorted(NAMES[c] for c in _FORMATS)})",
                              field=f"{field}.encoding", value=encoding)
    n, h, w, c = check_image_layout(shape, encoding, field)
    if len(frames) != n:
        raise InvalidArgument(f"{len(frames)} frames for shape {[int(d) for d in shape]} (needs {n}: one per [H, W, C] "
                              f"image)", field=f"{field}.frames", value=len(frames))
    return n, h, w, c


def decode_frames(frames: Sequence[bytes], shape: Sequence[int], encoding: int, field: str) -> np.ndarray:
    """Decode the ``frames`` of an encoded tensor of ``shape`` into a read-only uint8 array of that shape;
    see the module docstring for every check. ``shape`` must already have passed the layout-size check
    (:func:`fleetloop.codec.check_shape`)."""
    from PIL import Image

    n, h, w, c = _frames_layout(frames, shape, encoding, field)
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


# -- header-only checks and batch-time decoding (frames kept compressed until they are trained on) ---
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"
_PNG_MODES = {0: "L", 2: "RGB", 6: "RGBA", 3: "P", 4: "LA"}
_SJ_MODES = {"Gray": "L", "YCbCr": "RGB", "RGB": "RGB", "CMYK": "CMYK", "YCCK": "CMYK"}
DECODERS = ("auto", "pillow", "simplejpeg")
_simplejpeg: object = None  # the module once imported; False: not installed


def simplejpeg_module():
    """The ``simplejpeg`` module, or None when it is not installed (``pip install fleetloop[images]``)."""
    global _simplejpeg
    if _simplejpeg is None:
        try:
            import simplejpeg
            _simplejpeg = simplejpeg
        except ImportError:
            _simplejpeg = False
    return _simplejpeg or None


def resolve_decoder(name: str = "auto") -> str:
    """'pillow' or 'simplejpeg' for a decoder setting ('auto': simplejpeg when installed, else Pillow);
    InvalidArgument naming ``decoder`` for an unknown name or simplejpeg asked for but not installed."""
    if name not in DECODERS:
        raise InvalidArgument(f"decoder {name!r} is not one of {list(DECODERS)}", field="decoder", value=name)
    if name == "auto":
        return "simplejpeg" if simplejpeg_module() is not None else "pillow"
    if name == "simplejpeg" and simplejpeg_module() is None:
        raise InvalidArgument("decoder 'simplejpeg' is not installed (pip install 'fleetloop[images]' or simplejpeg)",
                              field="decoder", value=name)
    return name


def frame_header(blob: bytes, encoding: int) -> tuple[int, int, str]:
    """(width, height, mode) of one encoded frame from its header alone, and its end marker checked;
    ValueError saying what is wrong. Mode as Pillow names it ('L', 'RGB', 'RGBA'; anything else for a
    frame no image tensor accepts)."""
    if encoding == PNG:
        if len(blob) < 33 or not blob.startswith(_PNG_SIGNATURE) or blob[12:16] != b"IHDR":
            raise ValueError("no PNG signature and IHDR chunk")
        w, h, depth, ctype = struct.unpack(">IIBB", blob[16:26])
        if not blob.endswith(_PNG_END):
            raise ValueError("no IEND chunk at the end (truncated?)")
        mode = _PNG_MODES.get(ctype, f"type{ctype}")
        return w, h, mode if depth == 8 else f"{mode};{depth}"
    if not blob.startswith(b"\xff\xd8"):
        raise ValueError("no JPEG start-of-image marker")
    sj = simplejpeg_module()
    if sj is not None:
        h, w, space, _sub = sj.decode_jpeg_header(blob)
        size, mode = (w, h), _SJ_MODES.get(space, space)
    else:
        from PIL import Image

        img = Image.open(io.BytesIO(blob), formats=("JPEG",))
        size, mode = img.size, img.mode
    if not blob.endswith(b"\xff\xd9"):
        raise ValueError("no end-of-image marker FF D9 at the end (truncated?)")
    return size[0], size[1], mode


def check_frames(frames: Sequence[bytes], shape: Sequence[int], encoding: int, field: str) -> None:
    """Header-only counterpart of :func:`decode_frames`: the layout, the frame count and every frame's
    format, size, mode and end marker (:func:`frame_header`), no pixel decoded; the same refusals
    (InvalidArgument naming ``<field>.frames[i]`` / ``.frames`` / ``.shape`` and the value)."""
    n, h, w, c = _frames_layout(frames, shape, encoding, field)
    fmt, mode = _FORMATS[encoding], _MODES[c]
    for i, blob in enumerate(frames):
        try:
            fw, fh, fmode = frame_header(blob, encoding)
        except Exception as exc:  # ValueError, UnidentifiedImageError, struct.error, ...
            raise InvalidArgument(f"{len(blob)} bytes are not a {fmt} image: {type(exc).__name__}: {exc}"[:300],
                                  field=f"{field}.frames[{i}]", value=len(blob)) from None
        if (fw, fh) != (w, h) or fmode != mode:
            raise InvalidArgument(f"{fmt} image is {fw}x{fh} {fmode} (H, W, mode {[fh, fw, fmode]}); the tensor says "
                                  f"{w}x{h} {mode}", field=f"{field}.frames[{i}]", value=[fh, fw, fmode])


def decode_frame_into(blob: bytes, out: np.ndarray, encoding: int, decoder: str = "pillow") -> None:
    """Decode one encoded frame into ``out`` (a writable, C-contiguous uint8 ``[H, W, C]`` view);
    ValueError (or the decoder's own error) when it does not decode to exactly that. ``decoder``:
    'simplejpeg' (JPEG only; PNG always goes through Pillow) or 'pillow'. Both release the GIL."""
    h, w, c = out.shape
    if encoding == JPEG and decoder == "simplejpeg" and simplejpeg_module() is not None:
        got = _simplejpeg.decode_jpeg(blob, colorspace="GRAY" if c == 1 else "RGB", buffer=out)
        if got.shape != out.shape:  # decoded into the start of ``out``'s buffer: the whole of it when the shapes agree
            raise ValueError(f"JPEG decodes to {list(got.shape)}, not [{h}, {w}, {c}]")
        return
    from PIL import Image

    img = Image.open(io.BytesIO(blob), formats=(_FORMATS[encoding],))
    if img.size != (w, h) or img.mode != _MODES[c]:
        raise ValueError(f"image is {img.size[0]}x{img.size[1]} {img.mode}, not {w}x{h} {_MODES[c]}")
    out[...] = np.asarray(img).reshape(h, w, c)
