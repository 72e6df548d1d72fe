"""EpisodeRecorder: one episode's steps -> EpisodeChunks in the spool (``from fleetloop.client.runtime import
EpisodeRecorder`` keeps working; :class:`~fleetloop.client.runtime.FleetClient.begin_episode` makes them).

Size contract: no chunk this recorder seals is larger than the learner's ``max_message_bytes``
(announced in the handshake's RunConfig; 0 = none announced, no size limit here). See
:class:`EpisodeRecorder` for how the size is estimated and what happens to a step that alone does
not fit.
"""

from __future__ import annotations

import itertools
import time
from typing import TYPE_CHECKING, Mapping

import numpy as np

from fleetloop.client.limits import announced_limit, over_limit, report_oversized
from fleetloop import image_codec
from fleetloop.codec import encode
from fleetloop.errors import InvalidArgument
from fleetloop.v1 import fleetloop_pb2 as pb

if TYPE_CHECKING:
    from fleetloop.client.runtime import FleetClient

_OUTCOMES = {"success": pb.SUCCESS, "failure": pb.FAILURE, "timeout": pb.TIMEOUT, "aborted": pb.ABORTED}
#: Bytes one encoded frame adds beyond its own length (field tag + length varint).
_FRAME_OVERHEAD = 6
#: Bytes a tensor's framing can grow from zero steps to many (data tag + length, the shape's time
#: dimension, the Tensor's and its map entry's length varints: at most 18).
_TENSOR_MARGIN = 24
#: Bytes the chunk's header can grow beyond the empty chunk measured once (seq, first_step varints).
_CHUNK_MARGIN = 64


def _np_dtype(spec) -> np.dtype:
    from fleetloop.codec import WIRE_DTYPES
    return WIRE_DTYPES.get(int(spec.dtype), np.dtype("<f4"))


def _empty_tensors(specs, target) -> None:
    """Fill a chunk's tensor map with zero-step tensors of each spec (well-formed, no data)."""
    for s in specs:
        encode(np.zeros((0, *s.shape), dtype=_np_dtype(s)), target[s.name])


class _Rows:
    """One chunk's rows of the tensors of ``specs``, preallocated as ``[chunk_steps, *spec.shape]``
    arrays in the spec's dtype and reused chunk after chunk (a step is one row write, not a list
    entry np.stack'ed at the seal). A value whose shape differs from its spec, or whose dtype does
    not cast to the spec's within its kind (float64 -> float32 does; float -> uint8 does not), is
    refused with InvalidArgument naming ``<what>[<name>]`` before anything is written."""

    def __init__(self, specs, capacity: int, what: str) -> None:
        self.specs, self.what = list(specs), what
        self.shapes = {s.name: tuple(int(d) for d in s.shape) for s in self.specs}
        self.arrays = {s.name: np.empty((capacity, *self.shapes[s.name]), dtype=_np_dtype(s)) for s in self.specs}
        first = self.specs[0].name if len(self.specs) == 1 else None
        self._single = (first, self.shapes[first], self.arrays[first]) if first is not None else None

    def row_bytes(self, skip: Mapping[str, str] | None = None) -> int:
        """Raw bytes of one step of every tensor (those named in ``skip`` left out)."""
        return sum(int(arr[0].nbytes) for name, arr in self.arrays.items() if not skip or name not in skip)

    def put(self, i: int, value) -> None:
        """Write step ``i``: a mapping by spec name, or (one spec only) its array."""
        if type(value) is np.ndarray and self._single is not None:  # the common case, kept cheap (~1 us)
            name, shape, target = self._single
            if value.shape == shape and value.dtype == target.dtype:
                target[i] = value
                return
            target[i] = self._checked(name, value)
            return
        if isinstance(value, Mapping):
            items = [(s.name, value[s.name]) for s in self.specs]
        elif len(self.specs) == 1:
            items = [(self.specs[0].name, value)]
        else:
            raise InvalidArgument(f"{self.what} is one array but the job declares {len(self.specs)} {self.what} tensors "
                                  f"({[s.name for s in self.specs]}); pass a mapping by name", field=self.what,
                                  value=type(value).__name__)
        checked = [(name, self._checked(name, v)) for name, v in items]
        for name, arr in checked:
            self.arrays[name][i] = arr

    def _checked(self, name: str, value) -> np.ndarray:
        arr = np.asarray(value)
        target = self.arrays[name]
        if arr.shape != self.shapes[name]:
            raise InvalidArgument(f"{self.what}[{name!r}] has shape {list(arr.shape)}; its spec says "
                                  f"{list(self.shapes[name])}", field=f"{self.what}[{name}]", value=list(arr.shape))
        if arr.dtype != target.dtype and not np.can_cast(arr.dtype, target.dtype, "same_kind"):
            raise InvalidArgument(f"{self.what}[{name!r}] is {arr.dtype}; its spec says {target.dtype}",
                                  field=f"{self.what}[{name}]", value=str(arr.dtype))
        return arr

    def move(self, src: int, dst: int) -> None:
        """Copy row ``src`` of every tensor to row ``dst``."""
        for arr in self.arrays.values():
            arr[dst] = arr[src]

    def views(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """Rows ``start:stop`` of each tensor (views: encode them before the next chunk reuses the rows)."""
        return {name: arr[start:stop] for name, arr in self.arrays.items()}


class EpisodeRecorder:
    """Records one episode's steps and spools them in chunks.

    A chunk is sealed (encoded, spooled, handed to the sender) when it holds ``chunk_steps`` steps,
    or when ``max_chunk_wait_s`` (RunConfig; 0 = no limit) has passed since its first step, and at
    the episode's end. The seal happens when the next step is recorded (or at ``end``), so the end
    chunk always carries steps unless the episode had none; a step therefore waits at most
    ``min((chunk_steps - 1) / hz, max_chunk_wait_s)`` plus one step period before it is sent.

    Size: a sealed chunk is never larger than the learner's ``max_message_bytes`` (RunConfig; 0 =
    none announced: no size limit). Each step's bytes are known when it is recorded: the raw
    tensors' bytes from their specs, plus the exact length of each camera frame, which is
    compressed (``image_encoding``) when the step is recorded, not at the seal. The chunk's own
    framing is measured once per episode (an empty chunk with an end, ``ByteSize``) plus a margin of
    24 bytes per tensor and 64 per chunk for the length fields that grow. When the next step would
    push the chunk past the limit, the chunk is sealed first (split by steps: ``seq`` stays
    0, 1, 2, ... and each chunk's ``first_step`` is the previous one's plus its steps). The real
    serialized size is checked at the seal; a chunk the estimate got wrong is split in halves.

    A step that alone is larger than the limit cannot be split: it is *set aside*, i.e. dropped,
    never spooled nor sent: ``oversized_steps`` (and ``fleetloop_actor_oversized_steps_total{task}``
    when the client has metrics) counts it, one ``event=step_oversized`` line (level error) names
    the episode, seq, estimated size and limit. The episode goes on: the steps sent stay
    contiguous (the dropped step takes no step index on the wire), ``steps`` and the end chunk's
    ``length`` count the steps sent, ``total_reward`` (the episode's return) still includes the
    dropped step's reward, and the end chunk is sent as usual.
    """

    def __init__(self, client: "FleetClient", task_id: str, episode_id: str, version: int) -> None:
        self.client, self.task_id, self.episode_id, self.version = client, task_id, episode_id, version
        self.chunk_steps = client.run_config.chunk_steps
        self.max_chunk_wait_s = float(client.run_config.max_chunk_wait_s)
        self.max_message_bytes = announced_limit(client.run_config)
        self._images = getattr(client, "image_encoding", None) or {}  # obs name -> 'jpeg' | 'png' (bench fakes have none)
        self._quality = int(getattr(client, "jpeg_quality", 90))
        self.seq = 0
        self.steps = 0              # steps recorded into chunks (sent); set-aside steps not included
        self.oversized_steps = 0    # steps set aside: alone larger than max_message_bytes
        self.intervention_steps = 0
        self.total_reward = 0.0
        self._obs = _Rows(client.observation_specs, self.chunk_steps, "obs")
        self._act = _Rows(client.action_specs, self.chunk_steps, "action")
        self._rew = np.empty(self.chunk_steps, np.float32)
        self._int = np.empty(self.chunk_steps, np.bool_)
        self._frames: dict[str, list[list[bytes]]] = {name: [[] for _ in range(self.chunk_steps)] for name in self._images}
        self._raw_step_bytes = self._obs.row_bytes(skip=self._images) + self._act.row_bytes() + 4 + 1  # + reward, flag
        self._n = 0                 # steps in the chunk being recorded
        self._chunk_bytes = 0       # their estimated bytes
        self._first_step = 0
        self._t_first = 0.0         # wall clock of the chunk's first step (produced_at)
        self._t_first_mono = 0.0
        self._spooled_reward = 0.0  # reward of the steps already in the spool (for an abort after a crash)
        self.closed = False
        self._base_bytes = self._framing_bytes() if self.max_message_bytes is not None else 0

    def _framing_bytes(self) -> int:
        """Upper bound of a chunk's bytes besides its steps' data (see the class docstring)."""
        empty = self._build(0, 0, pb.EpisodeEnd(outcome=pb.TIMEOUT, total_reward=-1.0, length=(1 << 32) - 1))
        tensors = len(self._obs.specs) + len(self._act.specs) + 2
        return empty.ByteSize() + _TENSOR_MARGIN * tensors + _CHUNK_MARGIN

    def record(self, obs: np.ndarray | Mapping[str, np.ndarray], action: np.ndarray | Mapping[str, np.ndarray],
               reward: float, intervened: bool) -> None:
        """Add one step: the observation the action was chosen on, the action executed, the reward
        received, and whether the operator (not the policy) chose it. InvalidArgument (nothing
        recorded) when a tensor does not match its spec. A step that alone exceeds the learner's
        ``max_message_bytes`` is set aside (class docstring)."""
        if self.closed:
            raise InvalidArgument(f"episode {self.episode_id} is already closed", field="episode_id", value=self.episode_id)
        if self._n >= self.chunk_steps or (self._n and self.max_chunk_wait_s
                                           and time.monotonic() - self._t_first_mono >= self.max_chunk_wait_s):
            self._flush(end=None)
        i = self._n
        self._obs.put(i, obs)      # both checked before the step counts
        self._act.put(i, action)
        frames = {name: image_codec.encode_frames(self._obs.arrays[name][i], enc, quality=self._quality)
                  for name, enc in self._images.items()}
        step_bytes = self._raw_step_bytes + sum(len(f) + _FRAME_OVERHEAD for fs in frames.values() for f in fs)
        limit = self.max_message_bytes
        if over_limit(self._base_bytes + step_bytes, limit):
            self._set_aside(self._base_bytes + step_bytes, reward, self._first_step + i)
            return
        if i and over_limit(self._base_bytes + self._chunk_bytes + step_bytes, limit):
            self._flush(end=None)  # seal the steps before this one; this step opens the next chunk
            self._obs.move(i, 0)
            self._act.move(i, 0)
            i = 0
        for name, fs in frames.items():
            self._frames[name][i] = fs
        if i == 0:
            self._t_first, self._t_first_mono = time.time(), time.monotonic()
        self._rew[i] = reward
        self._int[i] = bool(intervened)
        self._n = i + 1
        self._chunk_bytes += step_bytes
        self.steps += 1
        self.intervention_steps += int(bool(intervened))
        self.total_reward += float(reward)

    def _set_aside(self, size: int, reward: float, step: int) -> None:
        """Drop a step that alone exceeds the limit (``step``: the index it would have had on the
        wire): count it, log it, keep its reward in the episode's return."""
        self.oversized_steps += 1
        self.total_reward += float(reward)
        c = self.client
        report_oversized("step", job=c.job_id, actor=c.actor_id, episode=self.episode_id, seq=self.seq, size=size,
                         limit=self.max_message_bytes, action="dropped", version=self.version, task=self.task_id,
                         step=step)
        metrics = getattr(c, "metrics", None)
        if metrics is not None:
            metrics.oversized_steps.labels(c.actor_id, self.task_id).inc()

    def end(self, outcome: str, total_reward: float | None = None) -> None:
        """Close the episode with ``success`` / ``failure`` / ``timeout`` / ``aborted``."""
        if outcome not in _OUTCOMES:
            raise InvalidArgument(f"outcome {outcome!r} is not one of {sorted(_OUTCOMES)}", field="outcome", value=outcome)
        end = pb.EpisodeEnd(outcome=_OUTCOMES[outcome],
                            total_reward=self.total_reward if total_reward is None else total_reward)
        self._flush(end=end)
        self.closed = True
        self.client._episode_closed(self, outcome)

    def _flush(self, end: pb.EpisodeEnd | None) -> None:
        n = self._n
        if n == 0 and end is None:
            return
        self._emit(0, n, end)
        self._n = 0
        self._chunk_bytes = 0

    def _build(self, start: int, stop: int, end: pb.EpisodeEnd | None) -> pb.EpisodeChunk:
        """The chunk of rows ``start:stop`` at the current seq / first_step (``end``: its length is
        set to the steps sent up to and including this chunk)."""
        n = stop - start
        chunk = pb.EpisodeChunk(job_id=self.client.job_id, actor_id=self.client.actor_id, episode_id=self.episode_id,
                                seq=self.seq, task_id=self.task_id, behavior_version=self.version,
                                first_step=self._first_step, produced_at=self._t_first if n else time.time())
        for rows, target in ((self._obs, chunk.observations), (self._act, chunk.actions)):
            if not n:  # an episode ended before any step (or only set-aside ones): empty tensors, still well-formed
                _empty_tensors(rows.specs, target)
                continue
            for name, arr in rows.views(start, stop).items():
                if rows is self._obs and name in self._images:
                    t = target[name]
                    t.dtype, t.encoding = image_codec.UINT8, image_codec.encoding_code(self._images[name])
                    t.shape.extend([n, *arr.shape[1:]])
                    t.frames.extend(itertools.chain.from_iterable(self._frames[name][start:stop]))
                else:
                    encode(arr, target[name])
        encode(self._rew[start:stop], chunk.rewards)
        encode(self._int[start:stop], chunk.interventions)
        if end is not None:
            chunk.end.CopyFrom(end)
            chunk.end.length = self._first_step + n
        return chunk

    def _emit(self, start: int, stop: int, end: pb.EpisodeEnd | None) -> None:
        """Seal rows ``start:stop`` into one chunk, or (over the limit: the estimate was wrong) two
        halves; a lone step still over the limit is set aside."""
        raw = self._build(start, stop, end).SerializeToString()
        n = stop - start
        if n and over_limit(len(raw), self.max_message_bytes):
            if n > 1:
                mid = (start + stop) // 2
                self._emit(start, mid, None)
                self._emit(mid, stop, end)
                return
            self.steps -= 1
            self.intervention_steps -= int(self._int[start])
            self.total_reward -= float(self._rew[start])  # _set_aside adds it back: still in the return
            self._set_aside(len(raw), float(self._rew[start]), self._first_step)
            if end is not None:
                self._emit(start, start, end)
            return
        self._spool(raw, n, float(self._rew[start:stop].sum(dtype=np.float64)), end is not None)

    def _spool(self, raw: bytes, n: int, reward: float, ends: bool) -> None:
        spool = self.client.spool
        spool.put(self.episode_id, self.seq, raw)
        self.seq += 1
        self._first_step += n
        self._spooled_reward += reward
        if not hasattr(spool, "mark_open"):  # a bare capture of chunks (benchmarks): no crash recovery to prepare
            return
        if ends:
            spool.clear_open(self.episode_id)
        else:  # after the put: a crash in between is resolved from the spool's own entries on restart
            spool.mark_open(self.episode_id, {"job_id": self.client.job_id, "actor_id": self.client.actor_id,
                                              "task_id": self.task_id, "behavior_version": self.version,
                                              "next_seq": self.seq, "first_step": self._first_step,
                                              "total_reward": self._spooled_reward})
