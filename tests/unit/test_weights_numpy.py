"""Weights as numpy arrays (issue 20: the robot client without torch): the numpy format of
:mod:`fleetloop.weights` gives the same values as the torch one for every safetensors dtype (views of
the received buffer; bfloat16 / float8 widened exactly to float32) and the same refusals; with torch
installed "auto" stays torch. The client importing and decoding with torch unimportable is
tests/integration/test_client_without_torch.py (a subprocess: the unit tier starts none)."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from fleetloop.client.weight_client import VerifiedWeights, WeightClient
from fleetloop.errors import IntegrityError, InvalidArgument
from fleetloop.weights import (BlobAssembler, arrays_to_blob, load_verified, resolve_format, state_dict_to_blob,
                               tensors_from_safetensors, verified_views)


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"net.0.weight": torch.randn(5, 7, generator=g), "net.0.bias": torch.randn(5, generator=g).double(),
            "h": torch.randn(3, 3, generator=g).to(torch.bfloat16), "i": torch.arange(-5, 6, dtype=torch.int64),
            "m": torch.tensor([True, False, True]), "u": torch.arange(9, dtype=torch.uint8).reshape(3, 3),
            "s": torch.tensor(2.5), "e": torch.empty(0, 4), "f16": torch.randn(4, generator=g).half(),
            "u16": torch.arange(4, dtype=torch.int32).to(torch.uint16), "f8a": torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn),
            "f8b": torch.arange(256, dtype=torch.uint8).view(torch.float8_e5m2), "eb": torch.empty(0, dtype=torch.bfloat16)}


def _assembled(blob: bytes) -> BlobAssembler:
    sink = BlobAssembler()
    for off in range(0, len(blob), 97):
        sink.append(blob[off:off + 97])
    return sink


def _as_float_numpy(t: torch.Tensor) -> np.ndarray:
    return (t.float() if t.dtype in (torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2) else t).numpy()


def test_numpy_views_equal_torch_for_every_dtype():
    blob = state_dict_to_blob(_state())
    sha = hashlib.sha256(blob).hexdigest()
    ref = verified_views(_assembled(blob), sha)
    sink = _assembled(blob)
    arrays = verified_views(sink, sha, "numpy")
    assert set(arrays) == set(ref)
    for name, t in ref.items():
        want = _as_float_numpy(t)
        got = arrays[name]
        assert isinstance(got, np.ndarray) and got.shape == want.shape and got.dtype == want.dtype, name
        np.testing.assert_array_equal(got, want, err_msg=name)  # NaNs compare equal here, infinities too
    base = np.frombuffer(sink.buffer, np.uint8)
    lo, hi = base.ctypes.data, base.ctypes.data + base.nbytes
    assert lo <= arrays["net.0.weight"].ctypes.data < hi  # a view of the received buffer, not a copy
    assert {k: v.dtype for k, v in load_verified(blob, sha, "numpy").items()} == {k: v.dtype for k, v in arrays.items()}


def test_numpy_path_refuses_what_the_torch_path_refuses():
    blob = bytearray(state_dict_to_blob(_state()))
    with pytest.raises(IntegrityError) as info:
        load_verified(bytes(blob), "0" * 64, "numpy")
    assert info.value.field == "sha256"
    blob[8:10] = b"[]"  # the header is no JSON object any more
    with pytest.raises(IntegrityError) as info:
        tensors_from_safetensors(blob, "numpy")
    assert info.value.field == "blob"


def test_formats_resolve_and_verified_weights_convert():
    assert resolve_format("auto") == "torch" and resolve_format("numpy") == "numpy"
    with pytest.raises(InvalidArgument):
        resolve_format("jax")
    with pytest.raises(InvalidArgument):
        WeightClient(None, "j", "a", (), tensor_format="tf")
    assert WeightClient(None, "j", "a", ()).tensor_format == "torch"
    state = _state()
    arrays = VerifiedWeights(1, "x", state, 0, 0.0, 0.0).arrays()
    assert arrays["h"].dtype == np.float32 and arrays["i"].dtype == np.int64
    np.testing.assert_array_equal(arrays["net.0.weight"], state["net.0.weight"].numpy())
    blob = arrays_to_blob({"w": np.arange(6, dtype=">f4").reshape(2, 3)})  # big-endian in: stored little-endian
    np.testing.assert_array_equal(load_verified(blob, hashlib.sha256(blob).hexdigest(), "numpy")["w"],
                                  np.arange(6, dtype=np.float32).reshape(2, 3))
