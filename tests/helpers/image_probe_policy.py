"""A policy plug-in that proves camera bytes reach the learner's forward pass (integration tests).

Name it in a job as ``policy_factory: tests.helpers.image_probe_policy:image_probe_policy`` with
``policy_kwargs: {camera: <name>, record_to: <path>}`` (camera default: the job's first image tensor;
``record_to`` optional).

- Its action depends ONLY on that camera: ``tanh(Linear(GAIN * (mean pixel per channel / 255 - 0.5)))``
  (weights start near zero, the bias at zero, both learnable), so it quickly fits an action that is a
  function of that camera's brightness, and ignores state, task and cond.
- In ``train()`` mode every forward call appends, per sample, :func:`image_digest` of the image it
  received (uint8 ``[H, W, C]`` bytes exactly as the learner decoded them) to :attr:`ImageProbePolicy.seen`,
  which keeps the last :data:`KEEP` digests, and, with ``record_to``, appends them to that file, one
  per line (the learner runs in another process, e.g. a Ray worker: the test reads the file).
  ``calls`` counts the training forward calls. In ``eval()`` mode (robots, evaluation) nothing is
  recorded.

A test computes :func:`image_digest` of the frames it sent (decoded the same way: for JPEG, the
learner's decode of the bytes sent, not the raw camera frame) and checks they appear in ``seen``.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from torch import nn

from fleetloop.errors import InvalidArgument
from fleetloop.policies import policy_factory
from fleetloop.specs import PolicySpec

KEEP = 10_000
GAIN = 8.0  # brightness feature in about [-4, 4]: Adam at lr 1e-3 fits it in ~100 steps


def image_digest(image) -> str:
    """sha256 hex of one image's bytes (uint8 ``[H, W, C]``, numpy array or CPU/GPU tensor), C order."""
    if isinstance(image, torch.Tensor):
        image = image.detach().to("cpu").numpy()
    return hashlib.sha256(np.ascontiguousarray(image, dtype=np.uint8).tobytes()).hexdigest()


class ImageProbePolicy(nn.Module):
    """``forward(obs, task, cond=None)``: ``tanh(linear(GAIN * (mean(obs[camera]) / 255 - 0.5)))`` ``[B, act_dim]``."""

    conditioned = False

    def __init__(self, camera: str, channels: int, act_dim: int, record_to: str | None = None) -> None:
        super().__init__()
        self.camera, self.record_to = camera, record_to
        self.linear = nn.Linear(channels, act_dim)
        nn.init.normal_(self.linear.weight, std=0.01)
        nn.init.zeros_(self.linear.bias)
        self.seen: list[str] = []
        self.calls = 0

    def forward(self, obs, task: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        img = obs[self.camera]
        if self.training:
            self.calls += 1
            digests = [image_digest(img[i]) for i in range(img.shape[0])]
            self.seen.extend(digests)
            if self.record_to:
                with open(self.record_to, "a") as f:
                    f.write("".join(d + "\n" for d in digests))
            if len(self.seen) > KEEP:
                del self.seen[:len(self.seen) - KEEP]
        feature = GAIN * (img.float().mean(dim=(1, 2)) / 255.0 - 0.5)  # [B, C]
        return torch.tanh(self.linear(feature))


@policy_factory
def image_probe_policy(spec: PolicySpec, camera: str | None = None, record_to: str | None = None) -> ImageProbePolicy:
    """Build the probe on ``camera`` (default: the job's first image tensor), appending the digests
    it sees while training to the file ``record_to`` when given."""
    names = [o.name for o in spec.images]
    if not names:
        raise InvalidArgument("image_probe_policy needs an image tensor; the job declares none",
                              field="policy_kwargs.camera", value=camera)
    camera = names[0] if camera is None else camera
    if camera not in names:
        raise InvalidArgument(f"camera {camera!r} is not an image tensor of the job; its image tensors are {names}",
                              field="policy_kwargs.camera", value=camera)
    return ImageProbePolicy(camera, spec.observation(camera).shape[2], spec.act_dim,
                            None if record_to is None else str(record_to))
