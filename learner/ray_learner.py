"""The learner as a Ray actor, and how to start one.

``start_learner(config)`` connects to Ray (a local ``ray.init`` by default, ``ray_address`` for a
cluster), places one :class:`RayLearner` actor (with a GPU when the cluster has one and the config
allows CUDA, else one CPU), and returns a :class:`LearnerHandle` with its gRPC and metrics
addresses. Inside the actor, a gRPC server (ingest + weights) and a training thread run over one
:class:`~learner.core.LearnerCore`, or, for an :class:`~learner.llm.config.LlmLearnerConfig`
(``kind: "llm"`` in its JSON), one :class:`~learner.llm.core.LlmLearnerCore` (GRPO on LLM rollouts).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import ray

from fleetloop.logs import event, get_logger
from learner.config import LearnerConfig

if TYPE_CHECKING:
    from learner.llm.config import LlmLearnerConfig

log = get_logger("learner.ray")


def _unnice() -> None:
    """Undo a worker niceness Ray may have applied (the learner must not starve beside its fleet)."""
    try:
        current = os.nice(0)
        if current > 0:
            os.nice(-current)
    except OSError:
        pass


def parse_config(config_json: str) -> "LearnerConfig | LlmLearnerConfig":
    """A learner config from JSON: ``{"kind": "llm", ...}`` is an :class:`~learner.llm.config.LlmLearnerConfig`
    (GRPO on LLM rollouts), anything else a robot :class:`LearnerConfig`."""
    import json
    data = json.loads(config_json)
    if isinstance(data, dict) and data.get("kind") == "llm":
        from learner.llm.config import LlmLearnerConfig
        return LlmLearnerConfig.model_validate_json(config_json)
    return LearnerConfig.model_validate_json(config_json)


class _RayLearnerImpl:
    """Body of the Ray actor (kept a plain class so it can also run in-process for tests)."""

    def __init__(self, config_json: str) -> None:
        from learner.server import LearnerServicer, build_server

        cfg = parse_config(config_json)
        _unnice()
        if isinstance(cfg, LearnerConfig):
            from learner.core import LearnerCore
            self.core = LearnerCore(cfg)
        else:
            from learner.llm.core import LlmLearnerCore
            self.core = LlmLearnerCore(cfg)
        self.agent = None
        auth = None
        redis_url = getattr(cfg, "control_redis_url", None)  # LLM jobs: no control-plane agent yet
        if redis_url:
            import redis

            from learner.auth import EnrollmentTokens, StaticTokens
            from learner.control_agent import ControlAgent
            auth = EnrollmentTokens(redis.Redis.from_url(cfg.control_redis_url, socket_timeout=5.0, decode_responses=True),
                                    fallback=StaticTokens(cfg.robot_tokens))
        self.servicer = LearnerServicer(self.core, auth=auth)
        creds = None
        if cfg.tls_cert_file is not None:
            from fleetloop.tls import server_credentials
            creds = server_credentials(cfg.tls_cert_file, cfg.tls_key_file, cfg.tls_client_ca_file)
        self.server, self.port = build_server(self.servicer, cfg.host, cfg.port, cfg.grpc_workers, cfg.max_message_bytes,
                                              credentials=creds)
        self.server.start()
        self.metrics_port = self.core.metrics.serve(cfg.metrics_port, cfg.host if cfg.host != "0.0.0.0" else "0.0.0.0") \
            if cfg.metrics_port is not None else None
        self.core.start_training()
        if redis_url:
            self.agent = ControlAgent(self.core, cfg.control_redis_url, sessions=lambda: dict(self.servicer.sessions))
            self.agent.start()
        from learner.exposure import advertised_host
        self.host = advertised_host(cfg.host, cfg.advertise_host)  # what robots dial, not 127.0.0.1
        event(log, "learner_started", job=cfg.job_id, version=self.core.version, port=self.port,
              metrics_port=self.metrics_port, device=str(self.core.device), pid=os.getpid())

    def address(self) -> dict[str, Any]:
        return {"host": self.host, "port": self.port, "metrics_port": self.metrics_port, "pid": os.getpid()}

    def status(self) -> dict[str, Any]:
        return self.core.status()

    def episodes_since(self, index: int) -> tuple[int, list[dict[str, Any]]]:
        return self.core.episodes_since(index)

    def pin(self, version: int | None) -> None:
        self.core.pin(version)

    def audit(self) -> dict[str, Any]:
        return self.core.audit()

    def publish_now(self) -> int:
        return self.core.publish()

    def checkpoint(self) -> str:
        return str(self.core.checkpoint())

    def drain(self) -> None:
        """Announce 'stopping' to the fleet (actors finish their episode, flush and leave)."""
        self.core.begin_stop()

    def stop(self) -> dict[str, Any]:
        self.core.begin_stop()
        self.server.stop(grace=2.0).wait(5.0)
        self.core.stop(checkpoint=True)
        if self.agent is not None:
            self.agent.stop(final_tick=True)
            self.agent.emit("learner_stopped", version=self.core.version, step=self.core.step)
        return self.core.status()


RayLearner = ray.remote(max_restarts=0)(_RayLearnerImpl)


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
