"""Ingest of LLM rollouts: validate an EpisodeChunk carrying one CompletionGroup, store it once.

:func:`validate_group` is pure: it checks every field against the job and returns a
:class:`ValidatedGroup` whose ``group`` dict is what :func:`learner.llm.grpo.build_token_batch`
takes. Each refusal is an :class:`~fleetloop.errors.InvalidArgument` (NotFound for another job)
naming the field with its index and the value, e.g. ``group.completions[3].logprobs[7]``:

- chunk: ``job_id`` (NOT_FOUND), ``actor_id`` / ``episode_id`` (1..128 chars), ``seq`` (must be 0: a
  group is a whole episode), ``group`` (must be set), step tensors (``observations``, ``actions``,
  ``rewards``, ``interventions`` must be empty), ``task_id`` / ``group.task_id`` (a job task; equal
  when both are set), ``behavior_version`` (<= learner version);
- ``group.prompt_token_ids``: non-empty, <= max_prompt_tokens, every id < vocab size;
- ``group.completions``: exactly group_size; per completion ``token_ids`` non-empty, <= max_new_tokens,
  every id < vocab size; ``logprobs`` of the same length, finite and <= ``LOGPROB_TOL``;
  ``reward`` finite; ``policy_version`` <= learner version;
- ``group.admitted_version`` <= learner version.

:class:`GroupIngestor` adds exactly-once storage: (episode_id, seq) is stored at most once; a resend
is acknowledged as a duplicate without storing. With a journal (:class:`~learner.llm.durability.GroupJournal`,
as the LLM learner runs it) a new group is appended to the group log *before* it is stored and
acknowledged, and its record index is kept on the :class:`ValidatedGroup`; on start the learner
replays the journal (:func:`~learner.llm.durability.recover_groups`, through :meth:`GroupIngestor.remember`),
so the ledger and the unconsumed groups survive a restart and a resend after it is still a duplicate.
Refusals are counted by field with indices removed (``fleetloop_llm_rejected_groups_total``).
"""

from __future__ import annotations

import math
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from fleetloop.errors import FailedPrecondition, FleetloopError, InvalidArgument, NotFound
from learner.ledger import digest

#: Largest positive log-prob accepted (float32 rounding of log(1) may come out slightly above 0).
LOGPROB_TOL = 1e-3
_MAX_ID = 128
_INDEX = re.compile(r"\[\d+\]")


@dataclass
class ValidatedGroup:
    """One validated group: ``group`` is the build_token_batch dict, the rest is bookkeeping."""

    actor_id: str
    episode_id: str
    task_id: str
    prompt_id: str
    ticket_id: str
    admitted_version: int
    group: dict[str, Any]
    min_version: int
    max_version: int
    verifier_errors: int = 0
    received_at: float = field(default_factory=time.time)
    #: index of its record in the group log (-1: not logged); what the consumed marker counts
    record: int = -1
    #: re-queued from the group log at start (its admission ticket died with the previous process)
    replayed: bool = False

    @property
    def rewards(self) -> list[float]:
        return [c["reward"] for c in self.group["completions"]]

    @property
    def tokens(self) -> int:
        return sum(len(c["token_ids"]) for c in self.group["completions"])


def _check_id(value: str, name: str) -> None:
    if not value or len(value) > _MAX_ID:
        raise InvalidArgument(f"{name} {value!r} must be 1..{_MAX_ID} characters", field=name, value=value)


def _check_tokens(ids, name: str, vocab_size: int, limit: int, limit_name: str) -> list[int]:
    n = len(ids)
    if n == 0:
        raise InvalidArgument(f"{name} is empty", field=name, value=[])
    if n > limit:
        raise InvalidArgument(f"{name} has {n} tokens, more than {limit_name} {limit}", field=name, value=n)
    out = list(ids)
    top = max(out)
    if top >= vocab_size:
        i = next(k for k, t in enumerate(out) if t >= vocab_size)
        raise InvalidArgument(f"{name}[{i}] = {out[i]} is outside the vocabulary (size {vocab_size})",
                              field=f"{name}[{i}]", value=out[i])
    return out


def _check_logprobs(values, n_tokens: int, name: str) -> list[float]:
    """The log-probs as floats clipped to <= 0; InvalidArgument naming the first bad index otherwise.
    One vectorised check (a per-value Python loop was 30% of the learner's ingest CPU per group)."""
    n = len(values)
    if n != n_tokens:
        raise InvalidArgument(f"{name} has {n} values for {n_tokens} token_ids (must be equal)", field=name, value=n)
    arr = np.fromiter(values, dtype=np.float64, count=n)
    bad = ~np.isfinite(arr) | (arr > LOGPROB_TOL)
    if bad.any():
        i = int(np.argmax(bad))
        v = float(arr[i])
        raise InvalidArgument(f"{name}[{i}] = {v} is not a log-probability (finite, <= 0)", field=f"{name}[{i}]", value=v)
    return np.minimum(arr, 0.0).tolist()


def validate_group(chunk, *, job_id: str, task_ids: set[str] | frozenset[str], group_size: int, vocab_size: int,
                   max_new_tokens: int, max_prompt_tokens: int, learner_version: int) -> ValidatedGroup:
    """Check ``chunk`` (an EpisodeChunk with ``group`` set) against the job; see the module docstring."""
    if chunk.job_id != job_id:
        raise NotFound(f"unknown job {chunk.job_id!r} (this learner serves {job_id!r})", field="job_id", value=chunk.job_id)
    _check_id(chunk.actor_id, "actor_id")
    _check_id(chunk.episode_id, "episode_id")
    if not chunk.HasField("group"):
        raise InvalidArgument("chunk carries no CompletionGroup: this job trains on LLM rollouts (protocol 2)",
                              field="group", value=None)
    if chunk.seq != 0:
        raise InvalidArgument(f"seq {chunk.seq} must be 0: a group is one whole episode", field="seq", value=chunk.seq)
    for name in ("observations", "actions"):
        if len(getattr(chunk, name)):
            raise InvalidArgument(f"{name} must be empty in a group chunk", field=name, value=len(getattr(chunk, name)))
    for name in ("rewards", "interventions"):
        if chunk.HasField(name) and (len(getattr(chunk, name).shape) or getattr(chunk, name).data):
            raise InvalidArgument(f"{name} must be empty in a group chunk", field=name,
                                  value=list(getattr(chunk, name).shape))
    g = chunk.group
    for name, value in (("task_id", chunk.task_id), ("group.task_id", g.task_id)):
        if (value or name == "group.task_id" and not chunk.task_id) and value not in task_ids:
            raise InvalidArgument(f"{name} {value!r} is not a task of job {job_id!r} ({sorted(task_ids)})", field=name,
                                  value=value)
    if g.task_id and chunk.task_id and g.task_id != chunk.task_id:
        raise InvalidArgument(f"group.task_id {g.task_id!r} differs from task_id {chunk.task_id!r}", field="group.task_id",
                              value=g.task_id)
    task = g.task_id or chunk.task_id
    if chunk.behavior_version > learner_version:
        raise InvalidArgument(f"behavior_version {chunk.behavior_version} is newer than the learner's {learner_version}",
                              field="behavior_version", value=chunk.behavior_version)
    if g.admitted_version > learner_version:
        raise InvalidArgument(f"group.admitted_version {g.admitted_version} is newer than the learner's {learner_version}",
                              field="group.admitted_version", value=g.admitted_version)
    if len(g.prompt_id) > _MAX_ID or len(g.ticket_id) > _MAX_ID:
        name = "group.prompt_id" if len(g.prompt_id) > _MAX_ID else "group.ticket_id"
        raise InvalidArgument(f"{name} is longer than {_MAX_ID} characters", field=name, value=len(getattr(g, name[6:])))
    prompt = _check_tokens(g.prompt_token_ids, "group.prompt_token_ids", vocab_size, max_prompt_tokens, "max_prompt_tokens")
    if len(g.completions) != group_size:
        raise InvalidArgument(f"group.completions has {len(g.completions)} completions; this job's group_size is "
                              f"{group_size}", field="group.completions", value=len(g.completions))
    completions = []
    errors = 0
    for i, c in enumerate(g.completions):
        base = f"group.completions[{i}]"
        tokens = _check_tokens(c.token_ids, f"{base}.token_ids", vocab_size, max_new_tokens, "max_new_tokens")
        logprobs = _check_logprobs(c.logprobs, len(tokens), f"{base}.logprobs")
        if not math.isfinite(c.reward):
            raise InvalidArgument(f"{base}.reward = {c.reward} is not finite", field=f"{base}.reward", value=c.reward)
        if c.policy_version > learner_version:
            raise InvalidArgument(f"{base}.policy_version {c.policy_version} is newer than the learner's {learner_version}",
                                  field=f"{base}.policy_version", value=c.policy_version)
        errors += int(c.verifier_error)
        completions.append({"token_ids": tokens, "logprobs": logprobs, "reward": float(c.reward),
                            "policy_version": int(c.policy_version)})
    versions = [c["policy_version"] for c in completions]
    return ValidatedGroup(actor_id=chunk.actor_id, episode_id=chunk.episode_id, task_id=task, prompt_id=g.prompt_id,
                          ticket_id=g.ticket_id, admitted_version=int(g.admitted_version),
                          group={"prompt_token_ids": prompt, "completions": completions},
                          min_version=min(versions), max_version=max(versions), verifier_errors=errors)


def reason_of(exc: FleetloopError) -> str:
    """Metric label of a refusal: its field with indices removed (``group.completions.logprobs``)."""
    return _INDEX.sub("", exc.field or "message") or "message"


class GroupIngestor:
    """Exactly-once storage of validated groups; hands each new one to ``on_group``.

    ``ingest`` has the signature the servicer calls on any core's ingestor and returns True for a
    duplicate. ``limits`` are the keyword arguments of :func:`validate_group` except learner_version.
    ``journal`` (optional; anything with ``append(payload, key) -> index``) makes storage durable: the
    chunk's bytes are appended before the group is stored, and an append that fails stores nothing
    (the error reaches the sender, who resends). Without it the ledger lives in memory only.
    """

    def __init__(self, limits: dict[str, Any], on_group: Callable[[ValidatedGroup], None], metrics=None,
                 journal=None) -> None:
        self.limits = dict(limits)
        self.on_group = on_group
        self.m = metrics
        self.journal = journal
        self.lock = threading.Lock()
        self._seen: dict[tuple[str, int], bytes | None] = {}  # key -> content digest (None: compacted, unknown)
        self.duplicates = 0
        self.stored = 0
        self.rejected: dict[str, int] = {}

    def known(self, key: tuple[str, int]) -> bool:
        """True when (episode_id, seq) is in the ledger."""
        with self.lock:
            return key in self._seen

    def remember(self, key: tuple[str, int], payload: bytes | None = None) -> None:
        """Put (episode_id, seq) in the ledger without storing anything (replay of the journal); with the
        record's ``payload`` its digest too (compacted keys have none: any valid resend of them is a duplicate)."""
        key = (str(key[0]), int(key[1]))
        with self.lock:
            if payload is not None or key not in self._seen:
                self._seen[key] = digest(payload) if payload is not None else None

    def _duplicate(self, key: tuple[str, int], content: bytes) -> bool:
        """True when ``key`` is stored with this content; FailedPrecondition when with other content (caller
        holds the lock)."""
        if key not in self._seen:
            return False
        stored = self._seen[key]
        if stored is not None and stored != content:
            raise FailedPrecondition(f"group (episode {key[0]!r}, seq {key[1]}) is already stored with other content "
                                     f"(digest {stored.hex()} != {content.hex()}): a resend must be byte-identical",
                                     field="seq", value=key[1])
        self.duplicates += 1
        return True

    def ingest(self, chunk, nbytes: int, learner_version: int, raw: bytes | None = None, durable: bool = True) -> bool:
        """Validate and store ``chunk``; True when (episode_id, seq) was stored before (nothing stored now).
        With a journal and ``durable``, ``raw`` (the chunk's wire bytes; re-serialised when None) is logged
        first."""
        key = (chunk.episode_id, int(chunk.seq))
        raw = raw if raw is not None else chunk.SerializeToString()
        content = digest(raw)
        try:  # validation first, also for a resend: a resend with NaN or of another job is refused, never acked
            vg = validate_group(chunk, learner_version=learner_version, **self.limits)
        except FleetloopError as exc:
            reason = reason_of(exc)
            with self.lock:
                self.rejected[reason] = self.rejected.get(reason, 0) + 1
            if self.m is not None:
                self.m.rejected.labels(self.m.job, reason).inc()
            raise
        with self.lock:
            if self._duplicate(key, content):  # also when raced with a resend on another stream
                return True
            if durable and self.journal is not None:
                vg.record = self.journal.append(raw, key)
            self._seen[key] = content
            self.stored += 1
            self.on_group(vg)
        return False
