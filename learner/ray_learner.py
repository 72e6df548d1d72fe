"""The learner as a Ray actor, and how to start one.

``start_learner(config)`` connects to Ray (a local ``ray.init`` by default, ``ray_address`` for a
cluster), places one :class:`RayLearner` actor (with a GPU when the cluster has one and the config
allows CUDA, else one CPU), and returns a :class:`LearnerHandle` with its gRPC and metrics
addresses. Inside the actor runs one :class:`~learner.process.LearnerProcess` (built by
:func:`~learner.process.build_learner`, the only place a learner is assembled): a gRPC server
(ingest + weights) and a training thread over one :class:`~learner.core.LearnerCore`, or, for an
:class:`~learner.llm.config.LlmLearnerConfig` (``kind: "llm"`` in its JSON), one
:class:`~learner.llm.core.LlmLearnerCore` (GRPO on LLM rollouts).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import ray

from learner.config import LearnerConfig
from learner.process import build_learner, parse_config

if TYPE_CHECKING:
    from learner.llm.config import LlmLearnerConfig

__all__ = ["LearnerActor", "LearnerHandle", "RayLearner", "actor_name", "attach_learner", "ensure_ray", "parse_config",
           "start_learner"]


def _unnice() -> None:
    """Undo a worker niceness Ray may have applied (the learner must not starve beside its fleet)."""
    try:
        current = os.nice(0)
        if current > 0:
            os.nice(-current)
    except OSError:
        pass


class LearnerActor:
    """Body of the Ray actor: one :class:`~learner.process.LearnerProcess`, built and served at
    construction; each method delegates to it (Ray calls them from up to ``max_concurrency`` threads;
    the core's methods are thread-safe)."""

    def __init__(self, config_json: str) -> None:
        _unnice()
        self.p = build_learner(config_json).serve()

    def address(self) -> dict[str, Any]:
        return self.p.address()

    def status(self) -> dict[str, Any]:
        return self.p.core.status()

    def episodes_since(self, index: int) -> tuple[int, list[dict[str, Any]]]:
        return self.p.core.episodes_since(index)

    def pin(self, version: int | None) -> None:
        self.p.core.pin(version)

    def audit(self) -> dict[str, Any]:
        return self.p.core.audit()

    def publish_now(self) -> int:
        return self.p.core.publish()

    def checkpoint(self) -> str:
        return str(self.p.core.checkpoint())

    def drain(self) -> None:
        """Announce 'stopping' to the fleet (actors finish their episode, flush and leave)."""
        self.p.core.begin_stop()

    def stop(self) -> dict[str, Any]:
        return self.p.stop()


RayLearner = ray.remote(max_restarts=0)(LearnerActor)


@dataclass
class LearnerHandle:
    """A running learner: the Ray actor handle and where to reach it."""

    actor: Any
    host: str
    port: int
    metrics_port: int | None
    pid: int

    @property
    def target(self) -> str:
        """gRPC target for actors (host:port: the advertised host, see :func:`learner.exposure.advertised_host`)."""
        from learner.exposure import target
        return target(self.host, self.port)

    def status(self) -> dict[str, Any]:
        return ray.get(self.actor.status.remote(), timeout=30)

    def episodes_since(self, index: int) -> tuple[int, list[dict[str, Any]]]:
        return ray.get(self.actor.episodes_since.remote(index), timeout=30)

    def pin(self, version: int | None) -> None:
        ray.get(self.actor.pin.remote(version), timeout=30)

    def audit(self) -> dict[str, Any]:
        return ray.get(self.actor.audit.remote(), timeout=60)

    def drain(self) -> None:
        """Tell the fleet the job is stopping (actors finish their episode, flush, leave)."""
        ray.get(self.actor.drain.remote(), timeout=30)

    def stop(self) -> dict[str, Any]:
        """Stop serving and training, checkpoint, and end the Ray actor."""
        try:
            final = ray.get(self.actor.stop.remote(), timeout=60)
        finally:
            ray.kill(self.actor)
        return final


def ensure_ray(address: str | None = None, num_cpus: int | None = None, temp_dir: str | None = None) -> None:
    """Connect to Ray once: a local instance by default (auth disabled, no dashboard)."""
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # Ray starts workers at nice 15; a learner that shares the machine with robots would starve.
    os.environ.setdefault("RAY_worker_niceness", "0")
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True, "configure_logging": False}
    if address:
        ray.init(address=address, **kwargs)
    else:
        if temp_dir:
            kwargs["_temp_dir"] = temp_dir
        ray.init(num_cpus=num_cpus, **kwargs)


def actor_name(job_id: str) -> str:
    """Ray actor name of a job's learner."""
    return f"fleetloop-learner-{job_id}"


def start_learner(config: "LearnerConfig | LlmLearnerConfig", ray_address: str | None = None, num_cpus: int | None = None,
                  temp_dir: str | None = None, actor_cpus: float = 1.0, actor_gpus: int | None = None) -> LearnerHandle:
    """Start one job's learner on Ray; GPU when the cluster has one and ``config.device`` allows
    (``actor_gpus`` asks for that many explicitly)."""
    ensure_ray(ray_address, num_cpus, temp_dir)
    gpus = ray.cluster_resources().get("GPU", 0)
    use_gpu = config.device != "cpu" and gpus >= 1
    n_gpus = (actor_gpus if actor_gpus else 1) if use_gpu else 0
    opts: dict[str, Any] = {"num_cpus": actor_cpus, "num_gpus": n_gpus, "name": actor_name(config.job_id),
                            "max_concurrency": 4}
    cfg = config.model_copy(update={"device": "cuda" if use_gpu else ("cpu" if config.device == "auto" else config.device)})
    actor = RayLearner.options(**opts).remote(cfg.model_dump_json())
    addr = ray.get(actor.address.remote(), timeout=300)
    return LearnerHandle(actor, addr["host"], addr["port"], addr["metrics_port"], addr["pid"])


def attach_learner(job_id: str) -> LearnerHandle | None:
    """The running learner of ``job_id`` on the connected Ray cluster, or None."""
    try:
        actor = ray.get_actor(actor_name(job_id))
        addr = ray.get(actor.address.remote(), timeout=30)
    except Exception:  # not found, or dead
        return None
    return LearnerHandle(actor, addr["host"], addr["port"], addr["metrics_port"], addr["pid"])
