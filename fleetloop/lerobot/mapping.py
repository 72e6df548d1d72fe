"""Which LeRobot feature feeds which of a job's tensors: the import mapping (YAML or JSON).

::

    observations:              # job observation tensor: LeRobot feature
      proprio: observation.state
      corner: observation.images.front
    actions:                   # job action tensor: LeRobot feature
      action: action
    reward: next.reward        # optional; default: 0 every step
    intervention: intervention # optional bool feature; default: every step is a demonstration (True)
    resize_images: false       # optional: area-resize frames to the job's image size instead of refusing

Contract of :meth:`FeatureMapping.bind` (every refusal is InvalidArgument with ``field`` the mapping
key, e.g. ``mapping.observations.corner``, and a message naming both sides):

- every job tensor is mapped, and the mapping names no tensor the job lacks;
- every named feature exists (the message lists the dataset's features);
- a job image tensor (uint8 ``[H, W, C]``) takes a ``video``/``image`` feature (or a uint8 ``[H, W, C]``
  one) of the same shape; with ``resize_images`` only C must match and frames are area-resized;
- any other tensor takes a non-visual feature of the same shape and dtype, except that a float64
  feature may feed a float32 tensor (cast);
- ``reward`` is a numeric ``[1]`` feature; ``intervention`` a bool ``[1]`` feature.

:meth:`BoundMapping.convert` turns one :class:`~fleetloop.lerobot.layout.LeRobotEpisode` into the job's
per-step arrays: observations ``{tensor: [T, *shape]}`` in the tensor's dtype, the actions of all
action tensors concatenated in name order (``PolicySpec``'s order) as float32 ``[T, act_dim]``,
float32 rewards ``[T]`` and bool interventions ``[T]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from fleetloop.errors import InvalidArgument, NotFound
from fleetloop.lerobot.layout import Feature, LeRobotEpisode
from fleetloop.specs import TensorInfo

_KEYS = ("observations", "actions", "reward", "intervention", "resize_images")


def _describe(x: Feature | TensorInfo) -> str:
    return f"{x.dtype}{list(x.shape)}"


@dataclass(frozen=True)
class FeatureMapping:
    """The mapping file's content (see the module docstring)."""

    observations: dict[str, str]
    actions: dict[str, str]
    reward: str | None = None
    intervention: str | None = None
    resize_images: bool = False

    @classmethod
    def from_dict(cls, data: Any) -> "FeatureMapping":
        """Checked mapping from parsed YAML/JSON; InvalidArgument naming ``mapping.<key>`` otherwise."""
        if not isinstance(data, Mapping):
            raise InvalidArgument(f"a mapping is a YAML/JSON object with {list(_KEYS)}, got {type(data).__name__}",
                                  field="mapping", value=None)
        for key in data:
            if key not in _KEYS:
                raise InvalidArgument(f"unknown mapping key {key!r} (known: {list(_KEYS)})", field=f"mapping.{key}", value=key)
        groups = {}
        for group in ("observations", "actions"):
            value = data.get(group)
            if not isinstance(value, Mapping) or not value:
                raise InvalidArgument(f"mapping.{group} must map each job tensor to a LeRobot feature", field=f"mapping.{group}",
                                      value=value)
            for tensor, feature in value.items():
                if not isinstance(feature, str) or not feature:
                    raise InvalidArgument(f"mapping.{group}.{tensor} must name a LeRobot feature, got {feature!r}",
                                          field=f"mapping.{group}.{tensor}", value=feature)
            groups[group] = {str(k): str(v) for k, v in value.items()}
        for key in ("reward", "intervention"):
            if data.get(key) is not None and (not isinstance(data[key], str) or not data[key]):
                raise InvalidArgument(f"mapping.{key} must name a LeRobot feature, got {data[key]!r}", field=f"mapping.{key}",
                                      value=data[key])
        resize = data.get("resize_images", False)
        if not isinstance(resize, bool):
            raise InvalidArgument(f"mapping.resize_images must be true or false, got {resize!r}", field="mapping.resize_images",
                                  value=resize)
        return cls(groups["observations"], groups["actions"], data.get("reward"), data.get("intervention"), resize)

    @classmethod
    def load(cls, path: str | Path) -> "FeatureMapping":
        """The mapping of a YAML (or JSON) file; NotFound / InvalidArgument naming ``mapping``."""
        import yaml

        path = Path(path)
        if not path.exists():
            raise NotFound(f"no mapping file {path}", field="mapping", value=str(path))
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise InvalidArgument(f"mapping file {path} is not YAML/JSON ({exc})", field="mapping", value=str(path)) from None
        return cls.from_dict(data)

    def bind(self, features: Mapping[str, Feature], observations: Sequence[TensorInfo],
             actions: Sequence[TensorInfo]) -> "BoundMapping":
        """Check this mapping against a dataset's ``features`` and a job's tensors (module docstring)."""
        obs = _bind_group("observations", self.observations, features, observations, self.resize_images)
        acts = _bind_group("actions", self.actions, features, sorted(actions, key=lambda a: a.name), False)
        reward = _scalar(features, self.reward, "reward", "biuf")
        intervention = _scalar(features, self.intervention, "intervention", "b")
        return BoundMapping(obs, acts, reward, intervention)


def _feature(features: Mapping[str, Feature], name: str, fld: str) -> Feature:
    if name not in features:
        raise InvalidArgument(f"{fld}: feature {name!r} is not in the dataset; its features: {sorted(features)}",
                              field=fld, value=name)
    return features[name]


def _scalar(features: Mapping[str, Feature], name: str | None, key: str, kinds: str) -> Feature | None:
    if name is None:
        return None
    fld = f"mapping.{key}"
    ft = _feature(features, name, fld)
    want = "bool" if kinds == "b" else "numeric"
    if ft.is_visual or ft.dtype == "string" or ft.size != 1 or np.dtype(ft.dtype).kind not in kinds:
        raise InvalidArgument(f"{fld}: feature {name!r} is {_describe(ft)}, want a {want} [1] feature", field=fld, value=name)
    return ft


def _bind_group(group: str, names: Mapping[str, str], features: Mapping[str, Feature], tensors: Sequence[TensorInfo],
                resize: bool) -> list[tuple[TensorInfo, Feature]]:
    job = {t.name: t for t in tensors}
    for tensor in names:
        if tensor not in job:
            raise InvalidArgument(f"mapping.{group}.{tensor}: the job has no {group[:-1]} tensor {tensor!r} (its tensors: "
                                  f"{sorted(job)})", field=f"mapping.{group}.{tensor}", value=tensor)
    out = []
    for info in tensors:
        fld = f"mapping.{group}.{info.name}"
        if info.name not in names:
            raise InvalidArgument(f"{fld}: job tensor {info.name!r} ({_describe(info)}) is not mapped; map it to one of the "
                                  f"dataset's features {sorted(features)}", field=fld, value=None)
        ft = _feature(features, names[info.name], fld)
        _check_pair(fld, info, ft, resize)
        out.append((info, ft))
    return out


def _check_pair(fld: str, info: TensorInfo, ft: Feature, resize: bool) -> None:
    both = f"feature {ft.name!r} is {_describe(ft)}, job tensor {info.name!r} is {_describe(info)}"
    if info.is_image:
        visual = ft.is_visual or (ft.dtype == "uint8" and len(ft.shape) == 3)
        if not visual or len(ft.shape) != 3:
            raise InvalidArgument(f"{fld}: {both}; an image tensor takes a video/image feature", field=fld, value=ft.name)
        if ft.shape[2] != info.shape[2]:
            raise InvalidArgument(f"{fld}: {both}: the channels differ", field=fld, value=ft.name)
        if tuple(ft.shape) != tuple(info.shape) and not resize:
            raise InvalidArgument(f"{fld}: {both}: the image sizes differ (set resize_images: true to area-resize)",
                                  field=fld, value=ft.name)
        return
    if ft.is_visual or ft.dtype == "string":
        raise InvalidArgument(f"{fld}: {both}; a vector tensor takes a non-visual feature", field=fld, value=ft.name)
    if tuple(ft.shape) != tuple(info.shape):
        raise InvalidArgument(f"{fld}: {both}: the shapes differ", field=fld, value=ft.name)
    if ft.dtype != info.dtype and not (ft.dtype == "float64" and info.dtype == "float32"):
        raise InvalidArgument(f"{fld}: {both}: the dtypes differ (only float64 -> float32 is cast)", field=fld, value=ft.name)


def area_resize(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 ``[T, H, W, C]`` frames area-resized to ``[T, height, width, C]`` (each output pixel the
    mean of the input area it covers; also correct for enlarging)."""
    frames = np.asarray(frames)
    wy = _area_weights(frames.shape[1], height)
    wx = _area_weights(frames.shape[2], width)
    out = np.einsum("oh,thwc,pw->topc", wy, frames.astype(np.float32), wx, optimize=True)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _area_weights(n_in: int, n_out: int) -> np.ndarray:
    """``[n_out, n_in]`` weights: the share of output cell ``o`` covered by input cell ``i``."""
    scale = n_in / n_out
    lo = np.arange(n_out)[:, None] * scale
    hi = lo + scale
    j = np.arange(n_in)[None, :]
    overlap = np.clip(np.minimum(hi, j + 1) - np.maximum(lo, j), 0.0, None)
    return (overlap / scale).astype(np.float32)


@dataclass
class Converted:
    """One episode in a job's tensors (see :meth:`BoundMapping.convert`)."""

    obs: dict[str, np.ndarray]
    actions: np.ndarray
    rewards: np.ndarray
    interventions: np.ndarray
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class BoundMapping:
    """A mapping checked against one dataset and one job (made by :meth:`FeatureMapping.bind`)."""

    observations: list[tuple[TensorInfo, Feature]]
    actions: list[tuple[TensorInfo, Feature]]
    reward: Feature | None
    intervention: Feature | None

    @property
    def feature_names(self) -> list[str]:
        """The dataset features this mapping reads (what to decode)."""
        names = [ft.name for _, ft in self.observations + self.actions]
        names += [ft.name for ft in (self.reward, self.intervention) if ft is not None]
        return list(dict.fromkeys(names))

    def convert(self, ep: LeRobotEpisode) -> Converted:
        """The episode's observations, flat actions, rewards and interventions (module docstring)."""
        t = len(ep)
        obs = {}
        for info, ft in self.observations:
            arr = np.asarray(ep.frames[ft.name])
            if info.is_image and tuple(arr.shape[1:]) != tuple(info.shape):
                arr = area_resize(arr, info.shape[0], info.shape[1])
            obs[info.name] = np.ascontiguousarray(arr.reshape(t, *info.shape), dtype=info.dtype)
        parts = [np.asarray(ep.frames[ft.name], dtype=np.float32).reshape(t, info.size) for info, ft in self.actions]
        actions = np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
        rewards = np.zeros(t, np.float32) if self.reward is None else \
            np.asarray(ep.frames[self.reward.name], dtype=np.float32).reshape(t)
        interventions = np.ones(t, np.bool_) if self.intervention is None else \
            np.asarray(ep.frames[self.intervention.name], dtype=np.bool_).reshape(t)
        return Converted(obs, np.ascontiguousarray(actions), rewards, interventions, dict(ep.extra))
