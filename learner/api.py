"""The learner's vocabulary: job states, admission grants, status models, and the protocols the
servicer, the Ray actor, the control agent and the harnesses program against.

Two cores implement :class:`LearnerCore`: the robot :class:`learner.core.LearnerCore` and the LLM
:class:`learner.llm.core.LlmLearnerCore`. Both share one :class:`Lifecycle` implementation
(:mod:`learner.lifecycle`). Nothing outside a core switches on its kind: the servicer asks the
core (``check_handshake``, ``job_tasks``, ``run_config``, ``check_chunk``, ``check_admit``).

Status contract: ``core.status() == core.status_model().model_dump()``: the same keys and values
the plain dict carried before the models (Redis, the dashboard, reports and tests read it by key).
Every value is JSON-able; a robot status has no ``kind`` key, an LLM status has ``kind: "llm"``.
torch, numpy and grpc types appear only under ``TYPE_CHECKING``: importing this module is cheap.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Literal, Protocol, Union, runtime_checkable

from pydantic import BaseModel, ConfigDict, field_serializer

if TYPE_CHECKING:
    import numpy as np

    from fleetloop.v1 import fleetloop_pb2 as pb
    from learner.batch import Batch
    from learner.config import LearnerConfig
    from learner.llm.config import LlmLearnerConfig
    from learner.metrics import LearnerMetrics
    from learner.weight_store import WeightStore

    AnyLearnerConfig = Union[LearnerConfig, LlmLearnerConfig]
    GateResult = tuple[np.ndarray, np.ndarray, np.ndarray]  # keep, weights, staleness (StalenessGate.at_training)

#: The kind of job a core trains; the handshake serves the ``ActorKind`` of the same name.
Kind = Literal["robot", "llm"]


class JobState(StrEnum):
    """Announced to actors with every weight announcement. ``running`` -> ``paused`` -> ``running``
    (operator pause/resume); ``stopping`` is final (actors finish their episode, flush and leave)."""

    RUNNING = "running"
    PAUSED = "paused"
    STOPPING = "stopping"


class AdmitGrant(BaseModel):
    """What one Admit grants (:meth:`LearnerCore.admit`). Invariants: ``retry_after_ms >= 100`` when
    ``ticket_ids`` is empty, 0 otherwise; ``learner_version >= 0``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    ticket_ids: list[str]
    learner_version: int
    retry_after_ms: int
    ticket_ttl_s: float
    max_staleness: int


class StatusBase(BaseModel):
    """The keys every core's status has. ``version``: newest published (-1 before the first);
    ``fleet_version``: what the fleet is told to run (pinned or newest); ``loss``: the newest step's."""

    model_config = ConfigDict(extra="forbid")

    job: str
    version: int
    fleet_version: int | None
    pinned: int | None
    step: int
    paused: bool
    job_state: JobState
    device: str
    time: float
    algorithm: str
    staleness_bound: int
    staleness_max: int
    loss: float | None
    train_stats: dict[str, float]
    actors: dict[str, dict[str, Any]]

    @field_serializer("job_state")
    def _plain_state(self, state: JobState) -> str:
        return state.value  # a plain str in the dump, as before the enum


class TaskStatus(BaseModel):
    """One robot task: steps received (and of them operator corrections), episodes by outcome,
    replay sizes by source and the sampler's online share."""

    model_config = ConfigDict(extra="forbid")

    steps: int
    intervention_steps: int
    episodes: dict[str, int]
    online_buffer: int
    offline_buffer: int
    online_share: float


class MemoryStatus(BaseModel):
    """:meth:`learner.core.LearnerCore.memory_status`: budget (None: no budget) and allocated bytes."""

    model_config = ConfigDict(extra="forbid")

    budget_bytes: int | None
    inflight_limit_bytes: int | None
    online_capacity: int
    online_bytes: int
    offline_bytes: int
    buffer_bytes: int
    inflight_bytes: int
    inflight_peak_bytes: int
    pressure_ms: int
    pressure_allowed_steps_per_s: float | None
    pressure_tightened: int


class RobotStatus(StatusBase):
    """A robot job (no ``kind`` key). ``actors``: each actor's ingest tally (``vars(ActorTally)``)."""

    tasks: dict[str, TaskStatus]
    episodes_total: int
    staleness_max_autonomous: int
    ingested_steps: int
    gate: dict[str, Any]
    offline_steps: int
    memory: MemoryStatus
    recap_startup: dict[str, Any] | None


class LlmStatus(StatusBase):
    """An LLM (GRPO) job. ``actors``: ``{"version", "last_seen"}`` per actor at its last Admit;
    ``history``: the newest learner-step records (:mod:`learner.llm.history`)."""

    kind: Literal["llm"] = "llm"
    model: str
    tasks: list[str]
    eta: int
    group_size: int
    batch_groups: int
    groups_total: int
    groups_queued: int
    groups_by_version: dict[str, int]
    groups_requeued: int
    durability: dict[str, Any]
    trained_groups: int
    dropped_stale: int
    duplicates: int
    rejected: dict[str, int]
    admission: dict[str, Any]
    learner_idle_s: float
    learner_busy_s: float
    learner_idle_share: float
    history: list[dict[str, Any]]


LearnerStatus = Union[RobotStatus, LlmStatus]


@dataclass(frozen=True)
class LearnerHooks:
    """Measurement hooks (benches, profilers) a core calls instead of anyone patching its privates.
    All optional; a hook left None costs one attribute test where it would be called. Hooks run on
    the calling thread and must not raise (an exception propagates like the wrapped code's own).

    - ``on_ingest(chunk, t0, t1, duplicate)``: after every chunk the servicer hands to
      :meth:`LearnerCore.ingest` was stored (``t0``/``t1``: wall-clock ``time.time()`` around the
      store; not called for the start-up replay of the ingest log, nor for a refused chunk);
    - ``on_update(batch, seconds)``: after ``Algorithm.update(batch)`` in a learner step (robot);
    - ``on_gate(version, versions, interventions, sources, result)``: after
      ``StalenessGate.at_training`` in a learner step, ``result = (keep, weights, staleness)`` (robot);
    - ``on_lock_wait(seconds)``: how long a learner step waited for the ingest lock (robot; the
      thread running the step: the training thread, or a caller of ``train_step``);
    - ``wrap_training(loop)``: returns the function the training thread runs instead of ``loop``
      (e.g. one that enables a profiler around it); applied once, by ``start_training``.
    """

    on_ingest: Callable[[pb.EpisodeChunk, float, float, bool], None] | None = None
    on_update: Callable[[Batch, float], None] | None = None
    on_gate: Callable[[int, np.ndarray, np.ndarray, np.ndarray, GateResult], None] | None = None
    on_lock_wait: Callable[[float], None] | None = None
    wrap_training: Callable[[Callable[[], None]], Callable[[], None]] | None = None


#: No hooks: today's code path.
NO_HOOKS = LearnerHooks()


@runtime_checkable
class Lifecycle(Protocol):
    """Versions, operator controls and the training thread (one implementation: :mod:`learner.lifecycle`).

    Invariants: versions only increase (``publish`` stores version + 1, also after a rollback);
    while ``paused`` no training step starts and nothing is published by training (ingest, serving
    and manual publishes go on); ``job_state`` is ``stopping`` from ``begin_stop`` on, for good."""

    paused: bool

    @property
    def version(self) -> int:
        """Newest published version (-1 before the first publish)."""
        ...

    @property
    def job_state(self) -> JobState: ...

    def publish(self) -> int:
        """Store the policy as the next version and announce it; returns that version. Holds the
        training lock: never copies weights in the middle of a step."""
        ...

    def pin(self, version: int | None) -> None:
        """Tell the fleet to run ``version`` (None: unpin, the newest again)."""
        ...

    def weights_for(self, actor_id: str) -> tuple[Any, str]:
        """(VersionInfo announced to ``actor_id``, release channel "stable" / "candidate" / ""): the
        version of the actor's release channel (robot jobs with ``rollout: canary``, :mod:`learner.releases`),
        else the fleet version (pin or newest) and "". VersionInfo None before the first publish."""
        ...

    def keep(self, version: int, keep: bool = True) -> None:
        """Mark ``version`` kept (retention never deletes its weights) or release it; NotFound if not retained."""
        ...

    def set_paused(self, paused: bool) -> None: ...

    def begin_stop(self) -> None:
        """Announce ``stopping`` and stop training; serving goes on until :meth:`stop`."""
        ...

    def pause_and_publish(self) -> int:
        """Pause, wait for the step in flight (if any) to end, publish; returns the version published."""
        ...

    def checkpoint(self) -> Path:
        """Save what a restart resumes from now; returns where."""
        ...

    def start_training(self) -> None:
        """Start the training thread (once; later calls do nothing)."""
        ...

    def stop_training(self, timeout_s: float = 30.0) -> None:
        """End the training thread (waits up to ``timeout_s``); no checkpoint, nothing closed; training
        does not start again. Direct ``train_step`` calls still work afterwards."""
        ...

    def stop(self, checkpoint: bool = True) -> None:
        """Stop training, checkpoint (``checkpoint``) and close the durable logs."""
        ...


@runtime_checkable
class LearnerCore(Lifecycle, Protocol):
    """One job's learner as :class:`learner.server.LearnerServicer`, :class:`learner.process.LearnerProcess`
    and :class:`learner.control_agent.ControlAgent` use it. The ``check_*`` methods raise a
    :class:`fleetloop.errors.FleetloopError` naming the field; the servicer calls them in a fixed
    order (its refusal messages and metric labels depend on it)."""

    kind: Kind
    job: str
    cfg: AnyLearnerConfig
    metrics: LearnerMetrics
    weights: WeightStore
    step: int
    device: Any

    def check_handshake(self, req: pb.HandshakeRequest) -> None:
        """After credential, protocol, job, actor id and kind: robot specs, or LLM protocol >= 2."""
        ...

    def job_tasks(self) -> list[str]:
        """The task ids a handshake may name."""
        ...

    def run_config(self) -> pb.RunConfig:
        """What a handshake answers with (the wire form of this job's settings)."""
        ...

    def check_chunk(self, chunk: pb.EpisodeChunk) -> None:
        """A decoded chunk of a bound stream, before it is stored (robot: refuses a ``group``)."""
        ...

    def reserve(self, nbytes: int) -> ContextManager[None]:
        """Hold in-flight ingest memory for one chunk while it is decoded and stored."""
        ...

    def ingest(self, chunk: pb.EpisodeChunk, nbytes: int, version: int, raw: bytes) -> bool:
        """Validate and store one chunk (durably, before returning); True when it was a resend."""
        ...

    def backoff_ms(self, actor: str = "") -> int:
        """Backpressure hint for the next ack to ``actor`` (0: none)."""
        ...

    def check_admit(self) -> None:
        """Whether Admit serves this job (robot: FailedPrecondition naming ``kind``)."""
        ...

    def admit(self, actor_id: str, n: int, current_version: int) -> AdmitGrant: ...

    def status_model(self) -> LearnerStatus: ...

    def status(self) -> dict[str, Any]:
        """``status_model().model_dump()`` (see the module docstring)."""
        ...

    def audit(self) -> dict[str, Any]:
        """Exactly-once audit; ``duplicates_stored`` must be 0."""
        ...

    def episodes_since(self, index: int) -> tuple[int, list[dict[str, Any]]]:
        """Records with index >= ``index`` (as far as retained): (next index, records)."""
        ...


@runtime_checkable
class Rollback(Protocol):
    """A core that can continue training from an older version (robot jobs)."""

    def rollback(self, version: int) -> int:
        """Load ``version``'s weights, reset the optimizer, unpin and publish them as a new version
        (versions never go back); returns the new version."""
        ...
