"""Codec: tensors round-trip exactly; malformed tensors are refused with the field named."""

import numpy as np
import pytest

from fleetloop.codec import check_against_spec, decode, encode, make_spec, specs_mismatch
from fleetloop.errors import InvalidArgument
from fleetloop.v1 import fleetloop_pb2 as pb


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "int64", "int32", "uint8", "bool"])
def test_round_trip(dtype):
    arr = (np.arange(24).reshape(2, 3, 4) % 2).astype(dtype)
    out = decode(pb.Tensor.FromString(encode(arr).SerializeToString()))
    assert out.dtype == arr.dtype and out.shape == arr.shape
    np.testing.assert_array_equal(out, arr)


def test_big_endian_input_is_normalised():
    arr = np.arange(5, dtype=">f4")
    np.testing.assert_array_equal(decode(encode(arr)), arr.astype("<f4"))


def test_size_mismatch_names_field():
    t = encode(np.zeros((3, 4), np.float32))
    t.data = t.data[:-4]
    with pytest.raises(InvalidArgument, match=r"observations\[state\]\.data"):
        decode(t, "observations[state]")


def test_unknown_dtype_refused():
    t = pb.Tensor(dtype=99, shape=[1], data=b"\0")
    with pytest.raises(InvalidArgument, match="dtype"):
        decode(t, "rewards")


def test_spec_checks_shape_dtype_and_nan():
    spec = make_spec("state", "float32", [39])
    check_against_spec(np.zeros((5, 39), np.float32), spec, 5, "observations[state]")
    with pytest.raises(InvalidArgument, match=r"shape \[5, 38\]"):
        check_against_spec(np.zeros((5, 38), np.float32), spec, 5, "observations[state]")
    with pytest.raises(InvalidArgument, match="dtype"):
        check_against_spec(np.zeros((5, 39), np.float64), spec, 5, "observations[state]")
    bad = np.zeros((5, 39), np.float32)
    bad[2, 7] = np.nan
    with pytest.raises(InvalidArgument, match=r"non-finite value nan at index \[2, 7\]"):
        check_against_spec(bad, spec, 5, "observations[state]")


def test_specs_mismatch_message():
    a = [make_spec("state", "float32", [39])]
    b = [make_spec("state", "float32", [40])]
    assert specs_mismatch(a, a) is None
    assert "[39]" in specs_mismatch(a, b) and "[40]" in specs_mismatch(a, b)
