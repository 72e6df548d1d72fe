"""The streaming, zero-copy weight path (fleetloop.weights.BlobAssembler / verified_views /
tensors_from_safetensors): same tensors as the safetensors library, same refusals, no copy."""

import hashlib
import json
import struct

import pytest
import torch
from safetensors.torch import load as st_load

from fleetloop.errors import IntegrityError
from fleetloop.weights import BlobAssembler, state_dict_to_blob, tensors_from_safetensors, verified_views


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(5, 7, generator=g), "b": torch.randn(7, generator=g).to(torch.float64),
            "h": torch.randn(3, 3, generator=g).to(torch.bfloat16), "i": torch.arange(-5, 6, dtype=torch.int64),
            "m": torch.tensor([True, False, True]), "u": torch.arange(9, dtype=torch.uint8).reshape(3, 3),
            "s": torch.tensor(2.5), "e": torch.empty(0, 4), "f16": torch.randn(4, generator=g).half(),
            "i8": torch.tensor([-3, 4], dtype=torch.int8)}


def _assembled(blob: bytes, piece: int = 13) -> BlobAssembler:
    sink = BlobAssembler()
    for off in range(0, len(blob), piece):
        sink.append(blob[off:off + piece])
    return sink


def test_views_equal_the_library_and_share_the_buffer():
    blob = state_dict_to_blob(_state(), metadata={"step": "3"})
    sink = _assembled(blob)
    assert bytes(sink.buffer) == blob and sink.hexdigest() == hashlib.sha256(blob).hexdigest()
    ours, ref = verified_views(sink, hashlib.sha256(blob).hexdigest()), st_load(blob)
    assert set(ours) == set(ref)
    for k, v in ref.items():
        assert ours[k].dtype == v.dtype and ours[k].shape == v.shape and torch.equal(ours[k], v), k
    base = sink.buffer
    addr = torch.frombuffer(base, dtype=torch.uint8).data_ptr()
    assert addr <= ours["w"].data_ptr() < addr + len(base)  # a view, not a copy
    with pytest.raises(ValueError, match="closed"):
        sink.append(b"x")  # the buffer backs tensors: it must never grow (move) under them
    expected = ref["w"].clone()
    del sink, base, ref
    _junk = [bytearray(64) for _ in range(1000)]
    assert torch.equal(ours["w"], expected)  # the tensors keep the buffer alive


def test_digest_mismatch_loads_nothing():
    blob = state_dict_to_blob(_state())
    tampered = bytearray(blob)
    tampered[-1] ^= 1
    with pytest.raises(IntegrityError) as info:
        verified_views(_assembled(bytes(tampered)), hashlib.sha256(blob).hexdigest())
    assert info.value.field == "sha256"


def _blob(header: dict, data: bytes, pad: bool = True) -> bytearray:
    raw = json.dumps(header).encode()
    if pad:
        raw += b" " * (-len(raw) % 8)
    return bytearray(struct.pack("<Q", len(raw)) + raw + data)


@pytest.mark.parametrize("buf, what", [
    (bytearray(b"\x01\x02"), "shorter than"),
    (bytearray(struct.pack("<Q", 2 ** 62) + b"{}"), "header length"),
    (bytearray(struct.pack("<Q", 4) + b"\xff\xfe{}"), "not UTF-8 JSON"),
    (_blob([1, 2], b""), "not an object"),
    (_blob({"w": {"dtype": "F32", "shape": [4]}}, bytes(16)), "exactly dtype, shape, data_offsets"),
    (_blob({"w": {"dtype": "Q9", "shape": [4], "data_offsets": [0, 16]}}, bytes(16)), "unknown dtype"),
    (_blob({"w": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}}, bytes(16)), "non-negative"),
    (_blob({"w": {"dtype": "F32", "shape": [4], "data_offsets": [16, 0]}}, bytes(16)), "begin <= end"),
    (_blob({"w": {"dtype": "F32", "shape": [10 ** 6, 10 ** 6], "data_offsets": [0, 16]}}, bytes(16)), "needs"),
    (_blob({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, bytes(20)), "cover 16 of the 20"),
    (_blob({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, bytes(8)), "cover 16 of the 8"),
    (_blob({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, bytes(12)), "gap or overlap"),
    (_blob({"__metadata__": {"k": 3}}, b""), "__metadata__"),
])
def test_invalid_safetensors_refused_naming_the_problem(buf, what):
    with pytest.raises(IntegrityError, match=what) as info:
        tensors_from_safetensors(buf)
    assert info.value.field == "blob"


def test_misaligned_tensor_is_copied_correctly():
    values = torch.tensor([1.5, -2.0, 3.25], dtype=torch.float32)
    buf = _blob({"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
                 "w": {"dtype": "F32", "shape": [3], "data_offsets": [1, 13]}}, b"\x07" + values.numpy().tobytes())
    out = tensors_from_safetensors(buf)
    assert out["a"].tolist() == [7] and torch.equal(out["w"], values)
