"""The training batch an :class:`~learner.algorithms.base.Algorithm` consumes.

A :class:`Batch` is a flat set of N samples drawn from the replay store (any mix of tasks and of
online / offline sources), as torch tensors with fixed dtypes:

============== ================= ==========================================================
field          shape / dtype     meaning
============== ================= ==========================================================
obs            [N, obs_dim] f32  observation
actions        [N, act_dim] f32  the *executed* action (the operator's on intervention frames)
task           [N] int64         task index (position of the task id in the job's task list)
interventions  [N] bool          True where a human (or a demo) produced the action
source         [N] uint8         :data:`ONLINE` (0) or :data:`OFFLINE` (1)
versions       [N] int64         behaviour policy version; :data:`OFFLINE_VERSION` (-1) for demos
rewards        [N] f32           per-step reward as stored
weights        [N] f32           per-sample loss weight from the staleness gate (default 1; 0 = dropped)
extra          dict[str, Tensor] algorithm-specific per-sample fields (e.g. RECAP returns, advantages)
============== ================= ==========================================================

Invariant: every tensor (and every value of ``extra``) has the same leading size N, and all live on
the same device. Build from numpy with :meth:`Batch.from_numpy` or from replay samples with
:meth:`Batch.from_parts`; both validate shapes and raise
:class:`~fleetloop.errors.InvalidArgument` naming the offending field.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Mapping, Sequence

import numpy as np
import torch

from fleetloop.errors import InvalidArgument

ONLINE, OFFLINE = 0, 1
#: Behaviour version stored for offline demonstrations (no policy produced them).
OFFLINE_VERSION = -1
SOURCES = {"online": ONLINE, "offline": OFFLINE}

_TENSOR_FIELDS = ("obs", "actions", "task", "interventions", "source", "versions", "rewards", "weights")
#: Replay sample keys that are batch fields; :data:`REPLAY_META` keys stay in the replay; every other
#: sample key (e.g. RECAP's ``recap_*`` columns) is carried into ``Batch.extra``.
SAMPLE_FIELDS = ("obs", "actions", "rewards", "interventions", "versions")
REPLAY_META = ("episode_keys", "steps", "insert_times")


def extra_keys(sample: Mapping[str, np.ndarray]) -> list[str]:
    """Keys of a replay sample that go into ``Batch.extra`` (sorted): neither batch fields nor replay metadata."""
    return sorted(k for k in sample if k not in SAMPLE_FIELDS and k not in REPLAY_META)


_DTYPES = {
    "obs": np.float32, "actions": np.float32, "task": np.int64, "interventions": np.bool_,
    "source": np.uint8, "versions": np.int64, "rewards": np.float32, "weights": np.float32,
}


@dataclass
class Batch:
    """N training samples as torch tensors (see the module docstring for fields and invariants)."""

    obs: torch.Tensor
    actions: torch.Tensor
    task: torch.Tensor
    interventions: torch.Tensor
    source: torch.Tensor
    versions: torch.Tensor
    rewards: torch.Tensor
    weights: torch.Tensor
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.obs.shape[0])

    @property
    def device(self) -> torch.device:
        return self.obs.device

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        """A copy on ``device`` (tensors already there are not copied)."""
        moved = {f: getattr(self, f).to(device, non_blocking=non_blocking) for f in _TENSOR_FIELDS}
        extra = {k: v.to(device, non_blocking=non_blocking) for k, v in self.extra.items()}
        return Batch(**moved, extra=extra)

    def validate(self) -> "Batch":
        """Check shapes and dtypes; InvalidArgument naming the field on any mismatch. Returns self."""
        n = len(self)
        if self.obs.dim() != 2:
            raise InvalidArgument(f"obs must be [N, obs_dim], got shape {tuple(self.obs.shape)}", field="obs")
        if self.actions.dim() != 2 or self.actions.shape[0] != n:
            raise InvalidArgument(f"actions must be [{n}, act_dim], got shape {tuple(self.actions.shape)}", field="actions")
        for name in _TENSOR_FIELDS[2:]:
            t = getattr(self, name)
            if tuple(t.shape) != (n,):
                raise InvalidArgument(f"{name} must have shape ({n},), got {tuple(t.shape)}", field=name)
        for name in _TENSOR_FIELDS:
            want = torch.from_numpy(np.zeros(0, dtype=_DTYPES[name])).dtype
            if getattr(self, name).dtype != want:
                raise InvalidArgument(f"{name} must be {want}, got {getattr(self, name).dtype}", field=name)
        for key, t in self.extra.items():
            if t.shape[0] != n:
                raise InvalidArgument(f"extra[{key!r}] leading size must be {n}, got {t.shape[0]}", field=f"extra.{key}")
        return self

    @classmethod
    def from_numpy(
        cls,
        obs: np.ndarray,
        actions: np.ndarray,
        task: np.ndarray,
        interventions: np.ndarray,
        source: np.ndarray,
        versions: np.ndarray,
        rewards: np.ndarray,
        weights: np.ndarray | None = None,
        extra: Mapping[str, np.ndarray] | None = None,
    ) -> "Batch":
        """Build a CPU batch from numpy arrays (cast to the field dtypes; ``weights`` default 1)."""
        n = int(np.shape(obs)[0])
        arrays = {
            "obs": obs, "actions": actions, "task": task, "interventions": interventions, "source": source,
            "versions": versions, "rewards": rewards,
            "weights": np.ones(n, dtype=np.float32) if weights is None else weights,
        }
        tensors = {k: torch.from_numpy(np.ascontiguousarray(v, dtype=_DTYPES[k])) for k, v in arrays.items()}
        ext = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in (extra or {}).items()}
        return cls(**tensors, extra=ext).validate()

    @classmethod
    def from_parts(cls, parts: Sequence[tuple[int, int, Mapping[str, np.ndarray]]]) -> "Batch":
        """Concatenate replay samples into one batch.

        ``parts`` is a list of ``(task_index, source, sample)`` where ``sample`` is the dict returned by
        :meth:`learner.replay.ReplayStore.sample` (keys ``obs``, ``actions``, ``rewards``,
        ``interventions``, ``versions``; :data:`REPLAY_META` keys are ignored; any other key, e.g.
        RECAP's ``recap_*`` columns, goes into ``extra`` and must be in every part, else
        InvalidArgument naming it). Weights start at 1; the learner overwrites them with the
        staleness gate's. At least one part is required.
        """
        if not parts:
            raise InvalidArgument("cannot build a batch from zero parts", field="parts", value=0)
        ext = extra_keys(parts[0][2])
        cols: dict[str, list[np.ndarray]] = {k: [] for k in (*SAMPLE_FIELDS, "task", "source", *ext)}
        for task_index, source, sample in parts:
            if extra_keys(sample) != ext:
                raise InvalidArgument(f"replay samples disagree on extra columns: {extra_keys(sample)} vs {ext}",
                                      field="parts.extra", value=extra_keys(sample))
            n = int(sample["obs"].shape[0])
            for k in (*SAMPLE_FIELDS, *ext):
                cols[k].append(sample[k])
            cols["task"].append(np.full(n, task_index, dtype=np.int64))
            cols["source"].append(np.full(n, source, dtype=np.uint8))
        cat = {k: np.concatenate(v) for k, v in cols.items()}
        extra = {k: cat.pop(k) for k in ext}
        return cls.from_numpy(**cat, extra=extra)

    def numpy(self) -> dict[str, np.ndarray]:
        """All tensor fields as numpy arrays (copied to CPU); ``extra`` keys are prefixed ``extra.``."""
        out = {f.name: getattr(self, f.name).detach().cpu().numpy() for f in fields(self) if f.name != "extra"}
        out.update({f"extra.{k}": v.detach().cpu().numpy() for k, v in self.extra.items()})
        return out
