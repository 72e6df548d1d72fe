"""JobSpec: what an operator submits (``POST /v1/jobs``, ``fleetloop job submit FILE.yaml``).

Validation happens here, once, with pydantic: an invalid spec is answered 422 with the field path
of every problem. :func:`learner_config` turns a valid spec into the learner's
:class:`~learner.config.LearnerConfig`; anything the spec does not set keeps the learner default.

Tensor specs: a job declares its per-step ``observation_specs`` / ``action_specs``
(:class:`~learner.config.SpecModel`); omitted, they are the simulated robot's preset
(:func:`fleetloop.presets.metaworld_specs` of ``fleet.observations``, or ``"state"``: 39 / 4). A
job whose tasks run in the simulator (a ``fleet``, or a ``bootstrap`` that records scripted demos)
may only declare the preset (a 422 naming ``observation_specs`` / ``action_specs`` otherwise); the
learner config always carries the specs, so robots are held to them at handshake.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (BaseModel, ConfigDict, Field, StringConstraints, ValidationError, ValidationInfo, field_validator,
                      model_validator)
from pydantic_core import InitErrorDetails, PydanticCustomError

from fleetloop.codec import describe_problem, spec_problems
from fleetloop.errors import InvalidArgument
from fleetloop.presets import (DEFAULT_CAMERAS, DEFAULT_IMAGE_SIZE, MAX_IMAGE_SIZE, METAWORLD_CAMERAS, MIN_IMAGE_SIZE,
                               metaworld_specs)
from learner.config import FlowControlConfig, LearnerConfig, OptimisationConfig, ServingConfig, SpecModel
from learner.releases_config import RolloutPolicy
from learner.staleness import StalenessConfig
from services.control.algorithm_params import AlgorithmParamsSchema, check_algorithm_params

TaskId = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.-]+$")]


def _algorithm_names() -> list[str]:
    from learner.algorithms import ALGORITHMS
    return sorted(ALGORITHMS)


DEFAULT_TASKS = ["reach-v3", "push-v3", "pick-place-v3", "drawer-open-v3"]
Camera = Literal[METAWORLD_CAMERAS]  # type: ignore[valid-type]  # the simulator's camera names
#: Smallest memory budget a job may ask for: the learner needs 8 x serving.max_message_bytes (default) beside ingest.
MIN_MEMORY_BUDGET_MB = 8 * ServingConfig().max_message_bytes / (1 << 20)


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
    observations: Literal["state", "pixels"] = Field(
        "state", description="What the robots observe: 'state' (Meta-World's 39-value vector) or 'pixels' ('proprio' "
                             "float32 [8] plus one uint8 [image_size, image_size, 3] image per camera). Sets the job's "
                             "default tensor specs (fleetloop.presets.metaworld_specs).")
    cameras: list[Camera] = Field(list(DEFAULT_CAMERAS), min_length=1, max_length=len(METAWORLD_CAMERAS),
                                  json_schema_extra={"uniqueItems": True},
                                  description="With observations 'pixels': the cameras, in spec order (unique).")
    image_size: int = Field(DEFAULT_IMAGE_SIZE, ge=MIN_IMAGE_SIZE, le=MAX_IMAGE_SIZE,
                            description="With observations 'pixels': side of the square camera images, in pixels.")
    jpeg_quality: int = Field(90, ge=1, le=95, description="With observations 'pixels': JPEG quality of the images the "
                              "robots send (1..95, as fleetloop.image_codec encodes).")

    @field_validator("cameras")
    @classmethod
    def _unique_cameras(cls, v: list[str]) -> list[str]:
        for i, cam in enumerate(v):
            if cam in v[:i]:
                raise ValueError(f"cameras must be unique: cameras[{i}] {cam!r} repeats cameras[{v.index(cam)}]")
        return v

    def specs(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """The fleet's (observation, action) specs as plain dicts (:func:`fleetloop.presets.metaworld_specs`)."""
        return metaworld_specs(self.observations, tuple(self.cameras), self.image_size)

    def view(self) -> dict[str, Any] | None:
        """The robots' observation options (``fleetloop actor`` / ``make_env``): None for state."""
        if self.observations == "state":
            return None
        return {"observations": "pixels", "cameras": list(self.cameras), "image_size": self.image_size}

    def actor_args(self) -> list[str]:
        """``fleetloop actor`` flags for this fleet's observation mode (none for state)."""
        from services.harness.sim_fleet import view_args
        return view_args(self.view(), self.jpeg_quality)


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
    observation_specs: list[SpecModel] | None = Field(
        None, min_length=1, max_length=64, description="Per-step observation tensors (unique names; uint8 [H, W, C] is a "
        "camera image). None: the preset of fleet.observations, or Meta-World's 'state' float32 [39]. With a fleet or a "
        "bootstrap that records demos, only that preset is accepted.")
    action_specs: list[SpecModel] | None = Field(
        None, min_length=1, max_length=64, description="Per-step action tensors (float dtypes, unique names, optional "
        "low/high bounds). None: the preset's 'action' float32 [4] in [-1, 1]. With a fleet or a bootstrap that records "
        "demos, only that preset is accepted.")
    memory_budget_mb: float | None = Field(
        None, ge=MIN_MEMORY_BUDGET_MB, le=16 << 20, description="Memory budget (MiB) of the learner's replay buffers plus "
        f"in-flight ingest (the learner's flow.memory_budget_mb); at least {MIN_MEMORY_BUDGET_MB:g}. None = no budget.")
    rollout: RolloutPolicy | None = Field(
        None, description="Release channels (learner.releases_config.RolloutPolicy): strategy 'all' (every robot runs "
        "the newest version) or 'canary' (a canary cohort judges each candidate; automatic promotion and rollback). "
        "None = the learner default (strategy all).")

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

    @field_validator("observation_specs", "action_specs")
    @classmethod
    def _spec_lists(cls, v: list[SpecModel] | None, info: ValidationInfo) -> list[SpecModel] | None:
        return v if v is None else SpecModel.check_list(v, info.field_name)

    @model_validator(mode="after")
    def _params(self) -> "JobSpec":
        check_algorithm_params(self.algorithm, self.algorithm_params)  # errors at algorithm_params.<field>
        return self

    @model_validator(mode="after")
    def _simulated_specs(self) -> "JobSpec":
        """Explicit specs of a simulated job must be the simulator's preset: one error per list, at
        ``observation_specs`` / ``action_specs``, naming the first differing tensor."""
        who = self.simulated_by
        if who is None:
            return self
        preset, details = self.preset_specs(), []
        for field, declared, expected in (("observation_specs", self.observation_specs, preset[0]),
                                          ("action_specs", self.action_specs, preset[1])):
            problems = [] if declared is None else spec_problems(declared, expected)
            if problems:
                more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
                wanted = ", ".join(f"{s['name']}:{s['dtype']}{s['shape']}" for s in expected)
                msg = (f"{field}[{problems[0].name}]: {describe_problem(problems[0])}{more}; {who} sends exactly "
                       f"[{wanted}] (omit {field} to use it)")
                details.append(InitErrorDetails(type=PydanticCustomError("spec_mismatch", msg), loc=(field,),
                                                input=[s.model_dump() for s in declared or ()]))
        if details:
            raise ValidationError.from_exception_data("JobSpec", details)
        return self

    @property
    def simulated_by(self) -> str | None:
        """Who runs the job's tasks in the simulator: ``"the simulated fleet"`` (a ``fleet``), ``"the
        bootstrap (scripted demos)"`` (a ``bootstrap`` without ``offline_dataset`` / ``initial_weights``),
        or None (real robots only)."""
        if self.fleet is not None:
            return "the simulated fleet"
        if self.bootstrap is not None and not self.offline_dataset and not self.initial_weights:
            return "the bootstrap (scripted demos)"
        return None

    def preset_specs(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """The simulator's specs for this job (plain dicts): the fleet's preset, else Meta-World 'state'."""
        return self.fleet.specs() if self.fleet is not None else metaworld_specs("state")

    def tensor_specs(self) -> tuple[list[SpecModel], list[SpecModel]]:
        """The job's (observation, action) specs: each list as declared, or its preset (:meth:`preset_specs`)."""
        obs, act = self.preset_specs()
        return ([SpecModel.model_validate(s) for s in obs] if self.observation_specs is None else list(self.observation_specs),
                [SpecModel.model_validate(s) for s in act] if self.action_specs is None else list(self.action_specs))


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
    who = spec.simulated_by
    if who is None:
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
    msg = f"{'; '.join(parts)}: not a Meta-World v3 task, and {who} runs only those"
    if unmatched:
        msg += f"; valid tasks: {', '.join(valid)}"
    i, t = unknown[0]
    raise InvalidArgument(msg, field=f"tasks[{i}]", value=t)


def learner_config(spec: JobSpec, job_id: str, state_dir: Path, control_redis_url: str | None, host: str = "127.0.0.1",
                   initial_weights: Path | None = None, offline_dataset: Path | None = None) -> LearnerConfig:
    """The learner configuration of a job (bootstrap outputs override the spec's paths). The tensor
    specs are always written (:meth:`JobSpec.tensor_specs`; the state preset is the learner's old
    default 39 / 4), ``memory_budget_mb`` becomes ``flow.memory_budget_mb`` and ``rollout`` (when set) the
    learner's ``rollout``."""
    weights = initial_weights or (Path(spec.initial_weights) if spec.initial_weights else None)
    dataset = offline_dataset or (Path(spec.offline_dataset) if spec.offline_dataset else None)
    obs, act = spec.tensor_specs()
    return LearnerConfig(
        job_id=job_id, state_dir=state_dir, tasks=spec.tasks, device="cuda" if spec.resources.gpus else "auto",
        control_redis_url=control_redis_url, serving=ServingConfig(host=host, port=0, metrics_port=0),
        observation_specs=obs, action_specs=act, flow=FlowControlConfig(memory_budget_mb=spec.memory_budget_mb),
        optimisation=OptimisationConfig(
            policy_factory=spec.policy_factory, policy_kwargs=spec.policy_kwargs, initial_weights=weights,
            algorithm=spec.algorithm, algorithm_params=spec.algorithm_params,
            staleness=StalenessConfig(bound=spec.staleness_bound) if spec.staleness_bound is not None else None,
            offline_dataset=dataset, batch_size=spec.batch_size, publish_every=spec.publish_every,
            max_updates_per_s=spec.max_updates_per_s),
        **({"rollout": spec.rollout} if spec.rollout is not None else {}))
