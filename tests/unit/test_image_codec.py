"""Compressed image tensors (Tensor.encoding PNG / JPEG): round trips, backward compatibility and every
refusal naming its field (fleetloop.codec + fleetloop.image_codec)."""

import io

import numpy as np
import pytest
from PIL import Image

from fleetloop import image_codec
from fleetloop.codec import decode, decode_map, encode, make_spec
from fleetloop.errors import InvalidArgument
from fleetloop.v1 import fleetloop_pb2 as pb


def _images(shape, seed=0):
    """Smooth gradients plus sensor noise (compressible like camera frames, not like zeros)."""
    rng = np.random.default_rng(seed)
    *lead, h, w, c = shape
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([128 + 80 * np.sin(x / 7 + k) * np.cos(y / 11 - k) for k in range(c)], -1)
    out = base + rng.normal(0, 3, (*lead, h, w, c))
    return np.clip(out, 0, 255).astype(np.uint8)


def _error(fn) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as info:
        fn()
    return info.value


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_png_round_trip_is_lossless(channels):
    arr = _images((2, 3, 16, 24, channels))
    t = encode(arr, encoding="png")
    assert t.encoding == pb.ENCODING_PNG and t.data == b"" and len(t.frames) == 6
    assert list(t.shape) == [2, 3, 16, 24, channels]
    back = decode(t, "obs")
    assert back.dtype == np.uint8 and back.shape == arr.shape and not back.flags.writeable
    np.testing.assert_array_equal(back, arr)


def test_jpeg_round_trip_is_close_and_smaller():
    arr = _images((4, 32, 32, 3))
    t = encode(arr, encoding="jpeg", quality=90)
    assert t.encoding == pb.ENCODING_JPEG and sum(len(f) for f in t.frames) < arr.nbytes
    back = decode(t, "obs")
    assert back.shape == arr.shape
    assert np.abs(back.astype(int) - arr.astype(int)).mean() < 6  # lossy, but close


def test_raw_stays_the_default_and_wire_compatible():
    arr = np.arange(12, dtype=np.float32).reshape(3, 4)
    t = encode(arr)
    assert t.encoding == pb.ENCODING_RAW and not t.frames
    # a sender that predates the field: the same bytes as before (encoding 0 and no frames are not serialised)
    old = pb.Tensor(dtype=1, shape=[3, 4], data=arr.tobytes())
    assert t.SerializeToString() == old.SerializeToString()
    np.testing.assert_array_equal(decode(pb.Tensor.FromString(old.SerializeToString())), arr)


def test_zero_frames_for_zero_steps():
    t = encode(np.zeros((0, 8, 8, 3), np.uint8), encoding="png")
    assert len(t.frames) == 0 and decode(t).shape == (0, 8, 8, 3)


def test_encoding_refusals_name_the_field():
    frames = encode(_images((2, 8, 8, 3)), encoding="png").frames
    cases = {
        "obs.dtype": pb.Tensor(dtype=1, shape=[2, 8, 8, 3], encoding=pb.ENCODING_PNG, frames=frames),
        "obs.data": pb.Tensor(dtype=7, shape=[2, 8, 8, 3], encoding=pb.ENCODING_PNG, frames=frames, data=b"x"),
        "obs.frames": pb.Tensor(dtype=7, shape=[3, 8, 8, 3], encoding=pb.ENCODING_PNG, frames=frames),
        "obs.shape": pb.Tensor(dtype=7, shape=[2, 8, 8, 5], encoding=pb.ENCODING_PNG, frames=frames),
        "obs.encoding": pb.Tensor(dtype=7, shape=[2, 8, 8, 3], encoding=9, frames=frames),
    }
    for field, tensor in cases.items():
        err = _error(lambda: decode(tensor, "obs"))
        assert err.field == field, (field, str(err))
    raw_with_frames = pb.Tensor(dtype=7, shape=[1], data=b"\x01", frames=[b"x"])
    assert _error(lambda: decode(raw_with_frames, "obs")).field == "obs.frames"
    jpeg_rgba = pb.Tensor(dtype=7, shape=[1, 8, 8, 4], encoding=pb.ENCODING_JPEG, frames=[b"x"])
    assert _error(lambda: decode(jpeg_rgba, "obs")).field == "obs.shape"


def test_bad_frames_are_refused_by_index():
    good = encode(_images((1, 8, 8, 3)), encoding="png").frames[0]
    other_size = encode(_images((1, 8, 9, 3)), encoding="png").frames[0]
    gray = encode(_images((1, 8, 8, 1)), encoding="png").frames[0]
    jpeg = encode(_images((1, 8, 8, 3)), encoding="jpeg").frames[0]
    for bad in (b"", b"not an image", good[: len(good) // 2], other_size, gray, jpeg):
        t = pb.Tensor(dtype=7, shape=[2, 8, 8, 3], encoding=pb.ENCODING_PNG, frames=[good, bad])
        err = _error(lambda: decode(t, "observations[cam]"))
        assert err.field == "observations[cam].frames[1]", (bad[:8], str(err))


def test_decompression_bomb_header_is_refused_before_decoding():
    big = io.BytesIO()
    Image.new("L", (4000, 4000)).save(big, "PNG")  # a few KB that claim 16 MB of pixels
    t = pb.Tensor(dtype=7, shape=[1, 8, 8, 1], encoding=pb.ENCODING_PNG, frames=[big.getvalue()])
    err = _error(lambda: decode(t, "obs"))
    assert err.field == "obs.frames[0]" and "4000x4000" in str(err)
    huge = pb.Tensor(dtype=7, shape=[1, 100_000, 100_000, 3], encoding=pb.ENCODING_PNG, frames=[big.getvalue()])
    assert _error(lambda: decode(huge, "obs")).field == "obs.shape"  # past max_decoded_bytes: nothing opened


def test_decode_map_checks_the_spec_before_decoding():
    spec = make_spec("cam", "uint8", [8, 8, 3])
    ok = encode(_images((2, 8, 8, 3)), encoding="jpeg")
    out = decode_map({"cam": ok}, [spec], 2, "observations")
    assert out["cam"].shape == (2, 8, 8, 3)
    bigger = pb.Tensor(dtype=7, shape=[2, 4000, 4000, 3], encoding=pb.ENCODING_PNG, frames=[b"x", b"y"])
    err = _error(lambda: decode_map({"cam": bigger}, [spec], 2, "observations"))
    assert err.field == "observations[cam].shape"


def test_encode_argument_errors():
    arr = _images((1, 8, 8, 3))
    assert _error(lambda: encode(arr, encoding="webp")).field == "encoding"
    assert _error(lambda: encode(arr.astype(np.float32), encoding="png")).field == "dtype"
    assert _error(lambda: encode(arr, encoding="jpeg", quality=0)).field == "quality"
    assert _error(lambda: image_codec.encode_frames(arr, "raw")).field == "encoding"
