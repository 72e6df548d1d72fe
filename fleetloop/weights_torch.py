"""The torch half of :mod:`fleetloop.weights`: state dicts to safetensors bytes, and parsed blobs as
zero-copy ``torch.Tensor`` views. Imported only when torch tensors are asked for, so
``fleetloop.weights`` (and the robot client, :mod:`fleetloop.client`) work without torch installed.
"""

from __future__ import annotations

from typing import Mapping

import torch
from safetensors.torch import save as st_save

from fleetloop.weights import TensorEntry, _bad

#: safetensors dtype names -> torch dtypes (the library's set, as far as this torch has them).
TORCH_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
    "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
}
for _name, _attr in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"), ("F8_E4M3", "float8_e4m3fn"),
                     ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        TORCH_DTYPES[_name] = getattr(torch, _attr)


def state_dict_to_blob(state_dict: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """Serialise a state dict to safetensors bytes (tensors made contiguous, moved to CPU)."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    return st_save(tensors, metadata=metadata)


def tensor_views(buffer: bytearray, entries: list[TensorEntry]) -> dict[str, torch.Tensor]:
    """The tensors ``entries`` (from :func:`fleetloop.weights.parse_header`) as views of ``buffer``;
    empty and misaligned ones are copies. IntegrityError (field ``blob``) for a dtype this torch lacks."""
    out: dict[str, torch.Tensor] = {}
    for e in entries:
        dtype = TORCH_DTYPES.get(e.dtype)
        if dtype is None:
            raise _bad(f"tensor {e.name[:60]!r}: dtype {e.dtype} is unknown to torch {torch.__version__}", len(buffer))
        if e.count == 0:
            out[e.name] = torch.empty(e.shape, dtype=dtype)
        elif e.offset % e.itemsize:
            raw = torch.frombuffer(buffer, dtype=torch.uint8, count=e.count * e.itemsize, offset=e.offset).clone()
            out[e.name] = raw.view(dtype).reshape(e.shape)
        else:
            out[e.name] = torch.frombuffer(buffer, dtype=dtype, count=e.count, offset=e.offset).reshape(e.shape)
    return out
