"""Where and how the robot learner computes: device choice, host-to-device batches, mixed precision.

Contract:

- :func:`pick_device`: CUDA when requested, or when ``auto`` and a GPU is visible; else CPU.
- :func:`to_device`: a batch on the training device. On CUDA the host tensors are page-locked first
  and copied with ``non_blocking=True`` (the copy overlaps the host work that follows; the first
  kernel that reads them waits for it on the same stream). On CPU the batch is returned as is.
- :func:`precision`: the autocast context of one update. ``"auto"`` = bf16 autocast on CUDA, none
  on CPU; ``"bf16"`` forces it where supported; ``"off"`` never. bf16 needs no loss scaler.
- :func:`prepare_policy`: on CUDA a policy with 2-D convolutions is moved to ``channels_last``
  memory (camera batches arrive as ``[B, H, W, C]``, which permuted to NCHW *is* channels_last).
"""

from __future__ import annotations

import contextlib
from typing import ContextManager

import torch
from torch import nn

from learner.batch import Batch


def pick_device(requested: str) -> torch.device:
    """CUDA when requested or (auto and available), else CPU."""
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def to_device(batch: Batch, device: torch.device) -> Batch:
    """``batch`` on ``device``: pinned + non-blocking copies to CUDA, unchanged on CPU."""
    if device.type != "cuda":
        return batch.to(device)
    return batch.pin_memory().to(device, non_blocking=True)


def precision(device: torch.device, mode: str = "auto") -> ContextManager:
    """The autocast context for one update (see the module docstring)."""
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def prepare_policy(policy: nn.Module, device: torch.device) -> nn.Module:
    """``policy`` on ``device``; channels_last on CUDA when it has a 2-D convolution."""
    policy = policy.to(device)
    if device.type == "cuda" and any(isinstance(m, nn.Conv2d) for m in policy.modules()):
        policy = policy.to(memory_format=torch.channels_last)
    return policy
