"""Read models of the REST API built from what learners report (split out of :mod:`services.control.api`).

- :class:`ActorRow`: one row of a job's fleet table (``GET /v1/jobs/{id}/actors``, the live view),
  as the learner's control agent writes it, including the steps dropped per reason.
- :func:`learner_report`: what the job view shows of its learner: the live status while the
  learner reports, the final status it left once the job is stopped or failed and the heartbeat
  is gone (so a finished job keeps its version, step, loss and episodes, with rates 0).
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, Field

from fleetloop import redis_keys as keys
from services.control.state import TERMINAL_STATES, JobRecord, StateStore


class ActorRow(BaseModel):
    """One actor of a job. Counters are whole-run (since the learner's state began), not windowed."""

    actor_id: str
    kind: str
    tasks: list[str]
    task: str = Field(description="Task of its newest chunk.")
    status: Literal["active", "idle", "gone", "stopping", "stopped", "left", "revoked"] = Field(
        description="active / idle / gone by the age of its newest chunk (10 s, 60 s); stopping while the job drains; "
                    "once the learner stopped: stopped (it was with the job to the end) or left (gone before); "
                    "revoked: its credential was revoked (the learner closed its streams and refuses it).")
    last_seen: float
    connected_at: float | None
    version: int = Field(description="Policy version of its newest chunk (-1 before any).")
    staleness: int | None = Field(description="Learner's newest version minus the version of the actor's newest chunk "
                                              "(how far behind the robot runs; not the staleness of trained samples).")
    steps: int
    episodes: int
    successes: int
    success_rate: float | None = Field(description="Successful episodes / episodes, whole run.")
    intervention_steps: int
    intervention_ratio: float = Field(description="Operator steps / steps, whole run.")
    dropped: dict[str, int] = Field(default_factory=dict, description=(
        "Steps of this actor dropped at ingest, by the staleness gate's reason: 'stale' (autonomous chunk past the "
        "bound), 'stale_expert_only' (the autonomous frames of a stale chunk whose operator frames were kept), "
        "'future_version' (a version newer than the learner's). Whole run."))


def learner_report(store: StateStore, rec: JobRecord) -> tuple[bool, float | None, dict[str, Any] | None]:
    """``(alive, heartbeat age in s, status)`` of a job's learner. ``status`` is the newest live
    snapshot while the heartbeat exists or the job is not finished; for a stopped or failed job
    without heartbeat it is the final status (``final`` true, ``ingest_steps_per_s`` and
    ``updates_per_s`` 0; :meth:`StateStore.final_status`), None if the learner never reported."""
    hb = store.heartbeat(rec.id)
    age = None if hb is None else max(0.0, time.time() - hb)
    alive = age is not None and age < keys.HEARTBEAT_TTL_S
    if hb is None and rec.state in TERMINAL_STATES:
        return alive, age, store.final_status(rec.id)
    return alive, age, store.learner_status(rec.id)
