"""Per-task replay store: an online FIFO ring buffer and an offline demonstration buffer per task.

Layout: for every task id of the job, two :class:`~learner.ring.Ring` s (:mod:`learner.ring`, which
states the ring's own invariants) of preallocated numpy arrays, one row
per step with fields ``obs`` (every observation tensor of the job's schema, each in its own dtype
and shape: camera frames stay uint8), ``actions`` [act_dim] f32, ``rewards`` f32,
``interventions`` bool, ``versions`` i64 (behaviour policy version; -1 for demos),
``episode_keys`` i64, ``steps`` i64 (step index within the episode) and ``insert_times`` f64 (wall
clock at insertion, for latency metrics).

Invariants:

- ONLINE buffers are FIFO rings: when full, the oldest steps are evicted first and counted in
  ``evicted``. OFFLINE buffers never evict: demonstrations are a fixed set the store must hold in
  full, so overflowing one raises :class:`~fleetloop.errors.ResourceExhausted` (raise
  ``offline_capacity``).
- Appending a chunk of T steps is amortised O(T): arrays grow geometrically up to the capacity
  (memory is only taken as data arrives: an empty buffer holds none), then wrap.
- An *intervention index* (a second FIFO ring of the slots holding intervention steps) gives O(1)
  intervention counts and O(n) uniform sampling of intervention frames. It stays exact under
  eviction because eviction is FIFO: the evicted intervention steps are always the oldest ones in
  the index, so eviction just advances its head.
- ``sample`` draws uniformly *with replacement* and returns copies. Every online slot remembers
  whether it was ever sampled since it was written, so an eviction is reported as
  :class:`Eviction` ``(evicted, unsampled)``: steps retired after training on them, and steps lost
  before the learner ever trained on them (the learner counts both and slows the fleet down on the
  second).
- Memory: a buffer holds at most ``capacity`` rows of :func:`bytes_per_step` bytes (arrays grow
  geometrically up to the capacity, never past it); :meth:`ReplayStore.nbytes` reports what is
  allocated, so a memory budget can size the online rings (:meth:`ReplayStore.set_online_capacity`).
- Compressed cameras (``compressed``, :mod:`learner.frames`): the online rings store those tensors
  as frame cells (encoded bytes as they arrived, or arrays for frames that arrived raw) and count
  their actual bytes; with ``max_bytes`` an online ring evicts FIFO by rows and by bytes
  (:mod:`learner.ring`). ``sample`` then returns their cells (object arrays ``[n, k]``, also in
  ``recap_next_obs.<name>``): :class:`learner.frames.FrameDecoder` decodes them outside the lock.
  Offline buffers always store decoded frames.

**Episode target columns (RECAP).** A store built with ``episode_targets`` (a function
``(length, outcome) -> per-step columns``, e.g. :meth:`learner.algorithms.recap.RecapAlgorithm.episode_targets`)
also keeps, per row, the columns of :data:`TARGET_COLUMNS` (``recap_mc_return``, ``recap_value_mask``,
``recap_nstep_reward``, ``recap_bootstrap``, ``recap_adv_valid``) and the write number of the row's
N-step bootstrap observation. Choice: the columns are **stored at episode end**, not computed at
sample time: they depend only on (step index t, length T, outcome), all known once the outcome
arrives, so one vectorised write per episode replaces per-sample work on every learner step.

- A new row starts *unknown*: ``recap_adv_valid`` and ``recap_value_mask`` False (no advantage, no
  value target; RECAP trains it unconditioned). An episode still running stays unknown.
- Online: each open episode maps step index -> write number (step indices past 4 x capacity are
  not tracked: those rows stay unknown). :meth:`ReplayStore.end_episode` (outcome of the last
  chunk) writes the episode's columns into its rows still live; evicted rows are never touched.
- Offline demos: :meth:`ReplayStore.add_offline` with ``outcome`` (the manifest's) labels at once.
- :meth:`ReplayStore.sample` adds ``recap_next_obs.<name>`` per observation tensor (the bootstrap
  step's observation, same episode; the row's own where no bootstrap is needed). A bootstrap step never stored (dropped at
  ingest) or no longer live makes the row's ``recap_adv_valid`` False.
- Without ``episode_targets`` (HG-DAgger) none of this is allocated or run. :meth:`ReplayStore.restore`
  resets the columns to unknown (the ingest-log replay at restart relabels ended episodes).

Thread-safety: every public method takes an internal lock, so an ingest thread may add while the
training thread samples. Samples are copies, never views of the ring.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Literal, Mapping, Sequence

import numpy as np

from fleetloop.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from fleetloop.specs import TensorInfo
from learner.frames import frames_per_step, to_cells
from learner.ring import (FIELDS, FRAME_BYTES, OBS_PREFIX, TARGET_COLUMNS, EpisodeTargets, Eviction, Ring, bytes_per_step,
                          obs_schema)

__all__ = ["FIELDS", "TARGET_COLUMNS", "EpisodeTargets", "Eviction", "ReplayStore", "Source", "bytes_per_step"]

Source = Literal["online", "offline"]


class ReplayStore:
    """Online (FIFO ring) and offline (demo) step buffers per task; see the module docstring."""

    def __init__(
        self,
        task_ids: list[str],
        obs: "int | Sequence[TensorInfo]",
        act_dim: int,
        online_capacity: int = 200_000,
        offline_capacity: int = 200_000,
        episode_targets: EpisodeTargets | None = None,
        compressed: Sequence[str] = (),
    ) -> None:
        """``obs``: the observation tensors (:class:`~fleetloop.specs.TensorInfo`, in spec order), or
        a width for one float32 ``state`` vector. ``episode_targets``: keep the per-row episode
        target columns (module docstring) computed by this function; None (HG-DAgger) keeps none.
        ``compressed``: image tensors the online rings store as frame cells (module docstring)."""
        if not task_ids or len(set(task_ids)) != len(task_ids):
            raise InvalidArgument(f"task_ids must be non-empty and unique, got {task_ids}", field="task_ids", value=task_ids)
        self.schema = obs_schema(obs)
        sizes = [("obs_dim", sum(t.size for t in self.schema)), ("act_dim", act_dim),
                 ("online_capacity", online_capacity), ("offline_capacity", offline_capacity)]
        for name, v in sizes:
            if int(v) < 1:
                raise InvalidArgument(f"{name} must be >= 1, got {v}", field=name, value=v)
        if not self.schema or len({t.name for t in self.schema}) != len(self.schema):
            raise InvalidArgument(f"observation tensor names must be unique, got {[t.name for t in self.schema]}",
                                  field="observation_specs", value=[t.name for t in self.schema])
        bad = [n for n in compressed if n not in {t.name for t in self.schema if frames_per_step(t) is not None}]
        if bad:
            raise InvalidArgument(f"compressed names {bad[0]!r}, not an image tensor [..., H, W, C] uint8 of the store",
                                  field="compressed", value=bad[0])
        self.compressed = tuple(compressed)
        self.task_ids = list(task_ids)
        self.act_dim = int(act_dim)
        self.online_capacity, self.offline_capacity = int(online_capacity), int(offline_capacity)
        self.episode_targets = episode_targets
        on = episode_targets is not None
        self._buffers: dict[tuple[str, str], Ring] = {}
        for task in self.task_ids:
            self._buffers[(task, "online")] = Ring(self.schema, self.act_dim, self.online_capacity, evict=True, targets=on,
                                                   frames=self.compressed)
            self._buffers[(task, "offline")] = Ring(self.schema, self.act_dim, self.offline_capacity, evict=False,
                                                       targets=on)
        self._lock = threading.Lock()

    # -- validation ---------------------------------------------------------------------------------
    def _buffer(self, task_id: str, source: str) -> Ring:
        try:
            return self._buffers[(task_id, source)]
        except KeyError:
            if source not in ("online", "offline"):
                raise InvalidArgument(f"source must be 'online' or 'offline', got {source!r}", field="source", value=source) from None
            raise InvalidArgument(f"unknown task {task_id!r}; this job's tasks are {self.task_ids}",
                                  field="task_id", value=task_id) from None

    @property
    def obs_dim(self) -> int:
        """Elements of one step's observation (all tensors, flattened)."""
        return sum(t.size for t in self.schema)

    def _obs_map(self, obs: Any) -> Mapping[str, Any]:
        if isinstance(obs, Mapping):
            return obs
        if len(self.schema) != 1:
            raise InvalidArgument(f"obs must map each of {[t.name for t in self.schema]} to an array, got one array",
                                  field="obs", value=type(obs).__name__)
        return {self.schema[0].name: obs}

    def _rows(self, obs, actions, rewards, interventions, frames: Mapping[str, int] | tuple = ()) -> dict[str, np.ndarray]:
        """Checked rows: ``obs`` maps every tensor name to ``[T, *shape]`` (a bare array: a
        one-tensor store, ``[T, width]``), cast to the tensor's dtype; floats must be finite. A
        tensor in ``frames`` (the buffer's frame columns) becomes frame cells (:func:`learner.frames.to_cells`)."""
        obs = self._obs_map(obs)
        unknown = sorted(set(obs) - {t.name for t in self.schema})
        if unknown:
            raise InvalidArgument(f"obs has unknown tensor {unknown[0]!r}; the store holds {[t.name for t in self.schema]}",
                                  field=f"obs[{unknown[0]}]", value=unknown[0])
        rows: dict[str, np.ndarray] = {}
        t = -1
        for info in self.schema:
            if info.name not in obs:
                raise InvalidArgument(f"obs lacks tensor {info.name!r}", field=f"obs[{info.name}]", value=None)
            if info.name in frames:
                t = np.shape(obs[info.name])[0] if t < 0 and np.ndim(obs[info.name]) else t
                rows[OBS_PREFIX + info.name] = to_cells(obs[info.name], info, max(t, 0))
                continue
            if getattr(obs[info.name], "dtype", None) == object:
                raise InvalidArgument(f"obs[{info.name}] holds encoded frames; this buffer stores decoded ones",
                                      field=f"obs[{info.name}]", value="frames")
            arr = np.asarray(obs[info.name], dtype=info.dtype)
            if arr.ndim == 2 and len(info.shape) != 1 and arr.shape[1] == info.size:
                arr = arr.reshape(arr.shape[0], *info.shape)  # flattened rows of a shaped tensor
            t = arr.shape[0] if t < 0 and arr.ndim else t
            if arr.ndim == 0 or arr.shape != (t, *info.shape):
                raise InvalidArgument(f"obs[{info.name}] must be [{max(t, 0)}, {', '.join(map(str, info.shape))}], got shape "
                                      f"{arr.shape}", field=f"obs[{info.name}]", value=list(arr.shape))
            if arr.dtype.kind == "f" and not np.isfinite(arr).all():
                raise InvalidArgument(f"obs[{info.name}] contains NaN or inf", field=f"obs[{info.name}]", value="non-finite")
            rows[OBS_PREFIX + info.name] = arr
        actions = np.asarray(actions, dtype=np.float32)
        if actions.shape != (t, self.act_dim):
            raise InvalidArgument(f"actions must be [{t}, {self.act_dim}], got shape {actions.shape}", field="actions", value=actions.shape)
        rewards = np.asarray(rewards, dtype=np.float32).reshape(-1)
        interventions = np.asarray(interventions, dtype=np.bool_).reshape(-1)
        for name, arr in (("rewards", rewards), ("interventions", interventions)):
            if arr.shape != (t,):
                raise InvalidArgument(f"{name} must have shape ({t},), got {arr.shape}", field=name, value=arr.shape)
        for name, arr in (("actions", actions), ("rewards", rewards)):
            if not np.isfinite(arr).all():
                raise InvalidArgument(f"{name} contains NaN or inf", field=name, value="non-finite")
        rows.update(actions=actions, rewards=rewards, interventions=interventions)
        return rows

    # -- writes -------------------------------------------------------------------------------------
    def add_online(
        self,
        task_id: str,
        obs: np.ndarray,
        actions: np.ndarray,
        rewards: np.ndarray,
        interventions: np.ndarray,
        behavior_version: int,
        episode_key: int,
        first_step: int,
        now: float | None = None,
    ) -> Eviction:
        """Append a chunk of T online steps (step indices ``first_step .. first_step+T-1``).

        Every step records ``behavior_version`` (invariant 1) and the insertion time ``now``
        (default ``time.time()``). Full ring: the oldest steps are evicted; returns what was evicted
        (and how much of it was never sampled). Bad shapes or non-finite values raise
        InvalidArgument before anything is stored.
        """
        buf = self._buffer(task_id, "online")
        rows = self._rows(obs, actions, rewards, interventions, buf.frames)
        t = rows["rewards"].shape[0]
        rows["versions"] = np.full(t, int(behavior_version), dtype=np.int64)
        rows["episode_keys"] = np.full(t, int(episode_key), dtype=np.int64)
        rows["steps"] = np.arange(int(first_step), int(first_step) + t, dtype=np.int64)
        rows["insert_times"] = np.full(t, time.time() if now is None else float(now), dtype=np.float64)
        with self._lock:
            if self.episode_targets is None:
                return buf.add(rows)
            w0, steps = buf.written, rows["steps"]
            ev = buf.add(rows)
            kept = buf.written - w0  # a chunk longer than the ring (or its byte share) keeps its newest rows
            if kept:
                buf.track(int(episode_key), steps[t - kept:], w0 + np.arange(kept, dtype=np.int64))
            return ev

    def end_episode(self, task_id: str, episode_key: int, outcome: str | None, length: int = 0) -> int:
        """The online episode ``episode_key`` of ``task_id`` ended with ``outcome`` after ``length``
        steps: write its episode target columns into its rows still stored (no-op without
        ``episode_targets``, or for an episode with no stored step). Returns the rows labelled."""
        buf = self._buffer(task_id, "online")
        if self.episode_targets is None:
            return 0
        with self._lock:
            return buf.end(int(episode_key), outcome, int(length), self.episode_targets)

    def open_episodes(self, task_id: str) -> int:
        """Online episodes of ``task_id`` with stored steps and no outcome yet (0 without targets)."""
        buf = self._buffer(task_id, "online")
        with self._lock:
            return len(buf.open)

    def set_online_capacity(self, capacity: int, max_bytes: int | None = None) -> None:
        """Resize every online ring to ``capacity`` steps (and, with compressed tensors, at most
        ``max_bytes`` bytes each); only before any online step was added (the learner sizes its rings
        from its memory budget once the demos are loaded)."""
        if int(capacity) < 1:
            raise InvalidArgument(f"online capacity must be >= 1, got {capacity}", field="online_capacity", value=capacity)
        with self._lock:
            for task in self.task_ids:
                self._buffers[(task, "online")].resize(int(capacity), max_bytes)
            self.online_capacity = int(capacity)

    def nbytes(self, task_id: str | None = None, source: Source | None = None) -> int:
        """Allocated bytes of one buffer, or of all buffers matching the given task / source."""
        with self._lock:
            return sum(b.nbytes for (t, s), b in self._buffers.items()
                       if (task_id is None or t == task_id) and (source is None or s == source))

    def add_offline(
        self,
        task_id: str,
        obs: np.ndarray,
        actions: np.ndarray,
        rewards: np.ndarray,
        interventions: np.ndarray,
        episode_key: int = -1,
        now: float | None = None,
        outcome: str | None = None,
    ) -> None:
        """Append one demonstration episode (step indices 0..T-1, behaviour version -1).

        ``outcome`` (the dataset manifest's, e.g. "success") labels the episode target columns at
        once when the store keeps them; None leaves them unknown. Raises ResourceExhausted naming
        the task if the offline buffer would overflow.
        """
        buf = self._buffer(task_id, "offline")
        rows = self._rows(obs, actions, rewards, interventions)
        t = rows["rewards"].shape[0]
        rows["versions"] = np.full(t, -1, dtype=np.int64)
        rows["episode_keys"] = np.full(t, int(episode_key), dtype=np.int64)
        rows["steps"] = np.arange(t, dtype=np.int64)
        rows["insert_times"] = np.full(t, time.time() if now is None else float(now), dtype=np.float64)
        with self._lock:
            try:
                w0 = buf.written
                buf.add(rows)
                if self.episode_targets is not None and outcome is not None:
                    buf.label(w0 + np.arange(t, dtype=np.int64), t, outcome, self.episode_targets)
            except OverflowError:
                raise ResourceExhausted(
                    f"offline buffer of task {task_id!r} holds {buf.size} of {buf.capacity} steps; "
                    f"cannot add {t} more (raise offline_capacity)", field="offline_capacity", value=buf.capacity) from None

    # -- reads --------------------------------------------------------------------------------------
    def size(self, task_id: str, source: Source, interventions_only: bool = False) -> int:
        """Live steps of one buffer (only intervention steps if ``interventions_only``). O(1)."""
        buf = self._buffer(task_id, source)
        with self._lock:
            return buf.iv_size if interventions_only else buf.size

    def sample(
        self, task_id: str, source: Source, n: int, rng: np.random.Generator, interventions_only: bool = False,
    ) -> dict[str, np.ndarray]:
        """``n`` steps drawn uniformly with replacement: a dict with the keys of :data:`FIELDS`
        (``obs`` is a dict: tensor name -> ``[n, *shape]``), plus, with ``episode_targets``, those of
        :data:`TARGET_COLUMNS` and ``recap_next_obs.<name>`` per observation tensor.

        ``interventions_only`` samples among intervention steps only. FailedPrecondition naming the
        task and source if there is nothing eligible to sample (and ``n > 0``).
        """
        buf = self._buffer(task_id, source)
        if n < 0:
            raise InvalidArgument(f"n must be >= 0, got {n}", field="n", value=n)
        with self._lock:
            avail = buf.iv_size if interventions_only else buf.size
            if avail == 0 and n > 0:
                what = "intervention steps" if interventions_only else "steps"
                raise FailedPrecondition(f"task {task_id!r} has no {source} {what} to sample", field="task_id", value=task_id)
            slots = buf.sample_slots(n, rng, interventions_only) if n else np.zeros(0, dtype=np.int64)
            out: dict[str, Any] = {k: v[slots] for k, v in buf.data.items() if k != FRAME_BYTES}
            if buf.targets:
                buf.gather_targets(out, slots)
        out["obs"] = {t.name: out.pop(OBS_PREFIX + t.name) for t in self.schema}
        return out

    def stats(self) -> dict[str, dict[str, int]]:
        """Per task: ``{online,offline}_{steps,interventions}``, ``online_evicted``, ``online_evicted_unsampled``,
        ``online_added``, ``offline_added``, ``{online,offline}_bytes``."""
        with self._lock:
            out = {}
            for task in self.task_ids:
                on, off = self._buffers[(task, "online")], self._buffers[(task, "offline")]
                out[task] = {
                    "online_steps": on.size, "online_interventions": on.iv_size, "online_evicted": on.evicted,
                    "online_evicted_unsampled": on.evicted_unsampled, "online_added": on.added, "online_bytes": on.nbytes,
                    "offline_steps": off.size, "offline_interventions": off.iv_size, "offline_added": off.added,
                    "offline_bytes": off.nbytes,
                }
            return out

    # -- checkpoints --------------------------------------------------------------------------------
    def export(self, task_id: str, source: Source) -> dict[str, np.ndarray]:
        """Copies of one buffer's live steps, oldest first (for checkpoints; restore by re-adding).
        Flat keys: the observation is one ``obs.<name>`` array per tensor."""
        buf = self._buffer(task_id, source)
        with self._lock:
            return buf.ordered()

    def restore(self, task_id: str, source: Source, arrays: dict[str, np.ndarray], evicted: int = 0) -> None:
        """Append steps exported by :meth:`export` (all :data:`FIELDS` required; the observation as
        ``obs.<name>`` arrays, or one ``obs`` array for a one-tensor store), keeping their versions,
        episode keys, step indices and insertion times; ``evicted`` is added to the count. Episode
        target columns restart unknown (the log replay at restart relabels ended episodes)."""
        buf = self._buffer(task_id, source)
        obs = arrays["obs"] if "obs" in arrays else {t.name: arrays[OBS_PREFIX + t.name] for t in self.schema
                                                     if OBS_PREFIX + t.name in arrays}
        missing = [k for k in FIELDS if k != "obs" and k not in arrays] + ([] if len(obs) else ["obs"])
        if missing:
            raise InvalidArgument(f"restore of {task_id!r}/{source} lacks fields {missing}", field="arrays", value=missing)
        rows = self._rows(obs, arrays["actions"], arrays["rewards"], arrays["interventions"], buf.frames)
        t = rows["rewards"].shape[0]
        for k, dt in (("versions", np.int64), ("episode_keys", np.int64), ("steps", np.int64), ("insert_times", np.float64)):
            rows[k] = np.asarray(arrays[k], dtype=dt).reshape(-1)
            if rows[k].shape != (t,):
                raise InvalidArgument(f"{k} must have shape ({t},), got {rows[k].shape}", field=k, value=rows[k].shape)
        with self._lock:
            try:
                buf.add(rows)
            except OverflowError:
                raise ResourceExhausted(f"restore of {t} steps overflows {task_id!r}/{source} (capacity {buf.capacity})",
                                        field=f"{source}_capacity", value=buf.capacity) from None
            buf.evicted += int(evicted)
