"""JobSpec: what an operator submits (``POST /v1/jobs``, ``fleetloop job submit FILE.yaml``).

Validation happens here, once, with pydantic: an invalid spec is answered 422 with the field path
of every problem. :func:`learner_config` turns a valid spec into the learner's
:class:`~learner.config.LearnerConfig`; anything the spec does not set keeps the learner default.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator

from fleetloop.errors import InvalidArgument
from learner.config import LearnerConfig, OptimisationConfig, ServingConfig
from learner.staleness import StalenessConfig
from services.control.algorithm_params import AlgorithmParamsSchema, check_algorithm_params

TaskId = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.-]+$")]


def _algorithm_names() -> list[str]:
    from learner.algorithms import ALGORITHMS
    return sorted(ALGORITHMS)


DEFAULT_TASKS = ["reach-v3", "push-v3", "pick-place-v3", "drawer-open-v3"]


class Resources(BaseModel):
    """What the job's learner asks of the cluster."""

    model_config = ConfigDict(extra="forbid")
    cpus: float = Field(1.0, ge=0.1, le=512, description="CPUs reserved for the learner actor.")
    gpus: int = Field(0, ge=0, le=64, description="GPUs for the learner (0 = CPU; the learner uses CUDA when given one).")


class SimFleet(BaseModel):
    """A simulated Meta-World fleet the launcher starts beside the learner (local runs and demos)."""

    model_config = ConfigDict(extra="forbid")
    robots: int = Field(2, ge=0, le=64, description="Simulated robots (one process each); 0 = none yet (scale later).")
    hz: float = Field(0.0, ge=0, le=1000, description="Control rate of each robot; 0 = as fast as the CPU allows.")
    operator: Literal["scripted", "none"] = Field("scripted", description="Scripted HG-DAgger operator, or none (autonomous).")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Base seed of the robots' layouts.")


class Bootstrap(BaseModel):
    """Offline start for simulated jobs without a dataset: scripted demos, then behaviour cloning."""

    model_config = ConfigDict(extra="forbid")
    demos_per_task: int = Field(2, ge=1, le=1000, description="Scripted demonstrations recorded per task.")
    pretrain_steps: int = Field(3000, ge=0, le=1_000_000, description="Behaviour-cloning steps of the initial policy.")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seed of the demos and the pretraining.")


class JobSpec(BaseModel):
    """One post-training job. Every field is optional except ``name`` and ``tasks``."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=40, pattern=r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$",
                      description="Human name (DNS label: lower case, digits, '-'); the job id is NAME-<6 hex>.")
    kind: Literal["robot"] = Field("robot", description="Fleet kind: 'robot'. ('llm': rollout servers + GRPO, is not available yet.)")
    algorithm: str = Field("hg_dagger", description="Learner algorithm plug-in (see learner.algorithms.ALGORITHMS).",
                           json_schema_extra={"enum": _algorithm_names()})
    algorithm_params: Annotated[dict[str, Any], AlgorithmParamsSchema()] = Field(
        default_factory=dict, description="The config fields of the job's `algorithm`, validated against its Config at "
                                          "submission (a 422 names `algorithm_params.<field>`); schema: one per algorithm.")
    policy_factory: str = Field("fleetloop.policies:mlp_policy", pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$",
                                description="Policy plug-in, 'module:function'.")
    policy_kwargs: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments of the policy factory.")
    initial_weights: str | None = Field(None, max_length=4096, description="safetensors file the policy starts from (path on the learner).")
    tasks: list[TaskId] = Field(min_length=1, max_length=64, json_schema_extra={"uniqueItems": True},
                                description="Task ids (letters, digits, '-', '_', '.'), unique, in the order the policy indexes them.")
    offline_dataset: str | None = Field(None, max_length=4096, description="Demonstrations folder (fleetloop-demos/v1) on the learner.")
    staleness_bound: int | None = Field(None, ge=0, le=10_000, description="Largest trained staleness in versions; None = the algorithm's default.")
    publish_every: int = Field(25, ge=1, le=1_000_000, description="Publish new weights every K learner steps.")
    batch_size: int = Field(256, ge=1, le=65536, description="Samples per learner step.")
    max_updates_per_s: float | None = Field(None, gt=0, le=100_000, description="Cap on learner steps per second; None = no cap.")
    resources: Resources = Field(default_factory=Resources, description="Learner resources.")
    fleet: SimFleet | None = Field(None, description="Simulated fleet to start with the job (None = real robots only).")
    bootstrap: Bootstrap | None = Field(None, description="Record demos and pretrain first when offline_dataset/initial_weights are unset.")

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, v: list[str]) -> list[str]:
        first: dict[str, int] = {}
        for i, t in enumerate(v):
            if t in first:
                raise ValueError(f"tasks must be unique: tasks[{i}] {t!r} repeats tasks[{first[t]}]")
            first[t] = i
        return v

    @field_validator("algorithm")
    @classmethod
    def _algorithm(cls, v: str) -> str:
        from learner.algorithms import ALGORITHMS
        if v not in ALGORITHMS:
            raise ValueError(f"algorithm {v!r} is not one of {sorted(ALGORITHMS)}")
        return v

    @model_validator(mode="after")
    def _params(self) -> "JobSpec":
        check_algorithm_params(self.algorithm, self.algorithm_params)  # errors at algorithm_params.<field>
        return self


def simulated_tasks() -> list[str]:
    """Task names a simulated robot (and the bootstrap's scripted demos) can run: the actor's
    Meta-World v3 registry, :func:`actor.envs.available_tasks` (the one source of truth; the
    README's import table lets ``services`` import ``actor``). Imports Meta-World on first use."""
    from actor.envs import available_tasks
    return list(available_tasks("MT50"))


def check_tasks(spec: JobSpec) -> None:
    """Check ``spec.tasks`` at submission (``StateStore.create_job``); records read back are not
    re-checked, so a registry change never makes a stored job unreadable.

    - The spec has a simulated fleet (``fleet``), or a ``bootstrap`` that will record scripted
      demos (no ``offline_dataset`` / ``initial_weights``): the tasks run in Meta-World, so each
      must be one of :func:`simulated_tasks`.
    - Otherwise (real robots only) ``tasks`` is the job's declared task list and any name is
      accepted: the field already holds every name to be non-empty, well-formed (letters, digits,
      '-', '_', '.') and unique, and the learner holds the robots to the list (a handshake or chunk
      with another task is refused, naming it).

    Raises :class:`~fleetloop.errors.InvalidArgument` (HTTP 422) with ``field`` ``tasks[i]`` and
    ``value`` the first unknown name; the message names every unknown one with its close matches,
    and lists the valid names when one has none.
    """
    bootstraps = spec.bootstrap is not None and not spec.offline_dataset and not spec.initial_weights
    if spec.fleet is None and not bootstraps:
        return
    valid = simulated_tasks()
    known = set(valid)
    unknown = [(i, t) for i, t in enumerate(spec.tasks) if t not in known]
    if not unknown:
        return
    parts, unmatched = [], False
    for i, t in unknown:
        close = difflib.get_close_matches(t, valid, n=3, cutoff=0.6)
        unmatched = unmatched or not close
        parts.append(f"tasks[{i}] {t!r}" + (f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""))
    who = "the simulated fleet" if spec.fleet is not None else "the bootstrap (scripted demos)"
    msg = f"{'; '.join(parts)}: not a Meta-World v3 task, and {who} runs only those"
    if unmatched:
        msg += f"; valid tasks: {', '.join(valid)}"
    i, t = unknown[0]
    raise InvalidArgument(msg, field=f"tasks[{i}]", value=t)


def learner_config(spec: JobSpec, job_id: str, state_dir: Path, control_redis_url: str | None, host: str = "127.0.0.1",
                   initial_weights: Path | None = None, offline_dataset: Path | None = None) -> LearnerConfig:
    """The learner configuration of a job (bootstrap outputs override the spec's paths)."""
    weights = initial_weights or (Path(spec.initial_weights) if spec.initial_weights else None)
    dataset = offline_dataset or (Path(spec.offline_dataset) if spec.offline_dataset else None)
    return LearnerConfig(
        job_id=job_id, state_dir=state_dir, tasks=spec.tasks, device="cuda" if spec.resources.gpus else "auto",
        control_redis_url=control_redis_url, serving=ServingConfig(host=host, port=0, metrics_port=0),
        optimisation=OptimisationConfig(
            policy_factory=spec.policy_factory, policy_kwargs=spec.policy_kwargs, initial_weights=weights,
            algorithm=spec.algorithm, algorithm_params=spec.algorithm_params,
            staleness=StalenessConfig(bound=spec.staleness_bound) if spec.staleness_bound is not None else None,
            offline_dataset=dataset, batch_size=spec.batch_size, publish_every=spec.publish_every,
            max_updates_per_s=spec.max_updates_per_s))
