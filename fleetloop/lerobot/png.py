"""PNG bytes of one uint8 ``[H, W, C]`` frame (C in 1, 3, 4) and back, with PyAV's PNG codec.

This is how an ``image`` feature is stored in a LeRobot data parquet (the ``bytes`` of the Hugging Face
``Image`` struct). PNG is lossless: :func:`decode_png` returns exactly what :func:`encode_png` got.
:func:`decode_png` checks the decoded size against the expected shape and raises InvalidArgument
naming ``field`` otherwise.
"""

from __future__ import annotations

import numpy as np

from fleetloop.errors import InvalidArgument

_FORMATS = {1: "gray", 3: "rgb24", 4: "rgba"}


def encode_png(frame: np.ndarray) -> bytes:
    """One uint8 ``[H, W, C]`` frame as PNG bytes."""
    import av

    h, w, c = frame.shape
    fmt = _FORMATS[c]
    ctx = av.CodecContext.create("png", "w")
    ctx.width, ctx.height, ctx.pix_fmt = w, h, fmt
    src = np.ascontiguousarray(frame[:, :, 0] if c == 1 else frame, dtype=np.uint8)
    packets = ctx.encode(av.VideoFrame.from_ndarray(src, format=fmt)) + ctx.encode(None)
    return b"".join(bytes(p) for p in packets)


def decode_png(data: bytes, shape: tuple[int, ...], field: str = "image") -> np.ndarray:
    """The uint8 ``shape`` = ``(H, W, C)`` frame of PNG ``data``; InvalidArgument naming ``field`` when
    the bytes are no PNG of that size."""
    import av

    h, w, c = shape
    try:
        ctx = av.CodecContext.create("png", "r")
        frames = ctx.decode(av.Packet(data)) + ctx.decode(None)
        arr = frames[0].to_ndarray(format=_FORMATS[c])
    except (av.FFmpegError, IndexError, KeyError) as exc:
        raise InvalidArgument(f"{field} is not a decodable PNG ({exc})", field=field, value=len(data or b"")) from None
    arr = arr[..., None] if c == 1 else arr
    if arr.shape != (h, w, c):
        raise InvalidArgument(f"{field} decodes to {list(arr.shape)}, the feature is {list(shape)}", field=field,
                              value=list(arr.shape))
    return arr
