"""Ingest: validate an EpisodeChunk, store it exactly once, account for it.

Path of a chunk: ``validate`` (pure; InvalidArgument / NotFound naming field and value; also for a
resend, so a resend with NaN or of another job is refused, never acked) -> ledger check
(:mod:`learner.ledger`: key ``(actor, episode_id, seq)``; a byte-identical resend is a duplicate, acked
without storing; other content under a stored key, an out-of-order seq or a ``first_step`` jump is
refused; a seq gap, chunks the actor set aside, is accepted, counted and logged) ->
per-actor rate limit (RateLimited, nothing stored) -> staleness gate at ingest -> ingest log append
(the durability point) -> replay store -> ledger record -> episode accounting -> ack.

Accounting: every step of a new chunk is counted in ``received_steps_total``; it is either stored
(``ingested_steps_total``) or dropped at ingest (``dropped_samples_total{reason}`` with the staleness
gate's reason). A stored step that the online ring later evicts is counted once more in
``dropped_samples_total`` as ``evicted`` (sampled by training at least once), ``evicted_unsampled``
(eligible for training, never sampled: the learner was too slow, which raises the memory-pressure
backoff) or ``evicted_ineligible`` (frames the algorithm never trains on, e.g. HG-DAgger's autonomous
frames). So received = live online steps + dropped at ingest + evicted (all three reasons).

Episode ends: every new episode end (not the start-up replay of the log) is appended to ``episodes``
(an :class:`EpisodeRecord`: outcome, steps, intervention steps, return, behaviour version, actor,
task) and handed to ``on_episode_end`` (when set: the release channels, :mod:`learner.releases`)
after the ingest lock is released.

Invariants: every stored step carries its behaviour version; an (actor, episode_id, seq) key is stored
at most once, also across restarts (the log is replayed through the same path with ``durable=False``);
every stored action lies within its spec's ``low``/``high`` bounds.

Compressed camera storage (``keep_encoded``, ``images.storage = "compressed"``): a PNG/JPEG tensor is
validated on its frame headers only (format, size, mode, end marker; :func:`fleetloop.image_codec.check_frames`)
and stored as its encoded frames. A frame whose header is sound but whose body is corrupt is therefore
acked and stored; it is found when a batch decodes it, and that row is dropped from the batch
(``dropped_samples_total{reason="corrupt_frame"}``, :mod:`learner.frames`).
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from fleetloop.codec import check_finite, decode, decode_map
from fleetloop.errors import InvalidArgument, NotFound
from fleetloop.logs import event, get_logger
from learner.backpressure import FlowControl
from learner.ingest_log import IngestLog
from learner.ledger import Ledger, digest
from learner.metrics import LearnerMetrics
from learner.replay import ReplayStore
from learner.staleness import StalenessGate

log = get_logger("learner.ingest")
OUTCOMES = {1: "success", 2: "failure", 3: "timeout", 4: "aborted"}
_MAX_ID = 128


@dataclass
class DecodedChunk:
    """A validated chunk as numpy arrays: ``obs`` maps every observation tensor name to
    ``[T, *shape]`` in its spec dtype (cameras decoded to uint8 ``[T, H, W, C]``; a camera kept encoded,
    ``validate(keep_encoded=True)``: an object array ``[T, *shape[:-3]]`` of its frames, bytes with
    checked headers); ``actions`` is
    the action tensors flattened to float32 and concatenated in name order (as
    :class:`fleetloop.specs.PolicySpec`), ``[T, act_dim]``."""

    actor_id: str
    episode_id: str
    seq: int
    task_id: str
    behavior_version: int
    first_step: int
    obs: dict[str, np.ndarray]
    actions: np.ndarray
    rewards: np.ndarray
    interventions: np.ndarray
    outcome: str | None
    produced_at: float

    @property
    def steps(self) -> int:
        return int(self.rewards.shape[0])


@dataclass
class EpisodeRecord:
    """One finished episode as the learner saw it."""

    time: float
    actor_id: str
    episode_id: str
    task_id: str
    outcome: str
    steps: int
    intervention_steps: int
    behavior_version: int
    reward: float = 0.0  # the episode's return (sum of its rewards)


_MAX_INDEX = 1 << 40  # seq and first_step: far beyond any episode, far below int64 overflow in the replay


def _check_id(value: str, name: str) -> None:
    if not value or len(value) > _MAX_ID:
        raise InvalidArgument(f"{name} {value!r} must be 1..{_MAX_ID} characters", field=name, value=value)


def validate(chunk, job_id: str, tasks: set[str], obs_specs, act_specs, latest_version: int,
             keep_encoded: bool = False) -> DecodedChunk:
    """Check every field of ``chunk`` against the job; return it decoded (PNG/JPEG observation tensors
    header-checked and kept encoded with ``keep_encoded``). Pure, no state."""
    if chunk.job_id != job_id:
        raise NotFound(f"unknown job {chunk.job_id!r} (this learner serves {job_id!r})", field="job_id", value=chunk.job_id)
    _check_id(chunk.actor_id, "actor_id")
    _check_id(chunk.episode_id, "episode_id")
    if chunk.task_id not in tasks:
        raise InvalidArgument(f"task_id {chunk.task_id!r} is not a task of job {job_id!r} ({sorted(tasks)})",
                              field="task_id", value=chunk.task_id)
    for name in ("seq", "first_step"):
        if getattr(chunk, name) >= _MAX_INDEX:
            raise InvalidArgument(f"{name} {getattr(chunk, name)} is past the limit {_MAX_INDEX}", field=name,
                                  value=getattr(chunk, name))
    if chunk.behavior_version > latest_version:
        raise InvalidArgument(f"behavior_version {chunk.behavior_version} is newer than the learner's {latest_version}",
                              field="behavior_version", value=chunk.behavior_version)
    rewards = decode(chunk.rewards, "rewards")
    if rewards.ndim != 1 or rewards.dtype != np.float32:
        raise InvalidArgument(f"rewards must be float32 [T], got {rewards.dtype} {list(rewards.shape)}",
                              field="rewards", value=list(rewards.shape))
    steps = rewards.shape[0]
    if steps == 0 and not chunk.HasField("end"):
        raise InvalidArgument("chunk has no steps and no episode end", field="rewards.shape", value=[0])
    check_finite(rewards, "rewards")
    inter = decode(chunk.interventions, "interventions")
    if inter.shape != (steps,) or inter.dtype != np.bool_:
        raise InvalidArgument(f"interventions must be bool [{steps}], got {inter.dtype} {list(inter.shape)}",
                              field="interventions", value=list(inter.shape))
    obs = decode_map(chunk.observations, obs_specs, steps, "observations", keep_encoded=keep_encoded)
    acts = decode_map(chunk.actions, act_specs, steps, "actions")
    for spec in act_specs:
        if steps and (spec.low or spec.high):
            check_bounds(acts[spec.name], spec, f"actions[{spec.name}]")
    outcome = None
    if chunk.HasField("end"):
        outcome = OUTCOMES.get(int(chunk.end.outcome))
        if outcome is None:
            raise InvalidArgument(f"end.outcome {int(chunk.end.outcome)} is not one of {sorted(OUTCOMES)}",
                                  field="end.outcome", value=int(chunk.end.outcome))
    # explicit widths: reshape(0, -1) cannot infer -1, and a zero-step end chunk is valid (an episode
    # ended before any step, or closed as aborted after an actor crash); math.prod: ~20x np.prod here
    flat = [acts[s.name].reshape(steps, math.prod(s.shape)).astype(np.float32, copy=False)
            for s in sorted(act_specs, key=lambda s: s.name)]
    actions = flat[0] if len(flat) == 1 else np.concatenate(flat, axis=1)
    return DecodedChunk(chunk.actor_id, chunk.episode_id, int(chunk.seq), chunk.task_id, int(chunk.behavior_version),
                        int(chunk.first_step), obs, actions, rewards, inter, outcome, float(chunk.produced_at))


def check_bounds(values: np.ndarray, spec, name: str) -> None:
    """Every element of ``values`` ([T, *spec.shape]) within the spec's inclusive ``low``/``high`` (each
    empty, one value for all elements, or one per element); else InvalidArgument naming the tensor,
    step, element, value and bound. NaN is refused as out of bounds."""
    flat = values.reshape(values.shape[0], -1)
    for bound, side in ((spec.low, "low"), (spec.high, "high")):
        if not len(bound):
            continue
        b = np.asarray(bound, dtype=np.float32)
        bad = ~(flat >= b) if side == "low" else ~(flat <= b)
        if bad.any():
            step, elem = (int(i) for i in np.argwhere(bad)[0])
            limit = float(b[elem] if b.size > 1 else b[0])
            raise InvalidArgument(f"{name}[{step}][{elem}] = {float(flat[step, elem])!r} is outside the spec's bounds "
                                  f"({side} {limit!r}); {int(bad.sum())} value(s) out of bounds in this chunk",
                                  field=name, value=float(flat[step, elem]))


@dataclass
class _OpenEpisode:
    steps: int = 0
    interventions: int = 0
    reward: float = 0.0


@dataclass
class TaskTally:
    """Running per-task totals."""

    steps: int = 0
    intervention_steps: int = 0
    episodes: dict[str, int] = field(default_factory=dict)


@dataclass
class ActorTally:
    """Running per-actor totals (for the control plane's fleet table)."""

    version: int = -1          # behaviour version of the actor's newest chunk
    last_seen: float = 0.0     # unix time of its newest stored chunk
    task: str = ""             # task of its newest chunk
    steps: int = 0
    intervention_steps: int = 0
    episodes: int = 0
    successes: int = 0
    dropped: dict[str, int] = field(default_factory=dict)  # steps dropped at ingest, by the staleness gate's reason


class Ingestor:
    """Stores validated chunks exactly once. Thread-safe (one lock around the store path)."""

    def __init__(self, job_id: str, tasks: list[str], obs_specs, act_specs, replay: ReplayStore, gate: StalenessGate,
                 log: IngestLog, metrics: LearnerMetrics, flow: FlowControl | None = None,
                 interventions_only: bool = False, keep_encoded: bool = False) -> None:
        """``flow``: rate limits and backpressure (None = none); ``interventions_only``: the algorithm
        trains on online intervention frames only (evicted autonomous frames are then ``evicted_ineligible``);
        ``keep_encoded``: store PNG/JPEG cameras as their frames (module docstring)."""
        self.job_id, self.tasks, self.keep_encoded = job_id, set(tasks), keep_encoded
        self.flow, self.interventions_only = flow, interventions_only
        self.obs_specs, self.act_specs = list(obs_specs), list(act_specs)
        self.replay, self.gate, self.log, self.m = replay, gate, log, metrics
        self.ledger = Ledger()
        self.lock = threading.Lock()
        self._episode_keys: dict[tuple[str, str], int] = {}  # (actor, episode id) -> the replay's episode key
        self._open: dict[tuple[str, str], _OpenEpisode] = {}
        self.tally = {t: TaskTally() for t in tasks}
        self.episodes: deque[EpisodeRecord] = deque(maxlen=100_000)
        self.episodes_total = 0
        self.steps_total = 0
        self.actor_versions: dict[str, tuple[int, float]] = {}
        self.actor_stats: dict[str, ActorTally] = {}
        m, j = metrics, job_id
        # label children resolved once (a .labels() lookup per chunk is measurable at 100k steps/s)
        self._c_dup, self._c_chunks, self._c_bytes = m.duplicates.labels(j), m.ingested_chunks.labels(j), m.ingested_bytes.labels(j)
        self._c_latency = m.step_to_store.labels(j)
        self._c_steps = {t: m.ingested_steps.labels(j, t) for t in tasks}
        self._g_ratio = {t: m.intervention_ratio.labels(j, t) for t in tasks}
        self._c_received = {t: m.received_steps.labels(j, t) for t in tasks}
        self._c_inter = {t: m.intervention_steps.labels(j, t) for t in tasks}
        self._actor_series: set[str] = set()   # actors with a live fleetloop_learner_actor_policy_version series
        self._g_actor: dict = {}                # actor -> its resolved version gauge child (a labels() lookup per chunk costs)
        self._c_evicted = {r: m.dropped_samples.labels(j, r) for r in ("evicted", "evicted_unsampled", "evicted_ineligible")}
        #: called with each new episode end (durable ingest only), outside the lock; an exception is logged
        self.on_episode_end: Callable[[EpisodeRecord], None] | None = None

    def ingest(self, chunk, nbytes: int, learner_version: int, raw: bytes | None = None, durable: bool = True) -> bool:
        """Validate and store ``chunk``; returns True if it was a duplicate (not stored again).

        Validation comes first, also for resends; then the ledger (module docstring). With ``durable``
        the serialised chunk (``raw`` or re-serialised) is appended to the log before anything is
        stored; replay from the log passes ``durable=False`` (and the record as ``raw``).
        """
        raw = raw if raw is not None else chunk.SerializeToString()
        content = digest(raw)
        decoded = validate(chunk, self.job_id, self.tasks, self.obs_specs, self.act_specs, learner_version,
                           self.keep_encoded)
        key = (decoded.actor_id, decoded.episode_id, decoded.seq, decoded.first_step, decoded.outcome is not None, content)
        with self.lock:
            if self.ledger.check(*key) is True:
                self._c_dup.inc()
                return True
        if durable and self.flow is not None:
            self.flow.admit(decoded.actor_id, decoded.steps)  # RateLimited: refused before anything is logged
        with self.lock:
            gap = self.ledger.check(*key)
            if gap is True:  # raced with a resend on another stream
                self._c_dup.inc()
                return True
            if gap:  # the actor set chunks aside: keep the rest of its episode, count and log the hole
                self.m.seq_gaps.labels(self.job_id).inc(gap)
                event(log, "seq_gap", level=30, job=self.job_id, actor=decoded.actor_id, episode=decoded.episode_id,
                      missing=f"{decoded.seq - gap}..{decoded.seq - 1}", first_step=decoded.first_step)
            if durable:
                self.log.append(raw)
            evicted, wasted, ended = self._store(decoded, learner_version)
            self.ledger.record(decoded.actor_id, decoded.episode_id, decoded.seq, decoded.first_step, decoded.steps,
                               decoded.outcome is not None, content)
        if durable and self.flow is not None:
            self.flow.stored(decoded.steps, evicted, wasted)
        self._c_chunks.inc()
        self._c_bytes.inc(nbytes)
        if durable and decoded.produced_at > 0:
            self._c_latency.observe(max(0.0, time.time() - decoded.produced_at))
        if durable and ended is not None and self.on_episode_end is not None:
            try:  # the chunk is stored and will be acked: a failing hook must not turn that into an error
                self.on_episode_end(ended)
            except Exception as exc:
                event(log, "episode_end_hook_failed", level=40, job=self.job_id, actor=ended.actor_id,
                      episode=ended.episode_id, error=repr(exc)[:300])
        return False

    def episode_keys(self) -> dict[tuple[str, str], int]:
        """(actor, episode id) -> the replay's episode key of every episode stored so far (a copy)."""
        with self.lock:
            return dict(self._episode_keys)

    def episode_key(self, actor_id: str, episode_id: str) -> int | None:
        """The replay's episode key of one stored episode (None: none stored). One lookup, without the
        lock: a caller that needs it consistent with other state holds ``lock`` (the learner step does)."""
        return self._episode_keys.get((actor_id, episode_id))

    def open_episodes(self) -> set[tuple[str, str]]:
        """(actor, episode id) of the episodes with stored steps and no end yet."""
        with self.lock:
            return set(self._open)

    def forget_idle_actors(self, ttl_s: float, now: float | None = None) -> list[str]:
        """Remove the per-actor version series of actors with no chunk for ``ttl_s`` seconds (a robot that left
        must not hold 'actors on old versions' alerts forever); their tallies stay for the fleet table.
        A returning actor gets its series back with its next chunk. Returns the actors forgotten."""
        now = time.time() if now is None else now
        with self.lock:
            gone = [a for a in self._actor_series if now - self.actor_stats[a].last_seen > ttl_s]
            for actor in gone:
                self._actor_series.discard(actor)
                self._g_actor.pop(actor, None)
                try:
                    self.m.actor_version.remove(self.job_id, actor)
                except KeyError:
                    pass
        return gone

    def _add_online(self, task: str, *args) -> tuple[int, int]:
        """Append to the online ring and count what it evicted; returns (eligible steps evicted,
        of which never sampled)."""
        ev = self.replay.add_online(task, *args)
        if not ev.evicted:
            return 0, 0
        eligible = ev.interventions if self.interventions_only else ev.evicted
        wasted = ev.unsampled_interventions if self.interventions_only else ev.unsampled
        self._c_evicted["evicted"].inc(ev.evicted - ev.unsampled)
        self._c_evicted["evicted_unsampled"].inc(wasted)
        self._c_evicted["evicted_ineligible"].inc(ev.unsampled - wasted)
        return eligible, wasted

    def _store(self, c: DecodedChunk, learner_version: int) -> tuple[int, int, EpisodeRecord | None]:
        """Store (or drop) one validated new chunk and account for it; returns (eligible steps its
        append evicted from the online ring, of which never trained on, the episode's record when
        the chunk ended it)."""
        evicted = wasted = dropped = 0
        autonomous = bool((~c.interventions).any())
        decision = self.gate.at_ingest(learner_version, c.behavior_version, autonomous,
                                       has_expert_steps=bool(c.interventions.any()), num_steps=c.steps)
        key = self._episode_keys.setdefault((c.actor_id, c.episode_id), len(self._episode_keys))
        if c.steps and decision.admit and decision.expert_only:
            # stale chunk: keep the operator's corrections (expert labels do not go stale), drop the rest
            idx = np.flatnonzero(c.interventions)
            for run in np.split(idx, np.flatnonzero(np.diff(idx) != 1) + 1):
                if run.size:
                    a, b = int(run[0]), int(run[-1]) + 1
                    e, w = self._add_online(c.task_id, {k: v[a:b] for k, v in c.obs.items()}, c.actions[a:b],
                                            c.rewards[a:b], c.interventions[a:b],
                                            c.behavior_version, key, c.first_step + a)
                    evicted, wasted = evicted + e, wasted + w
            self._c_steps[c.task_id].inc(idx.size)
            self.m.dropped_samples.labels(self.job_id, decision.reason).inc(c.steps - idx.size)
            dropped = c.steps - idx.size
        elif c.steps and decision.admit:
            evicted, wasted = self._add_online(c.task_id, c.obs, c.actions, c.rewards, c.interventions,
                                               c.behavior_version, key, c.first_step)
            self._c_steps[c.task_id].inc(c.steps)
        elif c.steps:
            self.m.dropped_samples.labels(self.job_id, decision.reason).inc(c.steps)
            dropped = c.steps
        n_inter = int(c.interventions.sum())
        self._c_received[c.task_id].inc(c.steps)
        if n_inter:
            self._c_inter[c.task_id].inc(n_inter)
        ep = self._open.setdefault((c.actor_id, c.episode_id), _OpenEpisode())
        ep.steps += c.steps
        ep.interventions += n_inter
        ep.reward += float(c.rewards.sum()) if c.steps else 0.0
        tally = self.tally[c.task_id]
        tally.steps += c.steps
        self.steps_total += c.steps
        tally.intervention_steps += n_inter
        if tally.steps:
            self._g_ratio[c.task_id].set(tally.intervention_steps / tally.steps)
        now = time.time()
        self.actor_versions[c.actor_id] = (c.behavior_version, now)
        at = self.actor_stats.get(c.actor_id)
        if at is None:
            at = self.actor_stats[c.actor_id] = ActorTally()
        at.version, at.last_seen, at.task = c.behavior_version, now, c.task_id
        at.steps += c.steps
        at.intervention_steps += n_inter
        if dropped:
            at.dropped[decision.reason] = at.dropped.get(decision.reason, 0) + dropped
        gauge = self._g_actor.get(c.actor_id)
        if gauge is None or c.actor_id not in self._actor_series:  # new, or its series was forgotten (idle)
            gauge = self._g_actor[c.actor_id] = self.m.actor_version.labels(self.job_id, c.actor_id)
            self._actor_series.add(c.actor_id)
        gauge.set(c.behavior_version)
        record = None
        if c.outcome is not None:
            self._open.pop((c.actor_id, c.episode_id), None)
            tally.episodes[c.outcome] = tally.episodes.get(c.outcome, 0) + 1
            at.episodes += 1
            at.successes += c.outcome == "success"
            record = EpisodeRecord(time.time(), c.actor_id, c.episode_id, c.task_id, c.outcome,
                                   ep.steps, ep.interventions, c.behavior_version, ep.reward)
            self.episodes.append(record)
            self.episodes_total += 1
            self.m.episodes.labels(self.job_id, c.task_id, c.outcome).inc()
        return evicted, wasted, record
