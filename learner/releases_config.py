"""Rollout policy of a robot job's release channels (issue 21; contract: docs/notes/issue21-plan.md).

One model, :class:`RolloutPolicy`, carried by the learner config (``LearnerConfig.rollout``), the JobSpec
(``rollout``, None = the learner default) and the ``set_rollout`` command. ``strategy: all`` is the
behaviour before releases: every robot runs the newest version. ``strategy: canary`` keeps a ``stable``
version for most robots and offers the newest version, as a ``candidate``, to a canary cohort only
(:mod:`learner.releases`), until a sequential test (:mod:`learner.release_stats`) promotes it or rolls it
back.

Invariants (validated): ``min_episodes <= max_episodes``; ``metrics`` is non-empty and without repeats;
``canary_actors`` ids are 1..128 characters and unique. An invalid policy raises a pydantic
ValidationError whose location names the field (the learner's ``set_rollout`` turns it into
InvalidArgument naming ``rollout.<field>``).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fleetloop.errors import InvalidArgument

#: Metrics a release can be judged on (``RolloutPolicy.metrics``).
Metric = Literal["autonomous_success", "intervention_rate", "episode_length", "reward"]
METRICS: tuple[str, ...] = ("autonomous_success", "intervention_rate", "episode_length", "reward")


class RolloutPolicy(BaseModel):
    """How new versions reach the fleet. Every field is documented; defaults are the contract's."""

    model_config = ConfigDict(extra="forbid")
    strategy: Literal["all", "canary"] = Field(
        "all", description="'all': every robot runs the newest version (no release channels). 'canary': robots of the "
        "canary cohort run the candidate (the newest version, frozen while it is judged), the others the stable "
        "version; the learner promotes or rolls back the candidate from the two cohorts' concurrent episodes.")
    canary_fraction: float = Field(
        0.25, ge=0.0, le=1.0, description="Share of robots in the canary cohort when canary_actors is empty: an actor is "
        "canary when a salted sha256 of its id, read as a number in [0, 1), is below this (deterministic per actor, "
        "stable across restarts; raising the fraction only adds actors). Small fleets: name canary_actors instead.")
    canary_actors: list[str] = Field(
        default_factory=list, max_length=10_000, description="Explicit canary cohort (actor ids); when non-empty it "
        "wins over canary_fraction and every other robot is in the stable cohort.")
    min_episodes: int = Field(10, ge=1, le=1_000_000, description="Episodes each cohort must finish in the current "
                              "window (candidate episodes of the canary cohort, stable-version episodes of the stable "
                              "cohort) before any automatic decision.")
    max_episodes: int = Field(60, ge=1, le=10_000_000, description="Candidate episodes after which a decision is forced "
                              "(promote when the posterior probability that the candidate is not worse is at least 0.5, "
                              "else roll back), once the stable cohort has min_episodes too.")
    metrics: list[Metric] = Field(
        default_factory=lambda: ["autonomous_success", "intervention_rate"], min_length=1, max_length=4,
        description="What the candidate is judged on (all of them must pass): autonomous_success (success with no "
        "intervention step; higher is better), intervention_rate (operator steps / steps; lower is better), "
        "episode_length (steps; lower is better) and reward (episode return; higher is better).")
    max_regression: float = Field(
        0.1, ge=0.0, le=1e9, description="Largest tolerated regression of the candidate. Absolute for the rates "
        "(autonomous_success, intervention_rate: 0.1 = 10 percentage points); for episode_length and reward, which have "
        "units, relative to the stable cohort's mean magnitude (0.1 = 10 %).")
    confidence: float = Field(0.95, gt=0.5, lt=1.0, description="Posterior probability needed to decide early: promote "
                              "when P(not worse by more than max_regression) >= confidence on every metric, roll back "
                              "when it is <= 1 - confidence on any metric.")
    retrain_from_stable_on_rollback: bool = Field(
        True, description="On an automatic rollback, the learner's training weights go back to the stable version "
        "(the operator rollback: stable's weights published as a new version, optimizer reset), so later candidates "
        "do not descend from the rejected one. The re-published copy of stable is not offered as a candidate.")

    @field_validator("canary_actors")
    @classmethod
    def _actors(cls, v: list[str]) -> list[str]:
        seen: set[str] = set()
        for i, a in enumerate(v):
            if not 1 <= len(a) <= 128:
                raise ValueError(f"canary_actors[{i}] {a[:40]!r} must be 1..128 characters")
            if a in seen:
                raise ValueError(f"canary_actors[{i}] {a!r} repeats an earlier entry")
            seen.add(a)
        return v

    @field_validator("metrics")
    @classmethod
    def _metrics(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"metrics {v} repeat a metric")
        return v

    @model_validator(mode="after")
    def _window(self) -> "RolloutPolicy":
        if self.min_episodes > self.max_episodes:
            raise ValueError(f"min_episodes {self.min_episodes} must be <= max_episodes {self.max_episodes}")
        return self


def parse_policy(data: Any) -> RolloutPolicy:
    """A RolloutPolicy from a dict (the ``set_rollout`` command's args); InvalidArgument naming
    ``rollout.<field>`` (the first problem) and the offending value otherwise."""
    if isinstance(data, RolloutPolicy):
        return data
    if not isinstance(data, dict):
        raise InvalidArgument(f"rollout must be an object, got {type(data).__name__}", field="rollout",
                              value=str(data)[:100])
    try:
        return RolloutPolicy.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err.get("loc", ()))
        field = f"rollout.{loc}" if loc else "rollout"
        raise InvalidArgument(f"{field}: {err.get('msg')}", field=field,
                              value=str(err.get("input"))[:100]) from None
