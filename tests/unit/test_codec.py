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


# -- spec comparison per tensor (issue 19, item 1) ------------------------------------------------
def _pixel_specs(size=84):
    from fleetloop.presets import metaworld_specs
    obs, act = metaworld_specs("pixels", image_size=size)
    return [make_spec(**s) for s in obs], [make_spec(**s) for s in act]


def test_spec_problems_name_each_tensor_order_free():
    from fleetloop.codec import SpecProblem, spec_problems
    obs, _ = _pixel_specs()
    assert spec_problems(obs, list(reversed(obs))) == []
    declared = [make_spec("proprio", "float32", [8]), make_spec("corner3", "uint8", [64, 64, 3]),
                make_spec("wrist", "uint8", [84, 84, 3])]
    assert spec_problems(declared, obs) == [
        SpecProblem("corner3", "shape", [64, 64, 3], [84, 84, 3]),
        SpecProblem("wrist", "unexpected", [84, 84, 3], None),
        SpecProblem("gripperPOV", "missing", None, [84, 84, 3]),
    ]
    wrong_dtype = [make_spec("proprio", "float64", [8]), *obs[1:]]
    assert spec_problems(wrong_dtype, obs) == [SpecProblem("proprio", "dtype", "FLOAT64", "FLOAT32")]
    dup = [obs[0], obs[0], *obs[1:]]
    assert spec_problems(dup, obs) == [SpecProblem("proprio", "duplicate", 2, 1)]


def test_spec_problems_compare_action_bounds():
    from fleetloop.codec import spec_problems
    _, act = _pixel_specs()
    wide = [make_spec("action", "float32", [4], [-2.0] * 4, [2.0] * 4)]
    (p,) = spec_problems(wide, act)
    assert (p.name, p.what) == ("action", "bounds")
    assert p.declared == {"low": [-2.0] * 4, "high": [2.0] * 4} and p.expected == {"low": [-1.0] * 4, "high": [1.0] * 4}
    assert [q.what for q in spec_problems([make_spec("action", "float32", [4])], act)] == ["bounds"]  # unbounded != bounded
    assert spec_problems([make_spec("action", "float32", [4], [-1.0], [1.0])], act) == []  # one value = every element
    assert spec_problems([make_spec("action", "float32", [4], [-1.0 + 1e-9] * 4, [1.0] * 4)], act) == []  # tolerance
    assert specs_mismatch(wide, act) is not None  # bounds count for the old helper too


def test_spec_problems_accept_dicts_and_models():
    from fleetloop.codec import spec_problems
    from fleetloop.presets import metaworld_specs
    from learner.config import SpecModel
    obs, act = metaworld_specs("pixels")
    wire_obs, wire_act = _pixel_specs()
    assert spec_problems(obs, wire_obs) == [] and spec_problems(wire_act, [SpecModel(**s) for s in act]) == []


def test_check_specs_names_the_tensor_and_keeps_the_declared_list():
    from fleetloop.codec import check_specs
    from fleetloop.errors import FailedPrecondition
    obs, _ = _pixel_specs()
    declared = [obs[0], make_spec("corner3", "uint8", [64, 64, 3]), obs[2]]
    with pytest.raises(FailedPrecondition) as info:
        check_specs(declared, obs, "observation_specs")
    assert info.value.field == "observation_specs[corner3]" and info.value.value == [64, 64, 3]
    assert "proprio:FLOAT32[8], corner3:UINT8[64, 64, 3], gripperPOV:UINT8[84, 84, 3]" in str(info.value)
    check_specs(list(reversed(obs)), obs, "observation_specs")  # agrees: returns
    huge = [make_spec("n" * 10_000, "float32", [7] * 5000)]
    with pytest.raises(FailedPrecondition) as info:
        check_specs(huge, obs, "observation_specs")
    assert len(info.value.field) < 80 and len(str(info.value)) < 2000 and len(info.value.value) <= 64
