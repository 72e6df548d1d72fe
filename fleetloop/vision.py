"""The built-in visuomotor policy: cameras + proprioception + task -> action (contract: docs/POLICIES.md).

Name it in a job as ``policy_factory: fleetloop.vision:visuomotor_policy`` with ``policy_kwargs`` as in
:func:`visuomotor_policy`. Architecture:

- one encoder per camera (image tensor of the job, or the ``cameras`` subset), each ending in
  Linear(feature_dim), LayerNorm, tanh (DrQ). ``encoder="drq"``: conv 3x3/32 with strides 2, 2, 2, 1
  and ReLUs (84 px: 84 -> 41 -> 20 -> 9 -> 7; a layer whose input side is under 3 pixels gets padding 1,
  so 16 px images work too). ``encoder="resnet18"``: torchvision's ResNet-18 layout in plain torch
  (same state-dict names, no ``fc``), random init or a local safetensors file; meant for GPUs (about
  40x the MACs of ``drq`` at 84 px);
- images arrive uint8 ``[B, H, W, C]``; while ``training`` each one is randomly shifted by up to
  ``shift_pad`` pixels per sample (replicate padding, integer crop: done as one index gather on the
  uint8 tensor); then ``x / 255 - 0.5`` (ImageNet mean/std for 3-channel resnet18) and
  ``permute(0, 3, 1, 2)``, which is channels_last memory as it stands;
- the vector tensors (:func:`fleetloop.specs.flatten_vectors`) through Linear(64) + ReLU (none when
  the job has no vector tensor), a learned task embedding (16), RECAP's indicator embedding
  (``cond_dim``, 3 tokens) when ``conditioned``, then an MLP head (``hidden``) with a tanh output.

:meth:`VisuomotorPolicy.value_encoder` gives RECAP's value network a fresh encoder of the same
architecture (cameras + vectors, no task), with its own weights.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from fleetloop.errors import InvalidArgument
from fleetloop.policies import policy_factory
from fleetloop.specs import PolicySpec, TensorInfo, flatten_vectors

ENCODERS = ("drq", "resnet18")
PROPRIO_DIM = 64
TASK_DIM = 16
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def random_shift(img: torch.Tensor, pad: int) -> torch.Tensor:
    """Each image of ``img`` (``[B, H, W, C]``, contiguous, any dtype) shifted by its own random integer
    offset in ``[-pad, pad]`` per axis, edges replicated: the same as padding ``pad`` pixels (replicate)
    and cropping ``H x W`` at a random corner. Done as one ``index_select`` of whole pixels with
    clamped indices, on the uint8 tensor (no padded copy; cheaper than ``grid_sample``)."""
    if pad <= 0:
        return img
    b, h, w, c = img.shape
    dev = img.device
    rows = (torch.arange(h, device=dev) + torch.randint(-pad, pad + 1, (b, 1), device=dev)).clamp_(0, h - 1)
    cols = (torch.arange(w, device=dev) + torch.randint(-pad, pad + 1, (b, 1), device=dev)).clamp_(0, w - 1)
    base = torch.arange(b, device=dev).mul_(h).view(b, 1, 1)
    index = ((base + rows[:, :, None]) * w + cols[:, None, :]).reshape(-1)
    return img.reshape(b * h * w, c).index_select(0, index).view(b, h, w, c)


class _Block(nn.Module):
    """ResNet basic block (torchvision names: conv1, bn1, conv2, bn2, downsample.0/1)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                           if stride != 1 or cin != cout else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = x if self.downsample is None else self.downsample(x)
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + skip)


class ResNet18(nn.Module):
    """ResNet-18 without its classifier: ``[B, C, H, W]`` -> ``[B, 512]`` (global average pool).
    Parameter names are torchvision's, so its weights (saved as safetensors) load as they are."""

    def __init__(self, channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        cin = 64
        for i, width in enumerate((64, 128, 256, 512)):
            setattr(self, f"layer{i + 1}", nn.Sequential(_Block(cin, width, 1 if i == 0 else 2), _Block(width, width, 1)))
            cin = width
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


def drq_stack(channels: int, height: int, width: int) -> nn.Sequential:
    """The strided DrQ stack: conv 3x3/32, strides 2, 2, 2, 1, ReLU after each. A layer whose input
    side is under 3 pixels gets padding 1 on that side (so small images still fit)."""
    layers: list[nn.Module] = []
    cin, h, w = channels, height, width
    for stride in (2, 2, 2, 1):
        ph, pw = int(h < 3), int(w < 3)
        layers += [nn.Conv2d(cin, 32, 3, stride, (ph, pw)), nn.ReLU()]
        h, w, cin = (h + 2 * ph - 3) // stride + 1, (w + 2 * pw - 3) // stride + 1, 32
    return nn.Sequential(*layers)


def load_encoder_weights(module: nn.Module, path: str, sha256: str | None = None) -> None:
    """Load a local safetensors file into ``module`` strictly (every key, every shape; torchvision's
    ``fc.*`` classifier keys are dropped first). Never downloads. With ``sha256`` the file's digest
    must match. InvalidArgument naming ``policy_kwargs.encoder_weights`` otherwise."""
    from safetensors.torch import load as st_load

    from fleetloop.weights import sha256_hex

    field = "policy_kwargs.encoder_weights"
    if not os.path.isfile(path):
        raise InvalidArgument(f"encoder weights file {path!r} does not exist (it must be a local safetensors file on "
                              "the learner and on every robot; nothing is downloaded)", field=field, value=path)
    with open(path, "rb") as f:
        blob = f.read()
    if sha256 is not None and sha256_hex(blob) != str(sha256).lower():
        raise InvalidArgument(f"encoder weights {path!r} have sha256 {sha256_hex(blob)}, not {sha256}",
                              field="policy_kwargs.encoder_sha256", value=sha256)
    try:
        state = {k: v for k, v in st_load(blob).items() if not k.startswith("fc.")}
        module.load_state_dict(state, strict=True)
    except Exception as exc:  # safetensors header errors, missing/unexpected keys, shape mismatches
        raise InvalidArgument(f"encoder weights {path!r} do not load into {type(module).__name__}: {exc}",
                              field=field, value=path) from exc


class CameraEncoder(nn.Module):
    """One camera: uint8 ``[B, H, W, C]`` -> ``[B, feature_dim]`` in (-1, 1). Normalises, permutes to
    ``[B, C, H, W]`` (channels_last memory), runs the backbone, then Linear, LayerNorm, tanh."""

    def __init__(self, info: TensorInfo, feature_dim: int, encoder: str = "drq",
                 weights: str | None = None, weights_sha256: str | None = None) -> None:
        super().__init__()
        h, w, c = info.shape
        if encoder == "resnet18":
            self.backbone: nn.Module = ResNet18(c)
            if weights:
                load_encoder_weights(self.backbone, weights, weights_sha256)
        else:
            self.backbone = drq_stack(c, h, w)
        self.imagenet = encoder == "resnet18" and c == 3  # ImageNet mean/std, else x / 255 - 0.5
        if self.imagenet:
            self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN), persistent=False)
            self.register_buffer("std", torch.tensor(_IMAGENET_STD), persistent=False)
        with torch.no_grad():  # flatten width from a dummy forward
            flat = self.backbone.eval()(torch.zeros(1, c, h, w)).reshape(1, -1).shape[1]
        self.backbone.train()
        self.head = nn.Sequential(nn.Linear(flat, feature_dim), nn.LayerNorm(feature_dim), nn.Tanh())

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        x = img.to(torch.float32, copy=True).mul_(1.0 / 255.0)  # scalar ops on contiguous HWC: the cheap order
        x = x.sub_(self.mean).div_(self.std) if self.imagenet else x.sub_(0.5)
        x = x.permute(0, 3, 1, 2)  # [B, C, H, W] view with channels_last strides
        return self.head(torch.flatten(self.backbone(x), 1))


class ObservationTrunk(nn.Module):
    """Observation dict -> features ``[B, out_dim]``: each camera's :class:`CameraEncoder` output,
    then the vector tensors through Linear(64) + ReLU, concatenated in that order. Cameras are
    randomly shifted (:func:`random_shift`) in ``train()`` mode only."""

    def __init__(self, spec: PolicySpec, cameras: Sequence[str], feature_dim: int, encoder: str, shift_pad: int,
                 encoder_weights: str | None = None, encoder_sha256: str | None = None) -> None:
        super().__init__()
        self.spec, self.cameras, self.shift_pad = spec, tuple(cameras), int(shift_pad)
        self.encoders = nn.ModuleList(CameraEncoder(spec.observation(name), feature_dim, encoder, encoder_weights,
                                                    encoder_sha256) for name in self.cameras)
        self.proprio = nn.Sequential(nn.Linear(spec.vector_dim, PROPRIO_DIM), nn.ReLU()) if spec.vector_dim else None
        self.out_dim = feature_dim * len(self.cameras) + (PROPRIO_DIM if self.proprio is not None else 0)

    def forward(self, obs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if not isinstance(obs, Mapping):
            raise InvalidArgument(f"a visuomotor policy takes a dict of observation tensors, got {type(obs).__name__}",
                                  field="obs", value=type(obs).__name__)
        parts = []
        for name, enc in zip(self.cameras, self.encoders):
            img = obs[name]
            if self.training and self.shift_pad:
                img = random_shift(img, self.shift_pad)
            parts.append(enc(img))
        if self.proprio is not None:
            parts.append(self.proprio(flatten_vectors(obs, self.spec)))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


class VisuomotorPolicy(nn.Module):
    """``forward(obs, task, cond=None) -> [B, act_dim]`` in (-1, 1); see the module docstring.

    Attributes read by the rest of fleetloop: ``conditioned`` (RECAP's guided inference), ``spec``,
    ``act_dim``, ``num_tasks``, ``cameras`` and ``trunk`` (:class:`ObservationTrunk`)."""

    def __init__(self, spec: PolicySpec, cameras: Sequence[str], feature_dim: int = 64, encoder: str = "drq",
                 hidden: Sequence[int] = (256, 256), shift_pad: int = 4, conditioned: bool = False, cond_dim: int = 8,
                 encoder_weights: str | None = None, encoder_sha256: str | None = None) -> None:
        super().__init__()
        self.spec, self.cameras = spec, tuple(cameras)
        self.act_dim, self.num_tasks, self.conditioned = spec.act_dim, spec.num_tasks, bool(conditioned)
        self._trunk_args = (spec, self.cameras, int(feature_dim), encoder, int(shift_pad), encoder_weights, encoder_sha256)
        self.trunk = ObservationTrunk(*self._trunk_args)
        self.task_embed = nn.Embedding(max(1, spec.num_tasks), TASK_DIM)
        self.cond_embed = nn.Embedding(3, int(cond_dim)) if self.conditioned else None
        layers: list[nn.Module] = []
        width_in = self.trunk.out_dim + TASK_DIM + (int(cond_dim) if self.conditioned else 0)
        for width in hidden:
            layers += [nn.Linear(width_in, int(width)), nn.ReLU()]
            width_in = int(width)
        layers.append(nn.Linear(width_in, spec.act_dim))
        self.head = nn.Sequential(*layers)

    def forward(self, obs: Mapping[str, torch.Tensor], task: torch.Tensor,
                cond: torch.Tensor | None = None) -> torch.Tensor:
        feats = self.trunk(obs)
        parts = [feats, self.task_embed(task.long()).to(feats.dtype)]
        if self.cond_embed is not None:
            if cond is None:
                cond = torch.zeros(feats.shape[0], dtype=torch.long, device=feats.device)
            parts.append(self.cond_embed(cond.long()).to(feats.dtype))
        return torch.tanh(self.head(torch.cat(parts, dim=-1)))

    def value_encoder(self) -> tuple[nn.Module, int]:
        """A FRESH :class:`ObservationTrunk` (same cameras, encoder, shift and vector projection; new
        parameters: random init, or ``encoder_weights`` loaded again) and its feature width ``F``. It
        maps an observation dict to ``[B, F]`` and has no task input: RECAP's value network adds its
        own task one-hot. Built on the CPU, in ``train()`` mode; the caller moves it."""
        trunk = ObservationTrunk(*self._trunk_args)
        return trunk, trunk.out_dim


def _check_kwargs(spec: PolicySpec, cameras: Any, feature_dim: Any, encoder: Any, hidden: Any, shift_pad: Any,
                  cond_dim: Any) -> tuple[str, ...]:
    """Validate the kwargs (InvalidArgument naming ``policy_kwargs.<name>`` and the value); the camera names."""
    def bad(name: str, value: Any, why: str) -> InvalidArgument:
        return InvalidArgument(f"{why}, got {value!r}", field=f"policy_kwargs.{name}", value=value)

    known = [o.name for o in spec.images]
    if cameras is None:
        names = tuple(known)
    else:
        names = (cameras,) if isinstance(cameras, str) else tuple(cameras)
        for name in names:
            if name not in known:
                raise InvalidArgument(f"camera {name!r} is not an image tensor of the job; its image tensors are {known}",
                                      field="policy_kwargs.cameras", value=name)
        if len(set(names)) != len(names):
            raise bad("cameras", list(names), "each camera may be named once")
    if not names and spec.vector_dim == 0:
        raise InvalidArgument("the visuomotor policy has no input: no camera selected and no vector observation",
                              field="policy_kwargs.cameras", value=list(names))
    if encoder not in ENCODERS:
        raise bad("encoder", encoder, f"encoder must be one of {list(ENCODERS)}")
    for name, value, low in (("feature_dim", feature_dim, 1), ("shift_pad", shift_pad, 0), ("cond_dim", cond_dim, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise bad(name, value, f"{name} must be an integer >= {low}")
    if not isinstance(hidden, (list, tuple)) or not all(isinstance(h, int) and not isinstance(h, bool) and h >= 1
                                                   for h in hidden):
        raise bad("hidden", hidden, "hidden must be a list of integers >= 1")
    if spec.act_dim < 1:
        raise InvalidArgument("the job declares no action tensor", field="action_specs", value=spec.act_dim)
    return names


@policy_factory
def visuomotor_policy(spec: PolicySpec, cameras: Sequence[str] | str | None = None, feature_dim: int = 64,
                      encoder: str = "drq", hidden: Sequence[int] = (256, 256), shift_pad: int = 4,
                      conditioned: bool = False, cond_dim: int = 8, encoder_weights: str | None = None,
                      encoder_sha256: str | None = None) -> VisuomotorPolicy:
    """Build a :class:`VisuomotorPolicy` for ``spec``.

    - ``cameras``: image tensors to encode, in this order (default: every image tensor of the job,
      in name order); an unknown name raises InvalidArgument on ``policy_kwargs.cameras``.
    - ``feature_dim``: width of each camera's feature vector. ``encoder``: ``"drq"`` (CPU-friendly)
      or ``"resnet18"`` (GPU). ``encoder_weights``: a local safetensors file for the resnet18
      backbone (torchvision names, ``fc.*`` ignored), loaded strictly; ``encoder_sha256`` optionally
      pins its digest. Both must hold on the learner and on every robot: they build the policy too.
    - ``hidden``: MLP head widths. ``shift_pad``: random shift in pixels while training (0: none).
    - ``conditioned``/``cond_dim``: add RECAP's indicator embedding (3 tokens, ``cond_dim`` wide).
    """
    names = _check_kwargs(spec, cameras, feature_dim, encoder, hidden, shift_pad, cond_dim)
    if encoder_weights is not None and encoder != "resnet18":
        raise InvalidArgument(f"encoder_weights is for encoder 'resnet18', not {encoder!r}",
                              field="policy_kwargs.encoder_weights", value=encoder_weights)
    return VisuomotorPolicy(spec, names, feature_dim, encoder, tuple(hidden), shift_pad, bool(conditioned), cond_dim,
                            None if encoder_weights is None else str(encoder_weights), encoder_sha256)
