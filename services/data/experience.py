"""Read a learner's experience back from its ingest log, offline and read-only.

A learner state dir (``DATA/jobs/<id>/learner``) holds ``ingest.log``: every chunk the learner
acknowledged, in arrival order (:mod:`learner.ingest_log`). This module turns it into whole episodes
without a running learner, for ``fleetloop data export``:

- **Read-only.** Records are read with :func:`learner.ingest_log.scan_records`; a torn tail (a crash
  mid-append) ends the scan and is reported (``torn_tail_bytes``), never truncated. A log a learner
  is still appending to is read up to where it is.
- **Two passes, bounded memory.** :func:`index_log` parses each record once and keeps only its key
  ``(actor_id, episode_id)``, seq, step count, end flag and file offset. :func:`iter_episodes` then
  reads one episode's records by offset, decodes them and yields it before touching the next: memory
  is the index plus one decoded episode, whatever the log's size or how episodes interleave.
- **Robot chunks only.** LLM group chunks (``EpisodeChunk.group``) are skipped and counted
  (``llm_chunks``); a record that does not parse, or a chunk that does not validate against the specs
  inferred from the first robot chunk (:func:`learner.ingest.validate`, the learner's own check), is
  skipped and counted (``invalid_chunks``), its episode keeping the rest.
- **Episodes.** Chunks are joined in seq order; a seq gap (chunks the actor set aside) keeps what was
  stored and is counted in :attr:`Episode.seq_gaps`. An episode is complete when its ``end`` chunk is
  in the log; others are open (the actor crashed or is still running): :func:`iter_episodes` yields
  them only with ``include_open``. Episodes come in the order of their first chunk in the log; one
  with no stored step is never yielded (counted in ``LogIndex.empty_episodes``).
- **Frames.** Camera tensors sent PNG/JPEG-encoded are decoded to uint8 ``[T, H, W, C]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from fleetloop.codec import WIRE_DTYPES, decode, make_spec
from fleetloop.errors import FleetloopError, InvalidArgument, NotFound
from fleetloop.specs import TensorInfo
from fleetloop.v1 import fleetloop_pb2 as pb
from learner.ingest import validate
from learner.ingest_log import RECORD_HEADER_BYTES, read_record, scan_records

LOG_NAME = "ingest.log"
_ANY_VERSION = 1 << 62  # validate() refuses versions above the learner's; offline, every logged version is fine


@dataclass
class ChunkRef:
    """Where one chunk of an episode lies in the log."""

    offset: int
    seq: int
    steps: int
    end: bool


@dataclass
class EpisodeRef:
    """An episode as indexed: its chunks' places, its outcome once the end chunk is seen."""

    actor_id: str
    episode_id: str
    task_id: str
    chunks: list[ChunkRef] = field(default_factory=list)
    outcome: str | None = None      # "success" | "failure" | "timeout" | "aborted" | None (open)
    reported_return: float | None = None  # EpisodeEnd.total_reward (counts steps the actor set aside)

    @property
    def complete(self) -> bool:
        return any(c.end for c in self.chunks)

    @property
    def steps(self) -> int:
        return sum(c.steps for c in self.chunks)


@dataclass
class LogIndex:
    """Result of :func:`index_log`. ``episodes`` is keyed by (actor_id, episode_id) in order of first
    appearance. ``observations`` / ``actions``: the job's tensors (from the first robot chunk)."""

    path: Path
    job_id: str = ""
    episodes: dict[tuple[str, str], EpisodeRef] = field(default_factory=dict)
    observations: list[TensorInfo] = field(default_factory=list)
    actions: list[TensorInfo] = field(default_factory=list)
    records: int = 0
    robot_chunks: int = 0
    llm_chunks: int = 0
    invalid_chunks: int = 0         # records that do not parse or belong to another job (index pass)
    log_bytes: int = 0
    torn_tail_bytes: int = 0        # bytes after the last intact record (left in place)

    @property
    def open_episodes(self) -> int:
        return sum(1 for e in self.episodes.values() if not e.complete)

    @property
    def empty_episodes(self) -> int:
        return sum(1 for e in self.episodes.values() if e.steps == 0)


@dataclass
class Episode:
    """One reassembled episode; per-step arrays of equal length T (>= 1).

    ``obs``: name -> ``[T, *shape]`` in the tensor's dtype (cameras uint8 ``[T, H, W, C]``);
    ``actions``: float32 ``[T, act_dim]``, the action tensors flattened and concatenated in name order
    (as the learner trains on them); ``dones``: True on the last step of a complete episode and where
    the actor sent an env terminal flag; ``versions``: int64 behaviour policy version of each step's
    chunk; ``outcome`` None for an open episode."""

    actor_id: str
    episode_id: str
    task_id: str
    outcome: str | None
    obs: dict[str, np.ndarray]
    actions: np.ndarray
    rewards: np.ndarray
    interventions: np.ndarray
    dones: np.ndarray
    versions: np.ndarray
    seq_gaps: int = 0
    invalid_chunks: int = 0
    reported_return: float | None = None

    def __len__(self) -> int:
        return int(self.rewards.shape[0])


def log_path(state_dir: Path) -> Path:
    """The ingest log of a learner state dir; NotFound naming the dir or the log when missing."""
    state_dir = Path(state_dir)
    if not state_dir.is_dir():
        raise NotFound(f"learner state dir {str(state_dir)!r} does not exist", field="state_dir", value=str(state_dir))
    path = state_dir / LOG_NAME
    if not path.is_file():
        raise NotFound(f"no ingest log {str(path)!r} in learner state dir {str(state_dir)!r} (the learner stored no "
                       f"experience yet?)", field="ingest_log", value=str(path))
    return path


def _tensor_info(name: str, tensor) -> TensorInfo:
    dtype = WIRE_DTYPES.get(int(tensor.dtype))
    if dtype is None:
        raise InvalidArgument(f"tensor {name!r} of the log's first robot chunk has unsupported dtype {int(tensor.dtype)}",
                              field=name, value=int(tensor.dtype))
    return TensorInfo(name, dtype.name, tuple(int(d) for d in tensor.shape[1:]))


def index_log(path: Path, on_progress: Callable[[int], None] | None = None) -> LogIndex:
    """One read-only pass over the ingest log at ``path`` (module docstring); ``on_progress(bytes)``
    is called with the bytes consumed after each record. NotFound when the file is missing."""
    path = Path(path)
    if not path.is_file():
        raise NotFound(f"no ingest log {str(path)!r}", field="ingest_log", value=str(path))
    idx = LogIndex(path=path, log_bytes=path.stat().st_size)
    end = 0
    for offset, payload in scan_records(path):
        end = offset + RECORD_HEADER_BYTES + len(payload)
        idx.records += 1
        if on_progress is not None:
            on_progress(end)
        try:
            chunk = pb.EpisodeChunk.FromString(payload)
        except Exception:  # DecodeError: a record the learner wrote cannot be misparsed, but never trust a file
            idx.invalid_chunks += 1
            continue
        if chunk.HasField("group"):
            idx.llm_chunks += 1
            continue
        if not idx.job_id:
            idx.job_id = chunk.job_id
            idx.observations = [_tensor_info(n, chunk.observations[n]) for n in sorted(chunk.observations)]
            idx.actions = [_tensor_info(n, chunk.actions[n]) for n in sorted(chunk.actions)]
        elif chunk.job_id != idx.job_id:
            idx.invalid_chunks += 1
            continue
        idx.robot_chunks += 1
        key = (chunk.actor_id, chunk.episode_id)
        ep = idx.episodes.get(key)
        if ep is None:
            ep = idx.episodes[key] = EpisodeRef(chunk.actor_id, chunk.episode_id, chunk.task_id)
        steps = int(chunk.rewards.shape[0]) if len(chunk.rewards.shape) else 0
        ended = chunk.HasField("end")
        ep.chunks.append(ChunkRef(offset, int(chunk.seq), steps, ended))
        if ended:
            ep.outcome = {1: "success", 2: "failure", 3: "timeout", 4: "aborted"}.get(int(chunk.end.outcome), "unknown")
            ep.reported_return = float(chunk.end.total_reward)
    idx.torn_tail_bytes = max(0, idx.log_bytes - end)
    return idx


def _specs(infos: list[TensorInfo]) -> list:
    return [make_spec(t.name, t.dtype, t.shape) for t in infos]


def _alloc(infos: list[TensorInfo], steps: int) -> dict[str, np.ndarray]:
    return {t.name: np.empty((steps, *t.shape), dtype=np.dtype(t.dtype)) for t in infos}


def read_episode(fh, idx: LogIndex, ref: EpisodeRef) -> Episode:
    """Decode one indexed episode from the open log file ``fh`` (chunks in seq order; a chunk that no
    longer reads or validates is skipped and counted in :attr:`Episode.invalid_chunks`)."""
    obs_specs, act_specs = _specs(idx.observations), _specs(idx.actions)
    tasks = {ref.task_id}
    total = ref.steps
    obs = _alloc(idx.observations, total)
    act_dim = sum(math.prod(t.shape) for t in idx.actions)
    actions = np.empty((total, act_dim), np.float32)
    rewards = np.empty(total, np.float32)
    inter = np.empty(total, np.bool_)
    dones = np.zeros(total, np.bool_)
    versions = np.empty(total, np.int64)
    pos = gaps = invalid = 0
    last_seq: int | None = None
    for c in sorted(ref.chunks, key=lambda c: c.seq):
        if last_seq is not None and c.seq > last_seq + 1:
            gaps += c.seq - last_seq - 1
        last_seq = c.seq
        try:
            chunk = pb.EpisodeChunk.FromString(read_record(fh, c.offset))
            tasks.add(chunk.task_id)
            d = validate(chunk, idx.job_id, tasks, obs_specs, act_specs, _ANY_VERSION)
            done = decode(chunk.dones, "dones") if chunk.HasField("dones") and len(chunk.dones.shape) else None
        except (FleetloopError, ValueError):  # unreadable or no longer valid: skip it, keep the rest
            invalid += 1
            continue
        n = d.steps
        if n == 0:
            continue
        sl = slice(pos, pos + n)
        for name, arr in d.obs.items():
            obs[name][sl] = arr
        actions[sl], rewards[sl], inter[sl] = d.actions, d.rewards, d.interventions
        versions[sl] = d.behavior_version
        if done is not None and done.shape == (n,):
            dones[sl] = done.astype(np.bool_, copy=False)
        pos += n
    if ref.complete and pos:
        dones[pos - 1] = True
    cut = slice(0, pos)
    return Episode(ref.actor_id, ref.episode_id, ref.task_id, ref.outcome, {k: v[cut] for k, v in obs.items()},
                   actions[cut], rewards[cut], inter[cut], dones[cut], versions[cut], gaps, invalid, ref.reported_return)


def iter_episodes(idx: LogIndex, include_open: bool = False) -> Iterator[Episode]:
    """Yield the indexed episodes one at a time (module docstring): complete ones, and open ones too
    with ``include_open``; never one without a stored (valid) step."""
    with open(idx.path, "rb") as fh:
        for ref in idx.episodes.values():
            if ref.steps == 0 or (not ref.complete and not include_open):
                continue
            ep = read_episode(fh, idx, ref)
            if len(ep):
                yield ep
