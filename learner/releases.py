"""Release channels of a robot job: a ``stable`` version, at most one ``candidate``, canary cohorts,
automatic promotion and rollback (issue 21; contract: docs/notes/issue21-plan.md).

:class:`ReleaseManager` owns, for one learner:

- the **cohorts**: an actor is ``canary`` when it is in ``policy.canary_actors`` (when that list is
  set) or when ``sha256(salt:actor_id)``, read as a number in [0, 1), is below ``canary_fraction``;
  otherwise ``stable``. The salt (the job id when the file is first written) and the actors seen are
  persisted, so an actor's cohort is a pure function of (salt, policy, actor id): the same after a
  restart, and raising the fraction only moves actors into the canary cohort;
- the **channels**: with ``strategy: all`` every robot is told the newest version (channel ""); with
  ``canary`` the canary cohort is told the candidate (channel "candidate") while one is open, everyone
  else the stable version (channel "stable"). An operator **pin overrides releases**: every robot is
  told the pinned version (channel "") and the open window collects no evidence while it lasts;
- the **window** of the open candidate: episode ends (:meth:`on_episode_end`) are tallied per
  (behaviour version, cohort of the actor, task); the candidate's canary-cohort episodes are judged
  against the stable version's stable-cohort episodes of the same window (concurrent), by
  :func:`learner.release_stats.judge` after each such episode;
- the **decisions**: ``promoted`` (the candidate becomes stable), ``rolled_back`` (automatic) or
  ``aborted`` (operator, or the strategy set to ``all``), each appended to the history. After any
  decision the next candidate is offered at once: the newest published version newer than the decided
  one (and newer than stable), if any, else the next publish (:meth:`on_publish`). An automatic
  rollback with ``retrain_from_stable_on_rollback`` first calls ``retrain(stable)`` (the core's
  rollback: the learner's training weights go back to stable, published as a new version); candidates
  are then only versions newer than that copy (the copy itself is not offered: its weights are
  stable's). An operator abort does not retrain (the operator's ``rollback`` command does that).

The learner keeps training and publishing throughout: versions published while a candidate is judged
are simply not offered until the window closes. **Staleness**: the stable cohort (and the canary while
it runs an older candidate) produce data of an older behaviour version; it is gated by the unchanged
staleness rules (:mod:`learner.staleness`): past the bound its autonomous frames are dropped (or
down-weighted) for training, intervention frames are kept. Release evidence does not depend on it:
an episode's end is counted whether or not its frames were stored.

Persistence: ``STATE/releases.json``, written atomically (:func:`fleetloop.dataset.atomic_write`) on
every change of channels, policy, history or actors, and at most every ``PERSIST_EVERY_S`` for
evidence (plus :meth:`flush`). A crash loses at most that much evidence; the ingest-log replay at
start-up does not re-feed it. The policy in the file wins over the learner config's only when an
operator set it (``set_rollout``). The stable and candidate versions are never pruned from the
weight store (:meth:`protected`).

Thread-safety: one re-entrant lock; the weight store is read under it (never the other way round:
:meth:`protected` takes no lock), and ``retrain`` (which takes the core's training lock and publishes)
is called with the lock released.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path
from typing import Any, Callable, Protocol

from fleetloop.dataset import atomic_write
from fleetloop.errors import FailedPrecondition
from fleetloop.logs import event, get_logger
from learner.release_stats import Judgement, Tally, cohort_metrics, judge, p_not_worse
from learner.releases_config import RolloutPolicy, parse_policy

log = get_logger("learner.releases")
PERSIST_EVERY_S = 1.0
HISTORY_MAX = 200
FORMAT = 1


class EpisodeEnd(Protocol):
    """What an ended episode tells the release manager (:class:`learner.ingest.EpisodeRecord`)."""

    actor_id: str
    task_id: str
    outcome: str
    steps: int
    intervention_steps: int
    behavior_version: int
    reward: float


def canary_score(salt: str, actor_id: str) -> float:
    """The actor's position in [0, 1): the first 52 bits of sha256(``salt:actor_id``)."""
    return int(hashlib.sha256(f"{salt}:{actor_id}".encode()).hexdigest()[:13], 16) / float(1 << 52)


class ReleaseManager:
    """See the module docstring. ``weights``: the learner's :class:`~learner.weight_store.WeightStore`;
    ``metrics``: its :class:`~learner.metrics.LearnerMetrics` (None: no metrics); ``retrain(version)``:
    continue training from ``version``, returning the version it published (None: never retrain)."""

    def __init__(self, job: str, path: Path, policy: RolloutPolicy, weights: Any, metrics: Any = None,
                 retrain: Callable[[int], int] | None = None, clock: Callable[[], float] = time.time) -> None:
        self.job, self.path, self.weights, self.metrics = job, Path(path), weights, metrics
        self.retrain, self.clock = retrain, clock
        self._lock = threading.RLock()
        self.policy, self._policy_by = policy, "config"
        self.salt = job
        self.actors: set[str] = set()
        self.stable: int | None = None
        self.candidate: int | None = None
        self.opened_at: float | None = None
        self.floor = -1  # versions <= floor are never offered (decided ones, a retrain's copy of stable)
        self.evidence: dict[tuple[int, str, str], Tally] = {}
        self.history: list[dict[str, Any]] = []
        self._next_id = 1
        self._holding = False  # a retrain is running: offer nothing until its copy of stable is published
        self._dirty, self._last_persist = False, 0.0
        self._protected: frozenset[int] = frozenset()
        self._canary_set: frozenset[str] = frozenset()
        loaded = self._load()
        with self._lock:
            self._apply_policy(self.policy if self._policy_by == "operator" else policy, self._policy_by, "auto")
            self._offer()
            self._sync(persist=not loaded or self._dirty)

    # -- cohorts and channels ------------------------------------------------------------------
    def cohort(self, actor_id: str) -> str:
        """"canary" or "stable" (module docstring); the same answer for any strategy."""
        if self.policy.canary_actors:
            return "canary" if actor_id in self._canary_set else "stable"
        return "canary" if canary_score(self.salt, actor_id) < self.policy.canary_fraction else "stable"

    def assignment(self, actor_id: str) -> tuple[int | None, str]:
        """(version the actor is told to run, channel). Version None: the newest (strategy all, or
        nothing published yet). Channel: "candidate" / "stable" with strategy canary, "" with strategy
        all or while an operator pin holds (the version is then the pin)."""
        with self._lock:
            self._see(actor_id)
            pinned = self.weights.pinned
            if pinned is not None:
                return pinned, ""
            if self.policy.strategy == "all" or self.stable is None:
                return None, ""
            if self.candidate is not None and self.cohort(actor_id) == "canary":
                return self.candidate, "candidate"
            return self.stable, "stable"

    def target_version(self, actor_id: str) -> int | None:
        """The version ``actor_id`` should run (None before the first publish)."""
        version, _ = self.assignment(actor_id)
        if version is None:
            latest = self.weights.latest
            return None if latest is None else latest.version
        return version

    def channel(self, actor_id: str) -> str:
        """The channel announced to ``actor_id`` ("candidate", "stable" or "")."""
        return self.assignment(actor_id)[1]

    @property
    def retraining(self) -> bool:
        """True while an automatic rollback's retrain from stable is pending (nothing is offered until
        its copy of stable is published)."""
        return self._holding

    def protected(self) -> frozenset[int]:
        """Versions retention must keep (stable, candidate). Lock-free: the weight store calls it while
        holding its own lock."""
        return self._protected

    # -- events from the learner ------------------------------------------------------------------
    def on_publish(self, info: Any) -> None:
        """A version was published (any publisher: training, a rollback, a test). Strategy all: it is
        the new stable; canary: the first version becomes stable, later ones are offered as candidate
        when no window is open."""
        with self._lock:
            if self.policy.strategy == "all" or self.stable is None:
                self.stable = max(self.stable if self.stable is not None else -1, int(info.version))
            else:
                self._offer()
            self._sync(persist=True)

    def on_episode_end(self, rec: EpisodeEnd) -> None:
        """Count one ended robot episode (called by the ingestor for every new episode end, outside
        its lock) and decide when the evidence suffices. Counted in the window when the strategy is
        canary, a candidate is open, nothing is pinned and the episode ran the candidate or stable."""
        retrain_from = None
        with self._lock:
            new_actor = self._see(rec.actor_id, persist=False)
            version = int(rec.behavior_version)
            if self.metrics is not None:
                self.metrics.release_exposure.labels(self.job, self._episode_channel(version)).inc()
            decided = False
            if self._judging() and version in (self.candidate, self.stable):
                cohort = self.cohort(rec.actor_id)
                tally = self.evidence.setdefault((version, cohort, rec.task_id), Tally())
                tally.add(rec.outcome, rec.steps, rec.intervention_steps, float(getattr(rec, "reward", 0.0)))
                self._dirty = True
                if (version, cohort) in ((self.candidate, "canary"), (self.stable, "stable")):
                    j = self._judge()
                    if j.decision is not None:
                        decided = True
                        retrain_from = self._close("promoted" if j.decision == "promote" else "rolled_back", "auto",
                                                   j.reason, j.p_not_worse)
            self._sync(persist=new_actor or decided)
        if retrain_from is not None:
            self._retrain(retrain_from)

    # -- operator -------------------------------------------------------------------------------
    def promote(self, by: str = "operator") -> dict[str, Any]:
        """Promote the open candidate now (FailedPrecondition naming ``candidate`` when none is open)."""
        with self._lock:
            cand = self._require_candidate("promote")
            self._close("promoted", "operator" if by != "auto" else "auto", f"promoted by {by}", self._p_now())
            self._sync(persist=True)
            return {"promoted": cand, "stable": self.stable, "candidate": self.candidate}

    def abort(self, by: str = "operator") -> dict[str, Any]:
        """Reject the open candidate now; the canary cohort goes back to stable (no retrain);
        FailedPrecondition naming ``candidate`` when none is open."""
        with self._lock:
            cand = self._require_candidate("abort")
            self._close("aborted", "operator", f"aborted by {by}", self._p_now())
            self._sync(persist=True)
            return {"aborted": cand, "stable": self.stable, "candidate": self.candidate}

    def set_policy(self, policy: RolloutPolicy | dict[str, Any], by: str = "operator") -> dict[str, Any]:
        """Replace the rollout policy (InvalidArgument naming ``rollout.<field>``). Canary -> all aborts
        an open candidate (every robot then runs the newest); all -> canary makes the newest version
        stable and offers the next one. Persisted; survives restarts. Returns the policy."""
        p = parse_policy(policy)
        with self._lock:
            self._apply_policy(p, "operator", "operator")
            self._offer()
            self._sync(persist=True)
            event(log, "rollout_set", job=self.job, by=by, strategy=p.strategy)
            return p.model_dump()

    # -- views ----------------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        """The contract's JSON (docs/notes/issue21-plan.md): strategy, policy, stable, candidate,
        cohorts, evidence of the current window and the history (oldest first)."""
        with self._lock:
            canary = sorted(a for a in self.actors if self.cohort(a) == "canary") if self.policy.strategy == "canary" else []
            cand, stab = self._window_tallies()
            return {"strategy": self.policy.strategy, "policy": self.policy.model_dump(), "stable": self.stable,
                    "candidate": self.candidate,
                    "cohorts": {"canary": canary, "stable": sorted(self.actors - set(canary))},
                    "evidence": {"candidate": cohort_metrics(cand), "stable": cohort_metrics(stab)},
                    "history": [dict(h) for h in self.history]}

    def flush(self, due_only: bool = False) -> None:
        """Write pending evidence now (``due_only``: only when ``PERSIST_EVERY_S`` has passed)."""
        with self._lock:
            if self._dirty and (not due_only or self.clock() - self._last_persist >= PERSIST_EVERY_S):
                self._persist()

    # -- internals (caller holds the lock) ------------------------------------------------------
    def _see(self, actor_id: str, persist: bool = True) -> bool:
        if actor_id in self.actors:
            return False
        self.actors.add(actor_id)
        self._dirty = True
        if persist:
            self._persist()
        return True

    def _judging(self) -> bool:
        return self.policy.strategy == "canary" and self.candidate is not None and self.weights.pinned is None

    def _episode_channel(self, version: int) -> str:
        if self.weights.pinned is not None:
            return "pinned"
        if self.policy.strategy == "all":
            return "all"
        return "candidate" if version == self.candidate else "stable" if version == self.stable else "other"

    def _window_tallies(self) -> tuple[dict[str, Tally], dict[str, Tally]]:
        cand = {t: x for (v, c, t), x in self.evidence.items() if v == self.candidate and c == "canary"}
        stab = {t: x for (v, c, t), x in self.evidence.items() if v == self.stable and c == "stable"}
        return cand, stab

    def _judge(self) -> Judgement:
        p = self.policy
        cand, stab = self._window_tallies()
        return judge(cand, stab, p.metrics, p.min_episodes, p.max_episodes, p.max_regression, p.confidence)

    def _p_now(self) -> float | None:
        cand, stab = self._window_tallies()
        ps = [p_not_worse(m, cand, stab, self.policy.max_regression) for m in self.policy.metrics]
        ps = [x for x in ps if x is not None]
        return round(min(ps), 4) if ps else None

    def _require_candidate(self, what: str) -> int:
        if self.candidate is None:
            raise FailedPrecondition(f"cannot {what}: job {self.job!r} has no release candidate (strategy "
                                     f"{self.policy.strategy}, stable {self.stable})", field="candidate", value=None)
        return self.candidate

    def _offer(self) -> None:
        """Open a window for the newest version when none is open (module docstring)."""
        if self.policy.strategy != "canary" or self.candidate is not None or self._holding:
            return
        latest = self.weights.latest
        if latest is None:
            return
        if self.stable is None:
            self.stable = latest.version
            return
        if latest.version > max(self.floor, self.stable):
            self.candidate, self.opened_at, self.evidence = latest.version, self.clock(), {}
            self._dirty = True
            event(log, "release_opened", job=self.job, candidate=self.candidate, stable=self.stable)

    def _close(self, decision: str, by: str, reason: str, p: float | None) -> int | None:
        """Record the decision on the open candidate and move on. Returns the version to retrain from
        (automatic rollback with retrain_from_stable_on_rollback), else None (the next candidate is
        already offered)."""
        cand_t, stab_t = self._window_tallies()
        entry = {"id": self._next_id, "candidate": self.candidate, "stable": self.stable, "opened_at": self.opened_at,
                 "decided_at": self.clock(), "decision": decision, "by": by, "reason": reason,
                 "episodes": {"canary": sum(t.episodes for t in cand_t.values()),
                              "stable": sum(t.episodes for t in stab_t.values())},
                 "metrics": {"candidate": cohort_metrics(cand_t), "stable": cohort_metrics(stab_t)},
                 "p_not_worse": p}
        self._next_id += 1
        self.history = (self.history + [entry])[-HISTORY_MAX:]
        if self.metrics is not None:
            self.metrics.release_decisions.labels(self.job, decision, by).inc()
        event(log, "release_decided", job=self.job, decision=decision, by=by, candidate=self.candidate,
              stable=self.stable, reason=reason[:300])
        decided = int(self.candidate)  # type: ignore[arg-type]
        if decision == "promoted":
            self.stable = decided
        self.floor = max(self.floor, decided)
        self.candidate, self.opened_at, self.evidence = None, None, {}
        self._dirty = True
        if decision == "rolled_back" and by == "auto" and self.policy.retrain_from_stable_on_rollback \
                and self.retrain is not None and self.stable is not None:
            self._holding = True
            return self.stable
        self._offer()
        return None

    def _retrain(self, version: int) -> None:
        """Run ``retrain(version)`` (lock released), then offer versions newer than its copy of stable."""
        published = None
        try:
            published = self.retrain(version)  # type: ignore[misc]
        except Exception as exc:  # the release state must move on even if the rollback failed
            event(log, "release_retrain_failed", level=40, job=self.job, version=version, error=repr(exc)[:300])
        with self._lock:
            self._holding = False
            if published is not None:
                self.floor = max(self.floor, int(published))
            event(log, "release_retrained", job=self.job, source_version=version, version=published)
            self._offer()
            self._sync(persist=True)

    def _apply_policy(self, p: RolloutPolicy, by: str, decided_by: str) -> None:
        """Switch to ``p`` (set by "config" or "operator"); see :meth:`set_policy`."""
        self.policy, self._policy_by = p, by
        self._canary_set = frozenset(p.canary_actors)
        if p.strategy == "all":
            if self.candidate is not None:
                self._close("aborted", decided_by, "strategy set to all", self._p_now())
            latest = self.weights.latest
            if latest is not None:
                self.stable = latest.version
        self._dirty = True

    def _sync(self, persist: bool) -> None:
        """Refresh what others read without the lock (protected versions, gauges); persist when asked
        or when evidence is due."""
        self._protected = frozenset(v for v in (self.stable, self.candidate) if v is not None)
        if self.metrics is not None:
            for channel, v in (("stable", self.stable), ("candidate", self.candidate)):
                self.metrics.release_version.labels(self.job, channel).set(-1 if v is None else v)
        if persist or (self._dirty and self.clock() - self._last_persist >= PERSIST_EVERY_S):
            self._persist()

    def _persist(self) -> None:
        data = {"format": FORMAT, "job": self.job, "salt": self.salt, "policy": self.policy.model_dump(),
                "policy_by": self._policy_by, "stable": self.stable, "candidate": self.candidate,
                "opened_at": self.opened_at, "floor": self.floor, "next_id": self._next_id,
                "actors": sorted(self.actors), "history": self.history,
                "evidence": [[v, c, t, x.to_json()] for (v, c, t), x in sorted(self.evidence.items())]}
        atomic_write(self.path, json.dumps(data).encode())
        self._dirty, self._last_persist = False, self.clock()

    def _load(self) -> bool:
        """Read the file, if any (True). An unreadable file is set aside as ``releases.json.corrupt``
        and the state starts fresh (logged as an error)."""
        if not self.path.exists():
            return False
        try:
            data = json.loads(self.path.read_text())
            policy = RolloutPolicy.model_validate(data["policy"])
            evidence = {(int(v), str(c), str(t)): Tally.from_json(x) for v, c, t, x in data.get("evidence", [])}
        except (ValueError, KeyError, TypeError) as exc:
            event(log, "releases_file_unreadable", level=40, job=self.job, path=str(self.path), error=repr(exc)[:300])
            self.path.replace(self.path.with_name(self.path.name + ".corrupt"))
            return False
        self.salt = str(data.get("salt", self.job))
        self.policy, self._policy_by = policy, data.get("policy_by", "config")
        self.stable, self.candidate = data.get("stable"), data.get("candidate")
        self.opened_at, self.floor = data.get("opened_at"), int(data.get("floor", -1))
        self._next_id = int(data.get("next_id", 1))
        self.actors = set(data.get("actors", []))
        self.history = list(data.get("history", []))
        self.evidence = evidence
        known = {v.version for v in self.weights.versions()}
        for name in ("stable", "candidate"):  # a version the weight store no longer has cannot be served
            v = getattr(self, name)
            if v is not None and v not in known:
                event(log, "release_version_missing", level=30, job=self.job, channel=name, version=v)
                setattr(self, name, None)
                self._dirty = True
        return True
