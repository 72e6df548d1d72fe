"""One ring of step rows: preallocated numpy columns, FIFO eviction and an intervention index.

:class:`Ring` is the storage of :class:`learner.replay.ReplayStore` (two per task: an online FIFO
ring and an offline demonstration buffer). It holds one row per step with the fields of
:data:`FIELDS` (the observation as one column ``obs.<name>`` per observation tensor, in that
tensor's own dtype and per-step shape -- camera frames stay uint8 ``[H, W, C]`` --, ``actions``
[act_dim] f32, ``rewards`` f32, ``interventions`` bool, ``versions`` i64, ``episode_keys`` i64,
``steps`` i64, ``insert_times`` f64) and, with ``targets``, the episode target columns of :data:`TARGET_COLUMNS` plus an internal
column: the write number of each row's N-step bootstrap row. It neither locks nor validates: the
store does both.

Invariants:

- Write number ``w`` (0, 1, 2, ... over the ring's life) lives in slot ``w % capacity``; the live
  rows are the newest ``size`` write numbers, ``[written - size, written)``.
- An evicting ring is FIFO: when full, the oldest rows are evicted first and counted in
  ``evicted``; a chunk longer than the capacity keeps its newest ``capacity`` rows (the rest count
  as evicted, never sampled). A non-evicting buffer never evicts: overflowing it raises
  OverflowError before anything is stored.
- Appending T rows is amortised O(T): arrays grow geometrically up to the capacity (an empty ring
  allocates nothing), then wrap; a ring never holds more than ``capacity`` rows of
  :func:`bytes_per_step` bytes (plus, with frame columns, the live frames' bytes below).
- Frame columns (``frames``, :mod:`learner.frames`): such an observation tensor's column holds
  *cells* (an object array ``[rows, k]``: encoded frames as bytes, or uint8 arrays for frames that
  arrived raw) and each row's cell bytes (:func:`learner.frames.cell_bytes`); ``frame_bytes`` is
  the sum over live rows, and an evicted row's cells are released at once. With ``max_bytes``,
  ``nbytes`` (allocated arrays + ``frame_bytes``) never exceeds it: the frames may use
  ``max_bytes - capacity x bytes_per_step`` (the fixed columns counted as if fully allocated), and
  an evicting ring evicts FIFO by rows *and* by bytes: an append first drops the oldest live rows
  until both the row capacity and that byte share hold (one eviction, counted in ``evicted`` like a
  row overflow); a chunk whose own frames exceed the share keeps its newest rows that fit (the rest
  count as evicted, never sampled). A non-evicting buffer raises OverflowError instead.
- The intervention index (a second FIFO ring of the slots holding intervention rows) gives O(1)
  intervention counts and O(n) uniform sampling of intervention rows. It stays exact under
  eviction because eviction is FIFO: the evicted intervention rows are always the oldest ones in
  the index, so eviction just advances its head.
- Every slot remembers whether it was sampled since it was written, so an eviction is reported as
  :class:`Eviction` ``(evicted, unsampled, ...)``.
- Episode target columns (``targets``): a new row starts unknown (``recap_adv_valid`` and
  ``recap_value_mask`` False, no bootstrap row). Open episodes map step index -> write number
  (step indices past 4 x capacity are not tracked); labelling writes only rows still live, and a
  bootstrap row never stored or no longer live leaves the row without an advantage.
"""

from __future__ import annotations

from typing import Callable, Mapping, NamedTuple, Sequence

import numpy as np

from fleetloop.errors import FailedPrecondition, InvalidArgument
from fleetloop.specs import TensorInfo, as_infos
from learner.frames import cell_bytes, frames_per_step

FIELDS = ("obs", "actions", "rewards", "interventions", "versions", "episode_keys", "steps", "insert_times")
_MIN_ALLOC = 1024
#: Column prefix of the observation tensors (``obs.<name>``) and of RECAP's bootstrap observation.
OBS_PREFIX, NEXT_OBS_PREFIX = "obs.", "recap_next_obs."
_SCALAR_BYTES = 4 + 1 + 8 + 8 + 8 + 8  # rewards f32, interventions bool, versions, episode_keys, steps, insert_times
#: Per-row episode target columns of a store with ``episode_targets`` (dtype), in sample order.
TARGET_COLUMNS: dict[str, type] = {"recap_mc_return": np.float32, "recap_value_mask": np.bool_,
                                   "recap_nstep_reward": np.float32, "recap_bootstrap": np.float32,
                                   "recap_adv_valid": np.bool_}
_NEXT = "_next_w"  # internal column: write number of the bootstrap observation's row (-1: none)
FRAME_BYTES = "_frame_bytes"  # internal column (rings with frame columns): bytes of the row's frame cells
_INTERNAL = (_NEXT, FRAME_BYTES)
_TARGET_BYTES = 4 + 1 + 4 + 4 + 1 + 8 + 8  # TARGET_COLUMNS, _NEXT, the open-episode map entry
#: ``(length, outcome) -> {column: [length] array}``: must return every key of TARGET_COLUMNS and ``recap_next_step``.
EpisodeTargets = Callable[[int, "str | None"], Mapping[str, np.ndarray]]


Schema = tuple[TensorInfo, ...]


def obs_schema(obs: "int | Sequence[TensorInfo]") -> Schema:
    """The observation tensors of a ring: a bare width means one float32 :data:`fleetloop.specs.DEFAULT_OBS_NAME` vector."""
    return tuple(as_infos(obs))


def bytes_per_step(obs: "int | Sequence[TensorInfo]", act_dim: int, targets: bool = False,
                   frames: Sequence[str] = ()) -> int:
    """Bytes one buffer row takes: every observation tensor in its own dtype (``obs``: the schema,
    or a float32 width), the other fields of :data:`FIELDS`, its intervention-index slot (i64) and
    its sampled flag (bool), plus the episode target columns with ``targets``. A tensor named in
    ``frames`` counts its cell pointers (8 bytes per frame) and the row's byte count (8): its frames
    themselves are counted as they are stored (``Ring.frame_bytes``). Capacity x this bounds a
    buffer's allocated arrays."""
    schema = obs_schema(obs)
    obs_bytes = sum(8 * frames_per_step(t) if t.name in frames else t.nbytes for t in schema)
    return obs_bytes + (8 if frames else 0) + 4 * int(act_dim) + _SCALAR_BYTES + 8 + 1 + (_TARGET_BYTES if targets else 0)


class Eviction(NamedTuple):
    """Steps one append pushed out of an online ring: all of them, those never sampled, the
    intervention steps among those never sampled, and the intervention steps evicted."""

    evicted: int = 0
    unsampled: int = 0
    unsampled_interventions: int = 0
    interventions: int = 0


class Ring:
    """One ring buffer of step rows with an intervention index (not locked, not validated: the
    caller, :class:`learner.replay.ReplayStore`, holds the lock and checks shapes and values).

    ``evict``: True for an online FIFO ring (a full ring drops its oldest rows), False for an
    offline buffer (a full one raises :class:`OverflowError`). ``targets``: also keep the episode
    target columns of :data:`TARGET_COLUMNS` and each row's bootstrap write number."""

    def __init__(self, obs: "int | Sequence[TensorInfo]", act_dim: int, capacity: int, evict: bool,
                 targets: bool = False, frames: Sequence[str] = (), max_bytes: int | None = None) -> None:
        """``frames``: observation tensors stored as frame cells; ``max_bytes``: bound on ``nbytes``
        (frame columns only; see the module docstring)."""
        self.capacity, self.evict, self.targets = capacity, evict, targets
        self.frames = {t.name: frames_per_step(t) for t in obs_schema(obs) if t.name in frames}
        self.frame_bytes, self.max_bytes = 0, None  # live frame cell bytes; bound on nbytes
        self.open: dict[int, np.ndarray] = {}   # targets: open episode key -> write number per step index (-1: none)
        self.open_last: dict[int, int] = {}     # targets: open episode key -> its newest write number
        self._prune_at = 256
        self.schema, self.act_dim = obs_schema(obs), act_dim
        self.size = 0          # live steps
        self.written = 0       # steps ever written; the slot of write number w is w % capacity
        self.evicted = 0       # steps evicted (or never stored because a chunk exceeded the capacity)
        self.added = 0         # steps ever offered to add()
        self.iv_size = 0       # live intervention steps
        self.iv_written = 0    # intervention steps ever indexed
        self.alloc = 0
        self.data: dict[str, np.ndarray] = {}
        self.iv_slots = np.zeros(0, dtype=np.int64)
        self.sampled = np.zeros(0, dtype=np.bool_)  # per slot: sampled since written
        self.evicted_unsampled = 0  # evicted (or truncated) steps that were never sampled
        self._grow(0)  # nothing allocated until the first add
        self.set_max_bytes(max_bytes)

    def set_max_bytes(self, max_bytes: int | None) -> None:
        """Bound ``nbytes`` (rings with frame columns); InvalidArgument naming ``max_bytes`` when the
        fixed columns at capacity leave no room for frames."""
        if max_bytes is not None and self.frames and self._frame_share(max_bytes) <= 0:
            raise InvalidArgument(f"max_bytes {max_bytes} leaves no room for frames beside {self.capacity} rows of "
                                  f"{self.row_bytes} bytes", field="max_bytes", value=max_bytes)
        self.max_bytes = None if max_bytes is None or not self.frames else int(max_bytes)

    @property
    def row_bytes(self) -> int:
        """:func:`bytes_per_step` of this ring (frame payloads excluded)."""
        return bytes_per_step(self.schema, self.act_dim, self.targets, tuple(self.frames))

    def _frame_share(self, max_bytes: int | None = None) -> int | None:
        """Bytes the frames may take: ``max_bytes`` less the fixed columns at capacity (None: unbounded)."""
        limit = self.max_bytes if max_bytes is None else max_bytes
        return None if limit is None else int(limit) - self.capacity * self.row_bytes

    def _grow(self, alloc: int) -> None:
        # Only called before the ring wraps (alloc < capacity), so slots [0, alloc) are in order.
        shapes: dict[str, tuple[int, ...]] = {OBS_PREFIX + t.name: (alloc, *t.shape) for t in self.schema}
        shapes["actions"] = (alloc, self.act_dim)
        shapes.update({OBS_PREFIX + n: (alloc, k) for n, k in self.frames.items()})
        dtypes = {OBS_PREFIX + t.name: np.dtype(object if t.name in self.frames else t.dtype) for t in self.schema}
        if self.frames:
            dtypes[FRAME_BYTES] = np.int64
        dtypes.update({"actions": np.float32, "rewards": np.float32, "interventions": np.bool_,
                       "versions": np.int64, "episode_keys": np.int64, "steps": np.int64, "insert_times": np.float64})
        if self.targets:
            dtypes.update(TARGET_COLUMNS)
            dtypes[_NEXT] = np.int64
        new = {k: np.zeros(shapes.get(k, (alloc,)), dtype=dt) for k, dt in dtypes.items()}
        for k, old in self.data.items():
            new[k][: self.alloc] = old
        iv = np.zeros(alloc, dtype=np.int64)
        iv[: self.alloc] = self.iv_slots
        sampled = np.zeros(alloc, dtype=np.bool_)
        sampled[: self.alloc] = self.sampled
        self.data, self.iv_slots, self.sampled, self.alloc = new, iv, sampled, alloc

    @property
    def nbytes(self) -> int:
        """Bytes of the arrays this buffer holds (allocated, not just live), plus its live frames."""
        return sum(a.nbytes for a in self.data.values()) + self.iv_slots.nbytes + self.sampled.nbytes + self.frame_bytes

    def resize(self, capacity: int, max_bytes: int | None = None) -> None:
        """Change the capacity (and the byte bound) of an empty buffer (nothing ever written)."""
        if self.written:
            raise FailedPrecondition(f"cannot resize a buffer that holds data ({self.size} steps)", field="capacity", value=capacity)
        self.capacity, self.alloc, self.data = int(capacity), 0, {}
        self.iv_slots, self.sampled = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.bool_)
        self._grow(0)
        self.set_max_bytes(max_bytes)

    def _put(self, arr: np.ndarray, start: int, values: np.ndarray) -> None:
        """Write ``values`` at ring position ``start`` (mod capacity), splitting at the wrap point."""
        start %= self.capacity
        n = values.shape[0]
        first = min(n, self.capacity - start)
        arr[start:start + first] = values[:first]
        if first < n:
            arr[: n - first] = values[first:]

    def add(self, rows: dict[str, np.ndarray]) -> Eviction:
        """Append ``rows`` (every ``obs.<name>`` column and the other :data:`FIELDS` keys, T rows
        each) at the write head; returns what the append evicted. Raises OverflowError, storing
        nothing, if a non-evicting buffer would overflow."""
        t = rows["rewards"].shape[0]
        share = self._frame_share()
        if self.frames:
            rows[FRAME_BYTES] = sum(cell_bytes(rows[OBS_PREFIX + n]) for n in self.frames) + np.zeros(t, np.int64)
        if not self.evict and (self.size + t > self.capacity or
                               (share is not None and self.frame_bytes + int(rows[FRAME_BYTES].sum()) > share)):
            raise OverflowError
        if self.targets:  # new rows start unknown (no advantage, no value target, no bootstrap row)
            for key, dt in TARGET_COLUMNS.items():
                rows.setdefault(key, np.zeros(t, dtype=dt))
            rows.setdefault(_NEXT, np.full(t, -1, dtype=np.int64))
        self.added += t
        evicted = unsampled = unsampled_iv = evicted_iv = 0
        keep = min(t, self.capacity)  # only the newest `capacity` steps (and frames within the share) can be kept
        if share is not None:
            keep = min(keep, int(np.searchsorted(np.cumsum(rows[FRAME_BYTES][::-1]), share, side="right")))
        if keep < t:
            evicted = unsampled = t - keep
            unsampled_iv = evicted_iv = int(np.count_nonzero(rows["interventions"][: t - keep]))
            rows = {k: v[t - keep:] for k, v in rows.items()}
            t = keep
        overflow = self.size + t - self.capacity
        if share is not None:
            overflow = max(overflow, self._rows_to_free(self.frame_bytes + int(rows[FRAME_BYTES].sum()) - share))
        if overflow > 0:
            oldest = self.written - self.size
            gone = (oldest + np.arange(overflow)) % self.capacity
            gone_iv = self.data["interventions"][gone]
            never = ~self.sampled[gone]
            evicted_iv += int(np.count_nonzero(gone_iv))
            self.iv_size -= int(np.count_nonzero(gone_iv))
            self.size -= overflow
            evicted += overflow
            unsampled += int(np.count_nonzero(never))
            unsampled_iv += int(np.count_nonzero(never & gone_iv))
            if self.frames:  # release the evicted frames now, not when their slots are next written
                self.frame_bytes -= int(self.data[FRAME_BYTES][gone].sum())
                for name in self.frames:
                    self.data[OBS_PREFIX + name][gone] = None
        if self.frames:
            self.frame_bytes += int(rows[FRAME_BYTES].sum())
        self.evicted += evicted
        self.evicted_unsampled += unsampled
        need = min(self.capacity, self.written + t)
        if need > self.alloc:
            self._grow(min(self.capacity, max(need, 2 * self.alloc, _MIN_ALLOC)))
        for key, values in rows.items():
            self._put(self.data[key], self.written, values)
        self._put(self.sampled, self.written, np.zeros(t, dtype=np.bool_))
        iv_new = (self.written + np.flatnonzero(rows["interventions"])) % self.capacity
        if iv_new.size:
            self._put(self.iv_slots, self.iv_written, iv_new)
            self.iv_written += iv_new.size
            self.iv_size += iv_new.size
        self.written += t
        self.size += t
        return Eviction(evicted, unsampled, unsampled_iv, evicted_iv)

    def _rows_to_free(self, excess: int) -> int:
        """How many of the oldest live rows hold at least ``excess`` frame bytes (all live rows at most)."""
        if excess <= 0:
            return 0
        oldest, done, freed, block = self.written - self.size, 0, 0, 64
        while done < self.size:
            m = min(block, self.size - done)
            c = np.cumsum(self.data[FRAME_BYTES][(oldest + done + np.arange(m)) % self.capacity]) + freed
            i = int(np.searchsorted(c, excess, side="left"))
            if i < m:
                return done + i + 1
            done, freed, block = done + m, int(c[-1]), 2 * block
        return self.size

    def sample_slots(self, n: int, rng: np.random.Generator, interventions_only: bool) -> np.ndarray:
        """``n`` live slots drawn uniformly with replacement (among intervention rows only with
        ``interventions_only``; the caller checks there is one), marked as sampled."""
        if interventions_only:
            pos = (self.iv_written - self.iv_size + rng.integers(0, self.iv_size, n)) % self.capacity
            slots = self.iv_slots[pos]
        else:
            slots = (self.written - self.size + rng.integers(0, self.size, n)) % self.capacity
        self.sampled[slots] = True
        return slots

    def ordered(self) -> dict[str, np.ndarray]:
        """Copies of the live steps, oldest first (target columns included, the internal bootstrap row
        and frame byte counts not; frame cells are copied as references to the same immutable frames)."""
        slots = (self.written - self.size + np.arange(self.size)) % self.capacity
        return {k: v[slots] for k, v in self.data.items() if k not in _INTERNAL}

    # -- episode target columns (only with ``targets``) ---------------------------------------------
    def live(self, w: np.ndarray) -> np.ndarray:
        """Bool per write number: the row written as ``w`` is still stored (FIFO: the newest ``size``)."""
        return (w >= self.written - self.size) & (w >= 0) & (w < self.written)

    def track(self, key: int, steps: np.ndarray, w: np.ndarray) -> None:
        """Remember where the open episode ``key``'s steps were written (write numbers ``w``)."""
        arr = self.open.get(key)
        need = int(steps.max()) + 1
        if need > 4 * self.capacity + 4096:  # absurd step index: never allocate for it (rows stay unknown)
            return
        if arr is None or arr.size < need:
            grown = np.full(max(need, 2 * (0 if arr is None else arr.size), 64), -1, dtype=np.int64)
            if arr is not None:
                grown[: arr.size] = arr
            self.open[key] = arr = grown
        arr[steps] = w
        self.open_last[key] = int(w[-1])
        if len(self.open) > self._prune_at:  # episodes that never ended (actor gone) and are fully evicted
            oldest = self.written - self.size
            for k in [k for k, last in self.open_last.items() if last < oldest]:
                del self.open[k], self.open_last[k]
            self._prune_at = max(256, 2 * len(self.open))

    def label(self, where: np.ndarray, length: int, outcome: str | None, fn: EpisodeTargets) -> int:
        """Write an episode's target columns into its live rows. ``where``: write number per step
        index (-1: not stored); ``length``: the episode's step count as reported (the longest stored
        step index + 1 if larger). Returns the rows labelled."""
        stored = np.flatnonzero(where >= 0)
        if not stored.size:
            return 0
        length = max(int(length), int(stored[-1]) + 1)
        cols = fn(length, outcome)
        w = where[stored]
        alive = self.live(w)
        stored, w = stored[alive], w[alive]
        if not stored.size:
            return 0
        slots = w % self.capacity
        for key in TARGET_COLUMNS:
            self.data[key][slots] = cols[key][stored]
        nxt = np.asarray(cols["recap_next_step"])[stored]
        inside = (nxt >= 0) & (nxt < where.size)
        next_w = np.where(inside, where[np.where(inside, nxt, 0)], -1)
        next_w = np.where(self.live(next_w), next_w, -1)  # never stored, or evicted: no bootstrap row
        self.data[_NEXT][slots] = next_w
        # a bootstrapped window whose last observation was never stored (dropped at ingest): no advantage
        missing = (self.data["recap_bootstrap"][slots] > 0) & (next_w < 0)
        self.data["recap_adv_valid"][slots[missing]] = False
        return int(stored.size)

    def end(self, key: int, outcome: str | None, length: int, fn: EpisodeTargets) -> int:
        """Close the open episode ``key``: label its live rows (see :meth:`label`); 0 if unknown."""
        where = self.open.pop(key, None)
        self.open_last.pop(key, None)
        return 0 if where is None else self.label(where, length, outcome, fn)

    def gather_targets(self, out: dict[str, np.ndarray], slots: np.ndarray) -> None:
        """Complete a sample's target columns in place: replace the internal bootstrap row by the
        ``recap_next_obs.<name>`` columns (one per observation tensor) and mark samples whose
        bootstrap row is gone as unknown."""
        next_w = out.pop(_NEXT)
        need = out["recap_adv_valid"] & (out["recap_bootstrap"] > 0)
        ok = need & self.live(next_w)
        rows = np.where(ok, next_w % self.capacity, slots)
        for t in self.schema:
            out[NEXT_OBS_PREFIX + t.name] = self.data[OBS_PREFIX + t.name][rows]
        out["recap_adv_valid"] = out["recap_adv_valid"] & (ok | ~need)
