"""The training batch an :class:`~learner.algorithms.base.Algorithm` consumes.

A :class:`Batch` is a flat set of N samples drawn from the replay store (any mix of tasks and of
online / offline sources), as torch tensors with fixed dtypes:

============== ================= ==========================================================
field          shape / dtype     meaning
============== ================= ==========================================================
obs            dict[str, Tensor] observation: tensor name -> [N, *shape] in its spec dtype
                                 (camera frames uint8 [N, H, W, C]; see fleetloop.specs)
actions        [N, act_dim] f32  the *executed* action (the operator's on intervention frames)
task           [N] int64         task index (position of the task id in the job's task list)
interventions  [N] bool          True where a human (or a demo) produced the action
source         [N] uint8         :data:`ONLINE` (0) or :data:`OFFLINE` (1)
versions       [N] int64         behaviour policy version; :data:`OFFLINE_VERSION` (-1) for demos
rewards        [N] f32           per-step reward as stored
weights        [N] f32           per-sample loss weight from the staleness gate (default 1; 0 = dropped)
extra          dict[str, Tensor] algorithm-specific per-sample fields (e.g. RECAP returns, advantages;
                                 an observation-valued field is one ``<key>.<name>`` entry per
                                 tensor: :meth:`Batch.extra_obs`)
============== ================= ==========================================================

Invariant: every tensor (every observation tensor, every value of ``extra``) has the same leading
size N, and all live on the same device. Build from numpy with :meth:`Batch.from_numpy` or from replay samples with
:meth:`Batch.from_parts`; both validate shapes and raise
:class:`~fleetloop.errors.InvalidArgument` naming the offending field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from fleetloop.errors import InvalidArgument
from fleetloop.specs import DEFAULT_OBS_NAME

ONLINE, OFFLINE = 0, 1
#: Behaviour version stored for offline demonstrations (no policy produced them).
OFFLINE_VERSION = -1
SOURCES = {"online": ONLINE, "offline": OFFLINE}

_TENSOR_FIELDS = ("actions", "task", "interventions", "source", "versions", "rewards", "weights")
#: Replay sample keys that are batch fields; :data:`REPLAY_META` keys stay in the replay; every other
#: sample key (e.g. RECAP's ``recap_*`` columns) is carried into ``Batch.extra``.
SAMPLE_FIELDS = ("obs", "actions", "rewards", "interventions", "versions")
REPLAY_META = ("episode_keys", "steps", "insert_times")


def extra_keys(sample: Mapping[str, np.ndarray]) -> list[str]:
    """Keys of a replay sample that go into ``Batch.extra`` (sorted): neither batch fields nor replay metadata."""
    return sorted(k for k in sample if k not in SAMPLE_FIELDS and k not in REPLAY_META)


_DTYPES = {
    "actions": np.float32, "task": np.int64, "interventions": np.bool_,
    "source": np.uint8, "versions": np.int64, "rewards": np.float32, "weights": np.float32,
}


@dataclass
class Batch:
    """N training samples as torch tensors (see the module docstring for fields and invariants)."""

    obs: dict[str, torch.Tensor]
    actions: torch.Tensor
    task: torch.Tensor
    interventions: torch.Tensor
    source: torch.Tensor
    versions: torch.Tensor
    rewards: torch.Tensor
    weights: torch.Tensor
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.actions.shape[0])

    @property
    def device(self) -> torch.device:
        return self.actions.device

    def _map(self, fn) -> "Batch":
        return Batch(obs={k: fn(v) for k, v in self.obs.items()}, **{f: fn(getattr(self, f)) for f in _TENSOR_FIELDS},
                     extra={k: fn(v) for k, v in self.extra.items()})

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        """A copy on ``device`` (tensors already there are not copied). With ``non_blocking`` from
        pinned host memory (:meth:`pin_memory`) the copies overlap with host work."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def take(self, index) -> "Batch":
        """The rows ``index`` (a slice, index tensor or bool mask) of every field, contiguous."""
        return self._map(lambda t: t[index].contiguous())

    def pin_memory(self) -> "Batch":
        """A copy in page-locked host memory (for ``to("cuda", non_blocking=True)``)."""
        return self._map(lambda t: t.pin_memory())

    def extra_obs(self, key: str) -> dict[str, torch.Tensor]:
        """An observation-valued extra field (``<key>.<name>`` entries) as name -> tensor. A batch
        with one observation tensor may carry it as one ``<key>`` entry instead."""
        prefix = key + "."
        out = {k[len(prefix):]: v for k, v in self.extra.items() if k.startswith(prefix)}
        if not out and key in self.extra and len(self.obs) == 1:
            out = {next(iter(self.obs)): self.extra[key]}
        return out

    def validate(self) -> "Batch":
        """Check shapes and dtypes; InvalidArgument naming the field on any mismatch. Returns self."""
        n = len(self)
        if self.actions.dim() != 2:
            raise InvalidArgument(f"actions must be [N, act_dim], got shape {tuple(self.actions.shape)}", field="actions")
        if not isinstance(self.obs, dict) or not self.obs:
            raise InvalidArgument("obs must be a non-empty dict of tensors", field="obs", value=type(self.obs).__name__)
        for key, t in self.obs.items():
            if t.dim() < 1 or t.shape[0] != n:
                raise InvalidArgument(f"obs[{key}] must be [{n}, ...], got shape {tuple(t.shape)}", field=f"obs.{key}")
        for name in _TENSOR_FIELDS[1:]:
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
        obs: np.ndarray | Mapping[str, np.ndarray],
        actions: np.ndarray,
        task: np.ndarray,
        interventions: np.ndarray,
        source: np.ndarray,
        versions: np.ndarray,
        rewards: np.ndarray,
        weights: np.ndarray | None = None,
        extra: Mapping[str, np.ndarray] | None = None,
    ) -> "Batch":
        """Build a CPU batch from numpy arrays (cast to the field dtypes; ``weights`` default 1).
        ``obs``: name -> array (dtypes kept), or one float array (named :data:`DEFAULT_OBS_NAME`)."""
        if not isinstance(obs, Mapping):
            obs = {DEFAULT_OBS_NAME: np.asarray(obs, dtype=np.float32)}
        n = int(np.shape(actions)[0])
        arrays = {
            "actions": actions, "task": task, "interventions": interventions, "source": source,
            "versions": versions, "rewards": rewards,
            "weights": np.ones(n, dtype=np.float32) if weights is None else weights,
        }
        tensors = {k: torch.from_numpy(np.ascontiguousarray(v, dtype=_DTYPES[k])) for k, v in arrays.items()}
        ext = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in (extra or {}).items()}
        obs_t = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in obs.items()}
        return cls(obs=obs_t, **tensors, extra=ext).validate()

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
        for _, _, sample in parts:
            if extra_keys(sample) != ext:
                raise InvalidArgument(f"replay samples disagree on extra columns: {extra_keys(sample)} vs {ext}",
                                      field="parts.extra", value=extra_keys(sample))
        cat = concat_samples([s for _, _, s in parts], ext)
        cat["task"] = np.concatenate([np.full(len(s["rewards"]), ti, dtype=np.int64) for ti, _, s in parts])
        cat["source"] = np.concatenate([np.full(len(s["rewards"]), src, dtype=np.uint8) for _, src, s in parts])
        extra = {k: cat.pop(k) for k in ext}
        return cls.from_numpy(**cat, extra=extra)

    def numpy(self) -> dict[str, np.ndarray]:
        """All tensor fields as numpy arrays (copied to CPU); observation keys are prefixed ``obs.``,
        ``extra`` keys ``extra.``."""
        out = {f: getattr(self, f).detach().cpu().numpy() for f in _TENSOR_FIELDS}
        out.update({f"obs.{k}": v.detach().cpu().numpy() for k, v in self.obs.items()})
        out.update({f"extra.{k}": v.detach().cpu().numpy() for k, v in self.extra.items()})
        return out


def concat_samples(samples: Sequence[Mapping[str, Any]], ext: Sequence[str] = ()) -> dict[str, Any]:
    """Concatenate replay samples: the :data:`SAMPLE_FIELDS` (``obs`` per tensor name) and the
    ``ext`` keys. Every sample must hold the same observation tensors."""
    out: dict[str, Any] = {k: np.concatenate([s[k] for s in samples]) for k in (*SAMPLE_FIELDS, *ext) if k != "obs"}
    names = list(samples[0]["obs"])
    out["obs"] = {n: np.concatenate([s["obs"][n] for s in samples]) for n in names}
    return out
