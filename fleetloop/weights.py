"""Weights as content-addressed safetensors blobs.

Contract: a policy's weights travel and rest as one safetensors blob (no pickle, no torch.save);
its identity is the sha256 hex digest of those exact bytes. Nothing loads a blob whose digest it
did not verify: :func:`load_verified` is the only way in.
"""

from __future__ import annotations

import hashlib

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fleetloop.errors import IntegrityError


def sha256_hex(blob: bytes | memoryview) -> str:
    """Hex sha256 of ``blob``."""
    return hashlib.sha256(blob).hexdigest()


def state_dict_to_blob(state_dict: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """Serialise a state dict to safetensors bytes (tensors made contiguous, moved to CPU)."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    return st_save(tensors, metadata=metadata)


def load_verified(blob: bytes, expected_sha256: str) -> dict[str, torch.Tensor]:
    """Verify ``blob`` against ``expected_sha256`` and return its tensors.

    Raises IntegrityError (and loads nothing) when the digest differs.
    """
    actual = sha256_hex(blob)
    if actual != expected_sha256:
        raise IntegrityError(
            f"weights digest mismatch: expected {expected_sha256[:16]}..., got {actual[:16]}... ({len(blob)} bytes)",
            field="sha256",
            value=actual,
        )
    return st_load(bytes(blob))
