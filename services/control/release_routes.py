"""Safe-release routes of the REST API (issue 21: canary cohorts, automatic promotion and rollback),
registered on the app by :func:`install_release_routes` (called from :func:`services.control.api.create_app`).

The learner decides; the control plane shows what it decided and lets operators overrule it. The
contract between the two is ``docs/notes/issue21-plan.md``: the learner's control agent writes its
release snapshot as JSON under ``fleetloop.redis_keys.releases(job_id)`` every tick and executes the
commands ``release_promote``, ``release_abort`` and ``set_rollout``.

- ``GET /v1/jobs/{id}/releases`` (viewer): the snapshot (:class:`ReleasesView`): the rollout policy,
  the stable and candidate versions, the cohorts (which robots run the candidate) with their sizes,
  the live evidence per cohort (episodes, autonomous success, intervention rate, episode length,
  reward, per task) and the history of decisions (who decided, why, on how many episodes, with what
  metrics), oldest first. Before the learner has written one (a job not started yet, a learner from
  before releases): an empty snapshot with ``reported`` false and the job spec's rollout policy
  (strategy ``all`` when the spec has none).
- ``POST /v1/jobs/{id}/releases/promote`` and ``.../abort`` (operator): promote the candidate to
  stable now / abort it (every robot back on stable); learner commands like pin: 200 with the
  learner's result when it ran within the API's command timeout, else 202 with the queued command's
  id; 409 when the job is not running or paused, or when the learner refuses (no candidate open).
- ``PUT /v1/jobs/{id}/rollout`` (operator): replace the job's rollout policy. The body is a
  :class:`learner.releases_config.RolloutPolicy`, validated here first (422 naming the field), then
  sent to the learner as ``set_rollout``; the job record's spec gets the new policy (when the
  learner ran the command or it is queued; not when the learner refused it), so a relaunch keeps it.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Literal

from fastapi import FastAPI
from fastapi.params import Depends
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, ValidationError

from fleetloop.logs import event, get_logger
from learner.releases_config import RolloutPolicy
from services.control.api_errors import ERRORS
from services.control.state import ApiKey, JobRecord, StateStore

log = get_logger("services.api")


# -- response models ---------------------------------------------------------------------------
class CohortMetrics(BaseModel):
    """What one cohort's episodes showed over a window (None: no episode to tell)."""

    episodes: int = Field(0, description="Episodes the cohort finished in the window.")
    autonomous_success: float | None = Field(None, description="Share of episodes that succeeded without an operator "
                                                               "taking over (0-1).")
    intervention_rate: float | None = Field(None, description="Operator steps / steps (0-1).")
    episode_length: float | None = Field(None, description="Mean steps per episode.")
    reward: float | None = Field(None, description="Mean episode return.")


class CohortEvidence(CohortMetrics):
    """A cohort's metrics, overall and per task."""

    per_task: dict[str, CohortMetrics] = Field(default_factory=dict, description="The same metrics per task id.")


class ReleaseEvidence(BaseModel):
    """Evidence of both cohorts: the candidate's (canary robots) and the stable version's."""

    candidate: CohortEvidence | None = Field(None, description="The canary cohort running the candidate.")
    stable: CohortEvidence | None = Field(None, description="The stable cohort running the stable version.")


class Cohorts(BaseModel):
    canary: list[str] = Field(default_factory=list, description="Actor ids of the robots that run the candidate.")
    stable: list[str] = Field(default_factory=list, description="Actor ids of the robots that run the stable version.")


class CohortCounts(BaseModel):
    canary: int = Field(0, description="Of the canary cohort.")
    stable: int = Field(0, description="Of the stable cohort.")


class ReleaseDecision(BaseModel):
    """One decided release: a candidate promoted, rolled back or aborted."""

    id: int = Field(description="Release number within the job.")
    candidate: int = Field(description="The candidate version.")
    stable: int | None = Field(None, description="The stable version it was compared with.")
    opened_at: float | None = Field(None, description="Unix time the candidate went to the canary cohort.")
    decided_at: float | None = Field(None, description="Unix time of the decision.")
    decision: Literal["promoted", "rolled_back", "aborted"] = Field(
        description="promoted: the candidate became stable; rolled_back: it was worse, robots went back to stable; "
                    "aborted: an operator (or a newer candidate, a pin) ended it without a verdict.")
    by: Literal["auto", "operator"] = Field(description="auto: the learner's evidence decided; operator: a person did.")
    reason: str = Field("", description="Why, in words (the metric and the numbers that decided).")
    episodes: CohortCounts = Field(default_factory=CohortCounts, description="Episodes each cohort contributed.")
    cohort_sizes: CohortCounts | None = Field(None, description="Robots in each cohort, when the learner reported them.")
    metrics: ReleaseEvidence = Field(default_factory=ReleaseEvidence, description="The evidence at the decision.")
    p_not_worse: float | None = Field(None, description="Posterior probability that the candidate is not worse than "
                                                        "stable by more than max_regression.")


class ReleasesView(BaseModel):
    """A job's releases: what the learner reported last (``reported``), or an empty snapshot."""

    job_id: str
    reported: bool = Field(description="The learner has written a release snapshot (false: the empty snapshot).")
    time: float | None = Field(None, description="Unix time of the learner's snapshot, when it carries one.")
    strategy: Literal["all", "canary"] = Field(description="all: every robot runs the newest version; canary: a "
                                                           "candidate runs on the canary cohort until a decision.")
    policy: RolloutPolicy = Field(description="The rollout policy in force.")
    pinned: int | None = Field(None, description="An operator pin overrides releases: every robot runs this version.")
    stable: int | None = Field(None, description="The version the stable cohort runs.")
    candidate: int | None = Field(None, description="The candidate under evaluation (None: no release open).")
    cohorts: Cohorts = Field(default_factory=Cohorts, description="Which robots are in which cohort.")
    cohort_sizes: CohortCounts = Field(default_factory=CohortCounts, description="Robots in each cohort.")
    evidence: ReleaseEvidence = Field(default_factory=ReleaseEvidence, description="Live evidence of the open release.")
    history: list[ReleaseDecision] = Field(default_factory=list, description="Decided releases, oldest first.")
    problem: str | None = Field(None, description="Set when the learner's snapshot could not be read (then the rest "
                                                  "is the empty snapshot).")


def _sizes(raw: Any) -> dict[str, int] | None:
    """Cohort sizes from ``{"canary": [ids] | n, "stable": [ids] | n}``, or None."""
    if not isinstance(raw, dict):
        return None
    return {k: len(v) if isinstance(v, list) else int(v) for k, v in raw.items() if k in ("canary", "stable")}


def _pinned(store: StateStore, rec: JobRecord) -> int | None:
    """The pin in force: the learner's report when it is newer than the record (as GET /policies)."""
    status = store.learner_status(rec.id) or {}
    return status.get("pinned", rec.pinned) if status.get("time", 0.0) > rec.updated_at else rec.pinned


def spec_policy(rec: JobRecord) -> RolloutPolicy:
    """The job spec's rollout policy, or the default one (strategy all)."""
    return rec.spec.rollout or RolloutPolicy()


def releases_view(store: StateStore, rec: JobRecord) -> ReleasesView:
    """The job's :class:`ReleasesView` from the learner's snapshot (see the module docstring)."""
    raw = store.release_snapshot(rec.id)
    base = {"job_id": rec.id, "pinned": _pinned(store, rec)}
    policy = spec_policy(rec)
    empty = ReleasesView(**base, reported=False, strategy=policy.strategy, policy=policy)
    if raw is None:
        return empty
    try:
        snap = json.loads(raw)
        cohorts = snap.get("cohorts") or {}
        history = [{**h, "cohort_sizes": _sizes(h.get("cohort_sizes") or h.get("cohorts"))} for h in snap.get("history") or []]
        history.sort(key=lambda h: (h.get("decided_at") or 0.0, h.get("id") or 0))
        reported = snap.get("policy") or policy.model_dump()
        return ReleasesView(**base, reported=True, time=snap.get("time"),
                            strategy=snap.get("strategy") or reported.get("strategy", "all"), policy=reported,
                            stable=snap.get("stable"), candidate=snap.get("candidate"), cohorts=cohorts,
                            cohort_sizes=_sizes(cohorts) or {}, evidence=snap.get("evidence") or {}, history=history)
    except (ValueError, TypeError, AttributeError, ValidationError) as exc:
        problem = f"the learner's release snapshot could not be read: {exc!s}"[:500]
        event(log, "releases_unreadable", level=30, job=rec.id, error=problem)
        return empty.model_copy(update={"reported": True, "problem": problem})


def install_release_routes(app: FastAPI, store: StateStore, *, viewer: Depends, operator: Depends,
                           active_job: Callable[[str], JobRecord], command: Callable[..., Any],
                           reply: Callable[[Any], JSONResponse], command_model: type[BaseModel]) -> None:
    """Register the routes of the module docstring on ``app``. ``viewer`` / ``operator``: the role
    dependencies; ``active_job``, ``command``, ``reply``, ``command_model``: the API's own helpers for
    learner commands (so the answers are exactly like pin's)."""
    queued = {**ERRORS, 202: {"model": command_model}}

    @app.get("/v1/jobs/{job_id}/releases", response_model=ReleasesView, responses=ERRORS, tags=["releases"])
    def releases(job_id: str, key: ApiKey = viewer) -> ReleasesView:
        """Stable and candidate versions, cohorts, live evidence per cohort and every decision with its reason."""
        return releases_view(store, store.get_job(job_id))

    @app.post("/v1/jobs/{job_id}/releases/promote", response_model=command_model, responses=queued, tags=["releases"])
    def promote(job_id: str, key: ApiKey = operator) -> Any:
        """Promote the open candidate to stable now (every robot runs it from its next episode)."""
        active_job(job_id)
        return reply(command(job_id, "release_promote", None, key))

    @app.post("/v1/jobs/{job_id}/releases/abort", response_model=command_model, responses=queued, tags=["releases"])
    def abort(job_id: str, key: ApiKey = operator) -> Any:
        """Abort the open candidate: every robot runs the stable version again from its next episode."""
        active_job(job_id)
        return reply(command(job_id, "release_abort", None, key))

    @app.put("/v1/jobs/{job_id}/rollout", response_model=command_model, responses=queued, tags=["releases"])
    def set_rollout(job_id: str, body: RolloutPolicy, key: ApiKey = operator) -> Any:
        """Replace the job's rollout policy (the whole policy: fields left out take their defaults). The
        learner applies it when it runs the command; the job's spec keeps it for a relaunch."""
        rec = active_job(job_id)
        res = command(job_id, "set_rollout", body.model_dump(mode="json"), key)  # the learner's refusal raises
        # done or queued: the spec keeps it (validated here with the learner's own model)
        store.update_job(job_id, spec=rec.spec.model_copy(update={"rollout": body}))
        event(log, "rollout_set", job=job_id, by=key.id, status=res.status, strategy=body.strategy)
        return reply(res)
