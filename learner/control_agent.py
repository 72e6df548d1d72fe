"""The learner's side of the control plane: report to Redis, execute operator commands from it.

Runs as one background thread inside the learner process (Ray actor or pod). Each tick
(``interval_s``, 1 s by default) it writes, in one pipeline (key layout in
:mod:`fleetloop.redis_keys`):

- a heartbeat (with a TTL, so a dead learner is visible as a missing key);
- the status snapshot, and one row per actor for the fleet table;
- the version index: one row per *retained* version (version, step, time, digest, ``kept``), kept
  equal to the weight store: new versions are added (plus a ``published`` event), rows whose
  ``kept`` mark changed are rewritten, and versions retention deleted are removed (the first tick
  after a start also removes rows a previous learner left for versions no longer on disk), so the
  API lists and serves only versions whose weights exist;
- every ``series_every_s`` a time-series point for the dashboard's charts (per-task success and
  intervention rates over the window since the previous point, loss, updates/s, ingest rate,
  buffer sizes, version, staleness);

- the release snapshot (:meth:`learner.releases.ReleaseManager.snapshot`, key ``releases``, plus
  ``time``: when it was written) of a core with release channels, and one ``release_decided`` event per new history entry (decision, by,
  reason, candidate, stable, p_not_worse; entries decided before this agent started are not re-sent);

and then pops operator commands (``pause``, ``resume``, ``pin``, ``unpin``, ``keep``, ``unkeep``,
``rollback``, ``drain``, ``release_promote``, ``release_abort``, ``set_rollout``) from the job's command
list and writes each result under ``fl:cmd:{id}``.

When the learner stops (:meth:`ControlAgent.stop`), a last tick is followed by the final report
(:meth:`ControlAgent.report_final`): the status is kept without TTL (``fl:job:{id}:final``, ingest
and update rates 0), every actor row gets its final status (``stopped`` or ``left``) and the
heartbeat is deleted, so the job's numbers outlive the learner.

Actor rows carry ``dropped``: steps of that actor dropped at ingest, by the staleness gate's reason
(``stale``, ``stale_expert_only``, ``future_version``).

Invariant: the learner never depends on Redis to train or serve. A Redis error is logged (at
most once per ``error_log_every_s``) and the tick is retried; commands are at-most-once (popped
before execution; the result key says whether it ran).
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any, Callable

import redis

from fleetloop import redis_keys as keys
from fleetloop.errors import FailedPrecondition, FleetloopError, InvalidArgument
from fleetloop.logs import event, get_logger
from learner.api import JobState, LearnerCore, Rollback

log = get_logger("learner.control")

ACTIVE_S = 10.0   # an actor whose newest chunk is younger than this is "active"
IDLE_S = keys.ACTOR_GONE_S  # ... younger than this "idle", older "gone"


def actor_status(last_seen: float, now: float, job_state: str) -> str:
    """Fleet-table status of an actor from the age of its newest chunk."""
    if job_state == JobState.STOPPING:
        return "stopping"
    age = now - last_seen
    if age < ACTIVE_S:
        return "active"
    return "idle" if age < IDLE_S else "gone"


class ControlAgent:
    """See module docstring. ``sessions`` returns the gRPC servicer's handshake sessions. ``rollback``
    needs a core that implements :class:`learner.api.Rollback` (robot jobs); on any other it fails
    with FAILED_PRECONDITION (409)."""

    def __init__(self, core: LearnerCore, redis_url: str, sessions: Callable[[], dict[str, dict]] = dict, interval_s: float = 1.0,
                 series_every_s: float = 2.0, error_log_every_s: float = 60.0) -> None:
        self.core = core
        self.job = core.job
        self.redis = redis.Redis.from_url(redis_url, socket_timeout=5.0, socket_connect_timeout=5.0, decode_responses=True)
        self.sessions = sessions
        self.interval_s, self.series_every_s, self.error_log_every_s = interval_s, series_every_s, error_log_every_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._reported_version = -1
        self._version_rows: dict[int, str] | None = None  # what the version index holds (None: not read yet)
        self._episode_index = 0
        self._last_point: tuple[float, int, int] | None = None  # (time, learner step, ingested steps)
        self._last_error_log = 0.0
        releases = getattr(core, "releases", None)
        self._release_seen = max((h["id"] for h in releases.snapshot()["history"]), default=0) if releases else 0
        self.errors = 0
        self.ticks = 0

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._episode_index, _ = self.core.episodes_since(1 << 62)  # series start now
            self._thread = threading.Thread(target=self._run, name=f"fleetloop-control-{self.job}", daemon=True)
            self._thread.start()
            self.emit("learner_started", version=self.core.version, step=self.core.step)

    def stop(self, final_tick: bool = True) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if final_tick:
            try:
                self.tick()
                self.report_final()
            except redis.RedisError as exc:  # the launcher keeps the last status when it reaps the learner
                event(log, "final_report_failed", level=30, job=self.job, error=repr(exc)[:200])

    def _run(self) -> None:
        next_point = time.monotonic()
        while not self._stop.is_set():
            try:
                self.tick(point=time.monotonic() >= next_point)
                if time.monotonic() >= next_point:
                    next_point = time.monotonic() + self.series_every_s
                if self.run_commands():
                    self.tick()  # report the commands' effect at once
            except redis.RedisError as exc:
                self.errors += 1
                if time.monotonic() - self._last_error_log > self.error_log_every_s:
                    self._last_error_log = time.monotonic()
                    event(log, "control_plane_unreachable", level=30, job=self.job, error=repr(exc)[:200])
            except Exception as exc:  # never let reporting kill the learner
                self.errors += 1
                event(log, "control_agent_error", level=40, job=self.job, error=repr(exc)[:300])
            self._stop.wait(self.interval_s)

    # -- reporting ---------------------------------------------------------------------------
    def emit(self, kind: str, **data: Any) -> None:
        """Append one event to the job's event stream (best effort)."""
        try:
            self.redis.xadd(keys.events(self.job), {"type": kind, "data": json.dumps(data), "source": "learner"},
                            maxlen=keys.EVENTS_MAX, approximate=True)
        except redis.RedisError:
            self.errors += 1

    def actor_rows(self, status: dict[str, Any], now: float) -> dict[str, dict[str, Any]]:
        """One fleet-table row per actor: handshake sessions merged with ingest tallies."""
        latest = max(status["version"], 0)
        rows: dict[str, dict[str, Any]] = {}
        for sess in sorted(self.sessions().values(), key=lambda s: s["since"]):
            rows[sess["actor_id"]] = {"actor_id": sess["actor_id"], "kind": sess.get("kind", "robot"), "tasks": sess["tasks"],
                                      "connected_at": sess["since"], "task": "", "version": -1, "last_seen": sess["since"],
                                      "steps": 0, "intervention_steps": 0, "episodes": 0, "successes": 0, "dropped": {},
                                      "revoked": bool(sess.get("revoked"))}
        for actor_id, tally in status["actors"].items():
            row = rows.setdefault(actor_id, {"actor_id": actor_id, "kind": "robot", "tasks": [], "connected_at": None})
            row.update(tally)  # the core's status copies each actor's dropped counts
        for row in rows.values():
            row["status"] = "revoked" if row.get("revoked") else actor_status(row["last_seen"], now, status["job_state"])
            row["staleness"] = latest - row["version"] if row["version"] >= 0 else None
            row["intervention_ratio"] = row["intervention_steps"] / row["steps"] if row["steps"] else 0.0
            row["success_rate"] = row["successes"] / row["episodes"] if row["episodes"] else None
        return rows

    def series_point(self, status: dict[str, Any], now: float) -> dict[str, Any]:
        """Rates over the window since the previous point (per task: success, interventions)."""
        self._episode_index, episodes = self.core.episodes_since(self._episode_index)
        per_task: dict[str, dict[str, float]] = {}
        for t in self.core.cfg.tasks:
            eps = [e for e in episodes if e["task_id"] == t]
            steps = sum(e["steps"] for e in eps)
            per_task[t] = {"episodes": len(eps),
                           "success": sum(e["outcome"] == "success" for e in eps) / len(eps) if eps else None,
                           "intervention": sum(e["intervention_steps"] for e in eps) / steps if steps else None}
        prev = self._last_point
        self._last_point = (now, status["step"], status["ingested_steps"])
        dt = now - prev[0] if prev else 0.0
        tasks = status["tasks"]
        return {
            "t": now, "version": status["version"], "step": status["step"], "loss": status["loss"],
            "updates_per_s": (status["step"] - prev[1]) / dt if prev and dt > 0 else None,
            "ingest_steps_per_s": (status["ingested_steps"] - prev[2]) / dt if prev and dt > 0 else None,
            "online_buffer": sum(v["online_buffer"] for v in tasks.values()),
            "offline_buffer": sum(v["offline_buffer"] for v in tasks.values()),
            "staleness_max": status["staleness_max_autonomous"], "tasks": per_task,
        }

    def tick(self, point: bool = False) -> None:
        """One report (heartbeat, status, actors, new versions, optionally a series point)."""
        now = time.time()
        status = self.core.status()
        rows = self.actor_rows(status, now)
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(keys.heartbeat(self.job), json.dumps(now), ex=keys.HEARTBEAT_TTL_S)
        pipe.set(keys.status(self.job), json.dumps(status))
        if rows:
            pipe.hset(keys.actors(self.job), mapping={a: json.dumps(r) for a, r in rows.items()})
        infos, rows_now = self._versions_now()
        new_versions = [v for v in infos if v.version > self._reported_version]
        if self._version_rows is None:  # rows a previous learner left for versions no longer on disk go too
            self._version_rows = {int(v): "" for v in self.redis.hkeys(keys.versions(self.job)) if v.isdigit()}
        changed = {str(v): r for v, r in rows_now.items() if self._version_rows.get(v) != r}
        gone = [str(v) for v in self._version_rows if v not in rows_now]
        if changed:
            pipe.hset(keys.versions(self.job), mapping=changed)
        for i in range(0, len(gone), 1000):
            pipe.hdel(keys.versions(self.job), *gone[i:i + 1000])
        releases = getattr(self.core, "releases", None)
        snapshot = releases.snapshot() if releases is not None else None
        if snapshot is not None:
            pipe.set(keys.releases(self.job), json.dumps({**snapshot, "time": now}))  # + when it was written
        if point:
            pipe.rpush(keys.series(self.job), json.dumps(self.series_point(status, now)))
            pipe.ltrim(keys.series(self.job), -keys.SERIES_MAX, -1)
        pipe.execute()
        self._version_rows = rows_now
        if new_versions:
            self._reported_version = new_versions[-1].version
            self.emit("published", version=self._reported_version, step=new_versions[-1].learner_step,
                      count=len(new_versions))
        for h in (snapshot or {}).get("history", []):
            if h["id"] > self._release_seen:
                self._release_seen = h["id"]
                self.emit("release_decided", id=h["id"], decision=h["decision"], by=h["by"], reason=h["reason"],
                          candidate=h["candidate"], stable=h["stable"], p_not_worse=h["p_not_worse"],
                          episodes=h["episodes"])
        self.ticks += 1

    def report_final(self) -> dict[str, Any]:
        """The learner stopped: keep its status without TTL (:func:`fleetloop.redis_keys.final_report`),
        give every actor row its final status (``stopped`` / ``left``) and delete the heartbeat, in
        one pipeline. Returns the final status. Raises redis errors (the caller logs them)."""
        now = time.time()
        final = keys.final_report(self.core.status(), now)
        rows = {a: keys.final_actor_row(r, now) for a, r in self.actor_rows(final, now).items()}
        pipe = self.redis.pipeline(transaction=True)
        pipe.set(keys.final_status(self.job), json.dumps(final))
        if rows:
            pipe.hset(keys.actors(self.job), mapping={a: json.dumps(r) for a, r in rows.items()})
        pipe.delete(keys.heartbeat(self.job))
        pipe.execute()
        return final

    def _versions_now(self) -> tuple[list[Any], dict[int, str]]:
        """The weight store's retained versions (oldest first) and the version index rows they make:
        the newest ``keys.VERSIONS_MAX`` plus version 0, the pinned one and every kept one."""
        weights = self.core.weights
        infos, kept, pinned = weights.versions(), weights.kept, weights.pinned
        newest = {v.version for v in infos[-keys.VERSIONS_MAX:]}
        return infos, {v.version: json.dumps(
            {"version": v.version, "step": v.learner_step, "published_at": v.published_at, "sha256": v.sha256,
             "size_bytes": v.size_bytes, "kept": v.version in kept})
            for v in infos if v.version in newest or v.version in kept or v.version in (0, pinned)}

    # -- commands ----------------------------------------------------------------------------
    def run_commands(self, limit: int = 16) -> int:
        """Pop and execute up to ``limit`` queued commands; returns how many ran."""
        n = 0
        while n < limit:
            raw = self.redis.lpop(keys.commands(self.job))
            if raw is None:
                break
            n += 1
            try:
                cmd = json.loads(raw)
                cmd_id = str(cmd["id"])
            except (ValueError, KeyError, TypeError):
                event(log, "command_malformed", level=30, job=self.job, raw=str(raw)[:200])
                continue
            result = self.execute(cmd)
            self.redis.set(keys.command_result(cmd_id), json.dumps(result), ex=3600)
            self.emit("command", id=cmd_id, op=cmd.get("op"), by=cmd.get("by"), ok=result["ok"],
                      error=result.get("error"), result=result.get("result"))
        return n

    def execute(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Run one command on the core; returns {"ok", "result" | "error", "status"}."""
        op, args = cmd.get("op"), cmd.get("args") or {}
        try:
            if op == "pause":
                self.core.set_paused(True)
                result: Any = {"paused": True}
            elif op == "resume":
                self.core.set_paused(False)
                result = {"paused": False}
            elif op == "pin":
                self.core.pin(int(args["version"]))
                result = {"pinned": int(args["version"])}
            elif op == "unpin":
                self.core.pin(None)
                result = {"pinned": None}
            elif op in ("keep", "unkeep"):
                self.core.keep(int(args["version"]), op == "keep")
                result = {"version": int(args["version"]), "kept": op == "keep"}
            elif op == "rollback":
                if not isinstance(self.core, Rollback):
                    raise FailedPrecondition(f"job {self.job!r} ({self.core.kind}) cannot roll back; pin a version instead",
                                             field="op", value=op)
                result = {"source_version": int(args["version"]), "version": self.core.rollback(int(args["version"]))}
            elif op in ("release_promote", "release_abort", "set_rollout"):
                releases = getattr(self.core, "releases", None)
                if releases is None:
                    raise FailedPrecondition(f"job {self.job!r} ({self.core.kind}) has no release channels (it runs "
                                             "strategy all)", field="op", value=op)
                who = str(cmd.get("by") or "operator")
                result = releases.promote(who) if op == "release_promote" else releases.abort(who) \
                    if op == "release_abort" else {"policy": releases.set_policy(args, who)}
            elif op == "drain":
                self.core.begin_stop()
                result = {"job_state": JobState.STOPPING.value}
            else:
                raise InvalidArgument(f"unknown command op {op!r}", field="op", value=op)
        except FleetloopError as exc:
            return {"ok": False, "error": str(exc), "status": exc.http_status}
        except (KeyError, TypeError, ValueError) as exc:
            return {"ok": False, "error": f"bad arguments for {op!r}: {exc!r}", "status": 422}
        event(log, "command_executed", job=self.job, version=self.core.version, op=op, by=cmd.get("by"))
        return {"ok": True, "result": result, "status": 200}
