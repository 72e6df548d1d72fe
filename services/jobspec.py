"""JobSpec: what an operator submits (``POST /v1/jobs``, ``fleetloop job submit FILE.yaml``).

Validation happens here, once, with pydantic: an invalid spec is answered 422 with the field path
of every problem. :func:`learner_config` turns a valid spec into the learner's
:class:`~learner.config.LearnerConfig`; anything the spec does not set keeps the learner default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator, model_validator

from learner.config import LearnerConfig
from learner.staleness import StalenessConfig

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
    algorithm_params: dict[str, Any] = Field(default_factory=dict,
                                             description="The algorithm's config fields (validated by the algorithm's Config).")
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
        if len(set(v)) != len(v):
            raise ValueError(f"tasks must be unique, got {v}")
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
        from learner.algorithms import ALGORITHMS
        try:
            ALGORITHMS[self.algorithm].Config.model_validate(self.algorithm_params)
        except ValidationError as exc:
            err = exc.errors()[0]
            loc = ".".join(str(p) for p in err["loc"])
            raise ValueError(f"algorithm_params.{loc} for {self.algorithm!r}: {err['msg']} (got {err.get('input')!r})") from None
        return self


def learner_config(spec: JobSpec, job_id: str, state_dir: Path, control_redis_url: str | None, host: str = "127.0.0.1",
                   initial_weights: Path | None = None, offline_dataset: Path | None = None) -> LearnerConfig:
    """The learner configuration of a job (bootstrap outputs override the spec's paths)."""
    weights = initial_weights or (Path(spec.initial_weights) if spec.initial_weights else None)
    dataset = offline_dataset or (Path(spec.offline_dataset) if spec.offline_dataset else None)
    return LearnerConfig(
        job_id=job_id, host=host, port=0, metrics_port=0, state_dir=state_dir, tasks=spec.tasks,
        policy_factory=spec.policy_factory, policy_kwargs=spec.policy_kwargs, initial_weights=weights,
        algorithm=spec.algorithm, algorithm_params=spec.algorithm_params,
        staleness=StalenessConfig(bound=spec.staleness_bound) if spec.staleness_bound is not None else None,
        offline_dataset=dataset, batch_size=spec.batch_size, publish_every=spec.publish_every,
        max_updates_per_s=spec.max_updates_per_s, device="cuda" if spec.resources.gpus else "auto",
        control_redis_url=control_redis_url)
