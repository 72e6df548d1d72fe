"""Redis key layout shared by the control plane (``services``) and the learner's control agent.

The control plane and a job's learner talk only through Redis, so that the same protocol works
for a learner on this machine's Ray and one in a Kubernetes pod:

==========================================  ======  ===============================================
key                                         type    written by / meaning
==========================================  ======  ===============================================
``fl:jobs``                                 zset    API: job ids scored by creation time
``fl:job:{id}``                             string  API: the job record (JSON: spec, state, ...)
``fl:job:{id}:events``                      stream  both: the job's event log (capped)
``fl:job:{id}:commands``                    list    API pushes, learner pops: pause, pin, rollback ...
``fl:cmd:{cmd_id}``                         string  learner: a command's result (JSON, TTL 1 h)
``fl:job:{id}:heartbeat``                   string  learner: unix time of its last report (TTL)
``fl:job:{id}:status``                      string  learner: newest status snapshot (JSON)
``fl:job:{id}:final``                       string  learner's last report / launcher on reaping it: the
                                                    final status of a stopped learner (JSON, no TTL)
``fl:job:{id}:actors``                      hash    learner: actor id -> JSON row of the fleet table
``fl:job:{id}:versions``                    hash    learner: version -> JSON (step, time, digest,
                                                    kept) of each version its weight store retains
``fl:job:{id}:series``                      list    learner: time series points for charts (capped)
``fl:job:{id}:evaluations``                 hash    API: version -> JSON evaluation results
``fl:job:{id}:enrollments``                 hash    API: sha256(token) -> JSON (id, name, revoked)
``fl:apikeys``                              hash    API: sha256(key) -> JSON (id, role, name, revoked)
==========================================  ======  ===============================================

Secrets (robot tokens, API keys) are only ever stored as sha256 hex digests.

When a learner stops, its last status is kept without TTL under ``fl:job:{id}:final``
(:func:`final_report`: marked ``final``, ingest and update rates 0), its heartbeat is deleted,
and every row of ``fl:job:{id}:actors`` gets a final status (:func:`final_actor_row`: ``stopped``
or ``left``), so a finished job keeps its numbers after the heartbeat is gone.
"""

from __future__ import annotations

import hashlib
from typing import Any

PREFIX = "fl"
JOBS = f"{PREFIX}:jobs"
API_KEYS = f"{PREFIX}:apikeys"
SERIES_MAX = 3600          # points kept per job (1 per 2 s: two hours)
EVENTS_MAX = 5000          # events kept per job
VERSIONS_MAX = 2000        # newest versions kept in the version index per job
HEARTBEAT_TTL_S = 30       # a learner silent this long is considered gone
ACTOR_GONE_S = 60.0        # an actor without a chunk this long is "gone" (live) / "left" (final)
FINAL_ACTOR_STATES = ("stopped", "left", "revoked")  # revoked stays revoked after the stop


def job(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}"


def events(job_id: str) -> str:
    return f"{job(job_id)}:events"


def commands(job_id: str) -> str:
    return f"{job(job_id)}:commands"


def command_result(cmd_id: str) -> str:
    return f"{PREFIX}:cmd:{cmd_id}"


def heartbeat(job_id: str) -> str:
    return f"{job(job_id)}:heartbeat"


def status(job_id: str) -> str:
    return f"{job(job_id)}:status"


def final_status(job_id: str) -> str:
    return f"{job(job_id)}:final"


def actors(job_id: str) -> str:
    return f"{job(job_id)}:actors"


def versions(job_id: str) -> str:
    return f"{job(job_id)}:versions"


def series(job_id: str) -> str:
    return f"{job(job_id)}:series"


def evaluations(job_id: str) -> str:
    return f"{job(job_id)}:evaluations"


def enrollments(job_id: str) -> str:
    return f"{job(job_id)}:enrollments"


def releases(job_id: str) -> str:
    """String: the learner's release snapshot as JSON (issue 21; docs/notes/issue21-plan.md)."""
    return f"{job(job_id)}:releases"


def all_job_keys(job_id: str) -> list[str]:
    """Every key of one job (for deletion)."""
    return [job(job_id), events(job_id), commands(job_id), heartbeat(job_id), status(job_id), final_status(job_id),
            actors(job_id), versions(job_id), series(job_id), evaluations(job_id), enrollments(job_id), releases(job_id)]


def final_report(status: dict[str, Any], stopped_at: float) -> dict[str, Any]:
    """The final status of a stopped learner: its last status snapshot (every number as last
    reported), marked ``final`` with ``stopped_at``, ``job_state`` "stopped", and nothing flowing
    any more: ``ingest_steps_per_s`` and ``updates_per_s`` are 0. Pure; ``status`` is not changed."""
    return {**status, "final": True, "stopped_at": stopped_at, "job_state": "stopped",
            "ingest_steps_per_s": 0.0, "updates_per_s": 0.0}


def final_actor_row(row: dict[str, Any], stopped_at: float) -> dict[str, Any]:
    """An actor's fleet-table row once its learner stopped at ``stopped_at``: status ``stopped``
    when it was still with the job (a chunk or handshake less than :data:`ACTOR_GONE_S` before),
    else ``left``; every other field as last reported. A row already final is returned unchanged."""
    if row.get("status") in FINAL_ACTOR_STATES:
        return row
    seen = row.get("last_seen") or 0.0
    return {**row, "status": "stopped" if stopped_at - seen < ACTOR_GONE_S else "left"}


def secret_hash(secret: str) -> str:
    """sha256 hex of a token or key: the only form in which secrets are stored."""
    return hashlib.sha256(secret.encode()).hexdigest()
