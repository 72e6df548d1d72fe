"""Control-plane state in Redis: jobs, events, commands, enrollments, API keys, and what the
learners report (key layout: :mod:`fleetloop.redis_keys`).

Invariants:
- a job record is only ever rewritten whole, under WATCH (optimistic locking), so concurrent API
  workers never lose each other's updates;
- secrets are stored as sha256 digests only; the plain token or key is returned once, on creation;
- every state change of a job is also appended to its event stream.
"""

from __future__ import annotations

import json
import secrets
import time
import uuid
from typing import Any, Literal

import redis
from pydantic import BaseModel, Field

from fleetloop import redis_keys as keys
from fleetloop.errors import FailedPrecondition, InvalidArgument, NotFound, Unauthenticated, Unavailable
from services.control.jobspec import JobSpec, check_tasks

JobState = Literal["pending", "preparing", "starting", "running", "paused", "stopping", "stopped", "failed"]
ACTIVE_STATES = ("pending", "preparing", "starting", "running", "paused")
TERMINAL_STATES = ("stopped", "failed")
Role = Literal["admin", "operator", "viewer"]
ROLE_RANK = {"viewer": 0, "operator": 1, "admin": 2}


class LearnerEndpoint(BaseModel):
    """Where a job's learner serves (for robots) and exports metrics."""

    target: str = Field(description="gRPC host:port robots connect to.")
    metrics_port: int | None = Field(None, description="Prometheus /metrics port of the learner.")
    pid: int | None = Field(None, description="Learner process id (local launcher).")


class JobRecord(BaseModel):
    """A job as the control plane keeps it."""

    id: str = Field(description="Job id: NAME-<6 hex>.")
    spec: JobSpec = Field(description="The submitted spec.")
    state: JobState = Field(description="Lifecycle state.")
    created_at: float = Field(description="Unix time of submission.")
    updated_at: float = Field(description="Unix time of the last state change.")
    created_by: str = Field(description="API key id that submitted the job.")
    error: str | None = Field(None, description="Why the job failed, when it did.")
    learner: LearnerEndpoint | None = Field(None, description="The running learner, once started.")
    fleet_robots: int = Field(0, description="Simulated robots the launcher runs for this job now.")
    paused: bool = Field(False, description="Training paused by an operator.")
    pinned: int | None = Field(None, description="Version the fleet is pinned to (None = newest).")


class Enrollment(BaseModel):
    """A robot credential of one job (the token itself is never stored)."""

    id: str
    job_id: str
    name: str
    actors: list[str] | None = Field(None, description="Actor ids (glob patterns) the credential may act as; None = "
                                     "exactly its name. The learner refuses (PERMISSION_DENIED) other actor ids.")
    created_at: float
    created_by: str
    revoked_at: float | None = None


class ApiKey(BaseModel):
    """A REST credential with a role (the key itself is never stored)."""

    id: str
    name: str
    role: Role
    created_at: float
    revoked_at: float | None = None


class StateStore:
    """Typed access to the control plane's Redis. All methods raise :class:`Unavailable` when
    Redis cannot be reached (HTTP 503 at the boundary)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.r = redis.Redis.from_url(url, decode_responses=True, socket_timeout=5.0, socket_connect_timeout=5.0,
                                      health_check_interval=10, retry_on_timeout=True)

    def ping(self) -> bool:
        try:
            return bool(self.r.ping())
        except redis.RedisError:
            return False

    def _guard(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except redis.RedisError as exc:
            raise Unavailable(f"state store unreachable: {type(exc).__name__}", field="redis") from None

    # -- jobs ----------------------------------------------------------------------------------
    def create_job(self, spec: JobSpec, created_by: str) -> JobRecord:
        """Store a new ``pending`` job. Its tasks are checked here, at submission only
        (:func:`services.control.jobspec.check_tasks`: InvalidArgument naming ``tasks[i]`` and the value)."""
        check_tasks(spec)
        now = time.time()
        rec = JobRecord(id=f"{spec.name}-{secrets.token_hex(3)}", spec=spec, state="pending", created_at=now,
                        updated_at=now, created_by=created_by)

        def _do() -> None:
            if not self.r.set(keys.job(rec.id), rec.model_dump_json(), nx=True):
                raise FailedPrecondition(f"job id {rec.id!r} already exists", field="name", value=spec.name)
            self.r.zadd(keys.JOBS, {rec.id: now})
        self._guard(_do)
        self.emit(rec.id, "submitted", by=created_by, name=spec.name)
        return rec

    def get_job(self, job_id: str) -> JobRecord:
        raw = self._guard(self.r.get, keys.job(job_id))
        if raw is None:
            raise NotFound(f"unknown job {job_id!r}", field="job_id", value=job_id)
        return JobRecord.model_validate_json(raw)

    def list_jobs(self) -> list[JobRecord]:
        ids = self._guard(self.r.zrevrange, keys.JOBS, 0, -1)
        raws = self._guard(self.r.mget, [keys.job(i) for i in ids]) if ids else []
        return [JobRecord.model_validate_json(r) for r in raws if r]

    def update_job(self, job_id: str, **changes: Any) -> JobRecord:
        """Apply ``changes`` to the record atomically (WATCH/MULTI); emits ``state`` on a state change."""
        key = keys.job(job_id)

        def _do() -> tuple[JobRecord, str]:
            with self.r.pipeline() as pipe:
                while True:
                    try:
                        pipe.watch(key)
                        raw = pipe.get(key)
                        if raw is None:
                            raise NotFound(f"unknown job {job_id!r}", field="job_id", value=job_id)
                        old = JobRecord.model_validate_json(raw)
                        new = old.model_copy(update={**changes, "updated_at": time.time()})
                        new = JobRecord.model_validate(new.model_dump())  # re-validate the merged record
                        pipe.multi()
                        pipe.set(key, new.model_dump_json())
                        pipe.execute()
                        return new, old.state
                    except redis.WatchError:
                        continue
        new, old_state = self._guard(_do)
        if new.state != old_state:
            self.emit(job_id, "state", state=new.state, previous=old_state, error=new.error)
        return new

    # -- events ----------------------------------------------------------------------------
    def emit(self, job_id: str, kind: str, **data: Any) -> None:
        self._guard(self.r.xadd, keys.events(job_id), {"type": kind, "data": json.dumps(data), "source": "api"},
                    maxlen=keys.EVENTS_MAX, approximate=True)

    def events(self, job_id: str, after: str = "-", count: int = 200) -> list[dict[str, Any]]:
        """Events after stream id ``after`` (exclusive; '-' = from the start), oldest first. The
        caller checks that both parts of ``after`` fit 64 bits (the API answers 422 otherwise)."""
        if after == f"{2**64 - 1}-{2**64 - 1}":
            return []  # nothing follows the largest stream id (Redis refuses an exclusive start there)
        start = "-" if after in ("", "-", "0") else f"({after}"
        rows = self._guard(self.r.xrange, keys.events(job_id), start, "+", count)
        return [{"id": i, "type": f.get("type"), "source": f.get("source"), "data": json.loads(f.get("data") or "{}"),
                 "time": int(i.split("-")[0]) / 1000.0} for i, f in rows]

    def last_events(self, job_id: str, count: int = 200) -> list[dict[str, Any]]:
        """The newest ``count`` events, oldest first."""
        rows = self._guard(self.r.xrevrange, keys.events(job_id), "+", "-", count)
        return [{"id": i, "type": f.get("type"), "source": f.get("source"), "data": json.loads(f.get("data") or "{}"),
                 "time": int(i.split("-")[0]) / 1000.0} for i, f in reversed(rows)]

    # -- commands to the learner -------------------------------------------------------------
    def push_command(self, job_id: str, op: str, args: dict[str, Any] | None, by: str) -> str:
        cmd_id = uuid.uuid4().hex
        self._guard(self.r.rpush, keys.commands(job_id), json.dumps({"id": cmd_id, "op": op, "args": args or {}, "by": by,
                                                                      "at": time.time()}))
        return cmd_id

    def wait_result(self, cmd_id: str, timeout: float) -> dict[str, Any] | None:
        """The learner's result of a command, or None if none came within ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            raw = self._guard(self.r.get, keys.command_result(cmd_id))
            if raw is not None:
                return json.loads(raw)
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.1)

    # -- what the learner reports ------------------------------------------------------------
    def heartbeat(self, job_id: str) -> float | None:
        raw = self._guard(self.r.get, keys.heartbeat(job_id))
        return None if raw is None else float(raw)

    def learner_status(self, job_id: str) -> dict[str, Any] | None:
        raw = self._guard(self.r.get, keys.status(job_id))
        return None if raw is None else json.loads(raw)

    def final_status(self, job_id: str) -> dict[str, Any] | None:
        """The final status its learner left when it stopped (``final`` is true; see
        :func:`fleetloop.redis_keys.final_report`); for a learner that stopped without one (it died,
        or stopped before final reports existed) the same form derived from its last status; None
        if it never reported. Read-only."""
        raw = self._guard(self.r.get, keys.final_status(job_id))
        if raw is not None:
            return json.loads(raw)
        last = self.learner_status(job_id)
        return None if last is None else keys.final_report(last, last.get("time", 0.0))

    def finalize_learner(self, job_id: str, last: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """The launcher reaped the job's learner: make sure its final status is kept (without TTL),
        every actor row is final (``stopped`` / ``left``) and the heartbeat is gone. The learner's
        own final report is kept when it is at least as new as its last status; otherwise (the
        learner died or could not reach Redis) the final status is made from the newest of ``last``
        (what stopping it returned, if anything) and its last reported status. Idempotent; returns
        the final status (None if the learner never reported)."""
        def _do() -> dict[str, Any] | None:
            raw_final, raw_status = self.r.mget([keys.final_status(job_id), keys.status(job_id)])
            final = json.loads(raw_final) if raw_final else None
            status = json.loads(raw_status) if raw_status else None
            if final is None or (status is not None and status.get("time", 0.0) > final.get("time", 0.0)):
                reports = [s for s in (last, status) if s]
                if not reports:
                    return None
                final = keys.final_report(max(reports, key=lambda s: s.get("time", 0.0)), time.time())
                self.r.set(keys.final_status(job_id), json.dumps(final))
            stopped_at = final.get("stopped_at", time.time())
            rows = {a: json.loads(r) for a, r in self.r.hgetall(keys.actors(job_id)).items()}
            changed = {a: json.dumps(keys.final_actor_row(r, stopped_at)) for a, r in rows.items()
                       if r.get("status") not in keys.FINAL_ACTOR_STATES}
            if changed:
                self.r.hset(keys.actors(job_id), mapping=changed)
            self.r.delete(keys.heartbeat(job_id))
            return final
        return self._guard(_do)

    def release_snapshot(self, job_id: str) -> str | None:
        """The learner's release snapshot as its control agent wrote it (a JSON string; issue 21,
        docs/notes/issue21-plan.md), None before it wrote one."""
        return self._guard(self.r.get, keys.releases(job_id))

    def actors(self, job_id: str) -> list[dict[str, Any]]:
        rows = self._guard(self.r.hgetall, keys.actors(job_id))
        return sorted((json.loads(v) for v in rows.values()), key=lambda r: r["actor_id"])

    def versions(self, job_id: str) -> list[dict[str, Any]]:
        rows = self._guard(self.r.hgetall, keys.versions(job_id))
        return sorted((json.loads(v) for v in rows.values()), key=lambda r: r["version"])

    def set_evaluation(self, job_id: str, version: int, result: dict[str, Any]) -> None:
        self._guard(self.r.hset, keys.evaluations(job_id), str(version), json.dumps(result))

    def evaluations(self, job_id: str) -> dict[int, dict[str, Any]]:
        rows = self._guard(self.r.hgetall, keys.evaluations(job_id))
        return {int(v): json.loads(r) for v, r in rows.items()}

    def version(self, job_id: str, version: int) -> dict[str, Any] | None:
        """The version index row of ``version`` (what the learner reported while it retained it), or None."""
        raw = self._guard(self.r.hget, keys.versions(job_id), str(version))
        return None if raw is None else json.loads(raw)

    def version_exists(self, job_id: str, version: int) -> bool:
        return bool(self._guard(self.r.hexists, keys.versions(job_id), str(version)))

    def series(self, job_id: str, since: float = 0.0, limit: int = keys.SERIES_MAX) -> list[dict[str, Any]]:
        raws = self._guard(self.r.lrange, keys.series(job_id), -limit, -1)
        points = [json.loads(p) for p in raws]
        return [p for p in points if p["t"] > since]

    # -- robot enrollments -------------------------------------------------------------------
    def enroll(self, job_id: str, name: str, by: str, actors: list[str] | None = None) -> tuple[str, Enrollment]:
        """A new robot token for ``job_id``; the token is returned once and stored as a digest. It may act
        as the actor ids matching ``actors`` (glob patterns; None = exactly ``name``)."""
        token = "flr_" + secrets.token_urlsafe(32)
        rec = Enrollment(id=uuid.uuid4().hex[:12], job_id=job_id, name=name, actors=actors, created_at=time.time(),
                         created_by=by)
        self._guard(self.r.hset, keys.enrollments(job_id), keys.secret_hash(token), rec.model_dump_json())
        self.emit(job_id, "enrolled", enrollment=rec.id, name=name, by=by)
        return token, rec

    def _enrollment_items(self, job_id: str) -> list[tuple[str, Enrollment]]:
        rows = self._guard(self.r.hgetall, keys.enrollments(job_id))
        return [(h, Enrollment.model_validate_json(v)) for h, v in rows.items()]

    def enrollments(self, job_id: str) -> list[Enrollment]:
        return sorted((e for _, e in self._enrollment_items(job_id)), key=lambda e: e.created_at)

    def revoke_enrollment(self, job_id: str, enrollment_id: str, by: str) -> Enrollment:
        for digest, rec in self._enrollment_items(job_id):
            if rec.id == enrollment_id:
                if rec.revoked_at is None:
                    rec = rec.model_copy(update={"revoked_at": time.time()})
                    self._guard(self.r.hset, keys.enrollments(job_id), digest, rec.model_dump_json())
                    self.emit(job_id, "revoked", enrollment=rec.id, name=rec.name, by=by)
                return rec
        raise NotFound(f"unknown enrollment {enrollment_id!r} of job {job_id!r}", field="enrollment_id", value=enrollment_id)

    # -- API keys ----------------------------------------------------------------------------
    def create_api_key(self, role: Role, name: str) -> tuple[str, ApiKey]:
        key = "flk_" + secrets.token_urlsafe(32)
        rec = ApiKey(id=uuid.uuid4().hex[:12], name=name, role=role, created_at=time.time())
        self._guard(self.r.hset, keys.API_KEYS, keys.secret_hash(key), rec.model_dump_json())
        return key, rec

    def ensure_api_key(self, key: str, role: Role, name: str) -> ApiKey:
        """Register a key chosen by the deployment (e.g. from a Kubernetes Secret) if it is not known yet.

        Idempotent: an existing record for the same key is returned unchanged, so a key an operator
        revoked stays revoked across restarts. Only the key's sha256 is stored. Keys shorter than
        24 characters are refused (InvalidArgument naming the length, never the key).
        """
        if len(key) < 24:
            raise InvalidArgument(f"bootstrap API key is too short ({len(key)} characters, need at least 24)",
                                  field="FLEETLOOP_ADMIN_KEY", value=len(key))
        digest = keys.secret_hash(key)
        rec = ApiKey(id=uuid.uuid4().hex[:12], name=name, role=role, created_at=time.time())
        self._guard(self.r.hsetnx, keys.API_KEYS, digest, rec.model_dump_json())
        return ApiKey.model_validate_json(self._guard(self.r.hget, keys.API_KEYS, digest))

    def api_keys(self) -> list[ApiKey]:
        rows = self._guard(self.r.hgetall, keys.API_KEYS)
        return sorted((ApiKey.model_validate_json(v) for v in rows.values()), key=lambda k: k.created_at)

    def check_api_key(self, key: str | None) -> ApiKey:
        """The key's record; Unauthenticated when missing, unknown or revoked."""
        if not key:
            raise Unauthenticated("missing API key (header 'Authorization: Bearer <key>')", field="authorization")
        raw = self._guard(self.r.hget, keys.API_KEYS, keys.secret_hash(key))
        rec = ApiKey.model_validate_json(raw) if raw else None
        if rec is None or rec.revoked_at is not None:
            raise Unauthenticated(f"API key {keys.secret_hash(key)[:8]} is {'revoked' if rec else 'unknown'}",
                                  field="authorization", value=keys.secret_hash(key)[:8])
        return rec

    def revoke_api_key(self, key_id: str) -> ApiKey:
        for digest, raw in self._guard(self.r.hgetall, keys.API_KEYS).items():
            rec = ApiKey.model_validate_json(raw)
            if rec.id == key_id:
                if rec.revoked_at is None:
                    rec = rec.model_copy(update={"revoked_at": time.time()})
                    self._guard(self.r.hset, keys.API_KEYS, digest, rec.model_dump_json())
                return rec
        raise NotFound(f"unknown API key id {key_id!r}", field="key_id", value=key_id)
