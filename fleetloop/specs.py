"""What a policy is built for: the job's named observation and action tensors, and its tasks.

A job declares its per-step tensors as specs (``learner.config.SpecModel`` in YAML/JSON,
``fleetloop.v1.TensorSpec`` on the wire). This module turns either into plain, hashable
:class:`TensorInfo` and :class:`PolicySpec` values that the replay, the batch and every policy
plug-in share, so none of them depends on pydantic or protobuf.

Contract:

- An observation is a mapping ``name -> array`` with exactly the spec names; per step each array
  has the spec's dtype and shape. With a batch dimension it is ``[B, *shape]``.
- An *image* tensor is uint8 ``[H, W, C]`` with C in (1, 3, 4) (:attr:`TensorInfo.is_image`):
  channels last, as cameras produce them and as JPEG/PNG decode them. Policies normalise images
  themselves (the replay stores them as uint8).
- Every other observation tensor is a *vector* input: flattened and cast to float32, concatenated
  in name order (:func:`flatten_vectors`; :meth:`PolicySpec.from_specs` sorts by name). A job whose only observation is Meta-World's 39-value
  ``state`` therefore gives exactly the flat input of the original MLP policy.
- Actions are one flat float32 vector per step: the action specs flattened and concatenated in
  name order (:attr:`PolicySpec.act_dim`); ``low``/``high`` are the concatenated bounds (empty
  when the specs declare none).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from fleetloop.codec import WIRE_DTYPES
from fleetloop.errors import InvalidArgument

_IMAGE_CHANNELS = (1, 3, 4)
#: Names of the one observation / action tensor a caller means when it gives a bare width (the
#: legacy flat shape: a ``(obs_dim, act_dim, num_tasks)`` factory, a v1 dataset, a width-built replay).
DEFAULT_OBS_NAME, DEFAULT_ACTION_NAME = "state", "action"


@dataclass(frozen=True)
class TensorInfo:
    """One named per-step tensor: numpy dtype name (e.g. ``"float32"``, ``"uint8"``) and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def size(self) -> int:
        """Elements per step (the flattened width)."""
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes per step when stored decoded."""
        return self.size * np.dtype(self.dtype).itemsize

    @property
    def is_image(self) -> bool:
        """uint8 ``[H, W, C]`` with C in (1, 3, 4): a camera frame, channels last."""
        return self.dtype == "uint8" and len(self.shape) == 3 and self.shape[2] in _IMAGE_CHANNELS \
            and self.shape[0] >= 1 and self.shape[1] >= 1


def tensor_info(spec: Any) -> TensorInfo:
    """A :class:`TensorInfo` from a ``SpecModel``, a wire ``TensorSpec`` (dtype as enum code), a
    dict with name/dtype/shape, or a TensorInfo. InvalidArgument naming the spec on a bad dtype."""
    if isinstance(spec, TensorInfo):
        return spec
    get = spec.get if isinstance(spec, Mapping) else (lambda k, d=None: getattr(spec, k, d))
    name, dtype, shape = str(get("name")), get("dtype", "float32"), tuple(int(d) for d in get("shape", ()))
    if isinstance(dtype, (int, np.integer)) and not isinstance(dtype, bool):
        if int(dtype) not in WIRE_DTYPES:
            raise InvalidArgument(f"spec {name!r} has unknown dtype code {int(dtype)}", field=f"specs[{name}].dtype",
                                  value=int(dtype))
        dtype = WIRE_DTYPES[int(dtype)].name
    try:
        dtype = np.dtype(str(dtype)).name
    except TypeError:
        raise InvalidArgument(f"spec {name!r} has unknown dtype {dtype!r}", field=f"specs[{name}].dtype",
                              value=str(dtype)) from None
    return TensorInfo(name, dtype, shape)


def flat_tensor(width: int, name: str = DEFAULT_OBS_NAME) -> TensorInfo:
    """One float32 vector of ``width`` elements (a bare width's meaning)."""
    return TensorInfo(name, "float32", (int(width),))


def as_infos(specs: "int | Iterable[Any]", name: str = DEFAULT_OBS_NAME) -> list[TensorInfo]:
    """Spec list (SpecModel, wire TensorSpec, dicts) as TensorInfos; a bare width as one
    :func:`flat_tensor` named ``name``."""
    if isinstance(specs, (int, np.integer)):
        return [flat_tensor(int(specs), name)]
    return [tensor_info(s) for s in specs]


@dataclass(frozen=True)
class PolicySpec:
    """Everything a policy factory needs to build a network for a job (see the module docstring).

    ``observations`` and ``actions`` are in name order when built by :meth:`from_specs` (the same
    on the learner and on every robot, whatever order each declared); ``low``/``high`` are the flattened
    action bounds (empty: unbounded); ``tasks`` are the job's task ids, in the order the task index
    of a batch refers to."""

    observations: tuple[TensorInfo, ...]
    actions: tuple[TensorInfo, ...]
    tasks: tuple[str, ...]
    low: tuple[float, ...] = ()
    high: tuple[float, ...] = ()

    @classmethod
    def from_specs(cls, observation_specs: Iterable[Any], action_specs: Iterable[Any], tasks: Sequence[str]) -> "PolicySpec":
        """Build from job specs (SpecModel, wire TensorSpec or dicts) and the task list. Tensors are
        put in *name order*: the handshake compares a robot's specs with the job's order-free, so
        the learner and every robot must not depend on the order either side declared them in."""
        acts = sorted(action_specs, key=lambda s: tensor_info(s).name)
        obs = sorted((tensor_info(s) for s in observation_specs), key=lambda t: t.name)
        infos = tuple(tensor_info(s) for s in acts)
        low = _bounds(acts, infos, "low", float("-inf"))
        high = _bounds(acts, infos, "high", float("inf"))
        return cls(tuple(obs), infos, tuple(str(t) for t in tasks), low, high)

    @classmethod
    def flat(cls, obs_dim: int, act_dim: int, num_tasks: int) -> "PolicySpec":
        """The legacy shape: one float32 ``state`` [obs_dim], one ``action`` [act_dim], tasks
        ``task-0..``: what a ``(obs_dim, act_dim, num_tasks)`` caller means."""
        return cls((flat_tensor(obs_dim),), (flat_tensor(act_dim, DEFAULT_ACTION_NAME),),
                   tuple(f"task-{i}" for i in range(int(num_tasks))))

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    @property
    def act_dim(self) -> int:
        """Width of the flat action vector (all action specs, flattened, in spec order)."""
        return sum(a.size for a in self.actions)

    @property
    def images(self) -> tuple[TensorInfo, ...]:
        """The camera tensors, in spec order."""
        return tuple(o for o in self.observations if o.is_image)

    @property
    def vectors(self) -> tuple[TensorInfo, ...]:
        """The non-image observation tensors, in spec order."""
        return tuple(o for o in self.observations if not o.is_image)

    @property
    def vector_dim(self) -> int:
        """Width of :func:`flatten_vectors`' output."""
        return sum(v.size for v in self.vectors)

    def observation(self, name: str) -> TensorInfo:
        for o in self.observations:
            if o.name == name:
                return o
        raise InvalidArgument(f"no observation tensor {name!r}; the job has {[o.name for o in self.observations]}",
                              field="observation", value=name)


def _bounds(specs: list[Any], infos: tuple[TensorInfo, ...], key: str, unbounded: float) -> tuple[float, ...]:
    """Flattened ``low``/``high`` of the action specs: a spec's one value applies to all its
    elements (as on the wire); a spec without bounds is unbounded; () when no spec has any."""
    out: list[float] = []
    for spec, info in zip(specs, infos):
        vals = spec.get(key) if isinstance(spec, Mapping) else getattr(spec, key, None)
        vals = [float(x) for x in (vals or ())]
        out += vals * info.size if len(vals) == 1 else (vals if len(vals) == info.size else [unbounded] * info.size)
    return () if all(abs(x) == float("inf") for x in out) else tuple(out)


def flatten_vectors(obs: Mapping[str, Any], spec: PolicySpec | None):
    """The vector observation tensors of a batched ``obs`` mapping (torch tensors ``[B, *shape]``)
    flattened to float32 and concatenated in spec order: ``[B, spec.vector_dim]``. Without a spec,
    every tensor of ``obs``, in its order. A bare tensor (a legacy caller's flat observation) is
    returned as float32 unchanged."""
    import torch

    if isinstance(obs, torch.Tensor):
        return obs.float()
    names = list(obs) if spec is None else [v.name for v in spec.vectors]
    parts = [obs[n].reshape(obs[n].shape[0], -1).float() for n in names]
    if not parts:
        first = next(iter(obs.values()))
        return torch.zeros(first.shape[0], 0, device=first.device)
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


def batch_size_of(obs: Any) -> int:
    """Leading size of an observation batch: a tensor/array, or a mapping of them."""
    if isinstance(obs, Mapping):
        return int(next(iter(obs.values())).shape[0])
    return int(obs.shape[0])
