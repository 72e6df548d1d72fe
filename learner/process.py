"""The one composition root of a learner: :func:`build_learner` -> :class:`LearnerProcess`.

A learner process is a core (robot :class:`~learner.core.LearnerCore`, or
:class:`~learner.llm.core.LlmLearnerCore` for ``kind: "llm"``), the gRPC servicer over it (ingest,
weights, admission), the gRPC server (bound at build time, so :attr:`LearnerProcess.port` is known
before it serves), the Prometheus endpoint, and, when the config names a control-plane Redis, the
enrollment credentials and the :class:`~learner.control_agent.ControlAgent`.

Every caller assembles a learner here: the Ray actor (:mod:`learner.ray_learner`, which wraps this
class once), the in-process harnesses, the benches and the tests. Nothing else constructs a servicer
or a server around a core.

Lifecycle (each step at most once, in this order):
- ``build_learner(cfg)``: the core restores its state (checkpoint, ingest-log replay, weights), the
  server is bound; nothing is served and no training runs yet;
- :meth:`LearnerProcess.serve`: starts the server, the metrics endpoint (``metrics_port`` not None),
  the training thread (``train=True``) and the control agent;
- :meth:`LearnerProcess.stop` (graceful: announce ``stopping``, stop serving, stop training,
  checkpoint, close the ingest log) or :meth:`LearnerProcess.kill` (abrupt, as a crash would leave
  it: no checkpoint, no log close).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from fleetloop.logs import event, get_logger
from learner.config import LearnerConfig

if TYPE_CHECKING:
    from learner.api import LearnerCore as LearnerCoreApi
    from learner.api import LearnerHooks
    from learner.auth import Authenticator
    from learner.llm.config import LlmLearnerConfig

log = get_logger("learner.process")


def parse_config(config_json: str) -> "LearnerConfig | LlmLearnerConfig":
    """A learner config from JSON, by its ``kind``: ``"llm"`` is an :class:`~learner.llm.config.LlmLearnerConfig`
    (GRPO on LLM rollouts), anything else (or none) a robot :class:`LearnerConfig`. Old flat names are
    lifted to their groups (:data:`learner.config.LEGACY`); the environment is not read."""
    import json

    from learner.settings import config_model
    data = json.loads(config_json)
    return config_model(data.get("kind") if isinstance(data, dict) else None).model_validate_json(config_json)


class LearnerProcess:
    """A built learner (module docstring). Public attributes: ``cfg``, ``core``, ``servicer``,
    ``server``, ``port`` (the bound gRPC port), ``host`` (the address robots dial, see
    :func:`learner.exposure.advertised_host`), ``metrics_port`` (None until served, or without one),
    ``agent`` (the control agent, or None)."""

    def __init__(self, cfg: "LearnerConfig | LlmLearnerConfig", *, auth: "Authenticator | None" = None,
                 hooks: "LearnerHooks | None" = None) -> None:
        from learner.exposure import advertised_host
        from learner.server import LearnerServicer, build_server

        self.cfg = cfg
        if isinstance(cfg, LearnerConfig):
            from learner.core import LearnerCore
            self.core: LearnerCoreApi = LearnerCore(cfg, hooks=hooks)
        else:
            if hooks is not None:
                raise ValueError("hooks: only a robot learner core has them")
            from learner.llm.core import LlmLearnerCore
            self.core = LlmLearnerCore(cfg)
        # LLM jobs have no control-plane agent yet
        self._redis_url = cfg.control_redis_url if isinstance(cfg, LearnerConfig) else None
        if auth is None and self._redis_url:
            import redis

            from learner.auth import EnrollmentTokens, StaticTokens
            auth = EnrollmentTokens(redis.Redis.from_url(self._redis_url, socket_timeout=5.0, decode_responses=True),
                                    fallback=StaticTokens(cfg.serving.robot_tokens))
        self.servicer = LearnerServicer(self.core, auth=auth)
        creds = None
        if cfg.tls.cert_file is not None:
            from fleetloop.tls import server_credentials
            creds = server_credentials(cfg.tls.cert_file, cfg.tls.key_file, cfg.tls.client_ca_file)
        sv = cfg.serving
        self.server, self.port = build_server(self.servicer, sv.host, sv.port, sv.grpc_workers, sv.max_message_bytes,
                                              credentials=creds)
        self.host = advertised_host(cfg.serving.host, cfg.serving.advertise_host)
        self.metrics_port: int | None = None
        self.agent: Any = None
        self._served = False
        self._stopped = False

    @property
    def target(self) -> str:
        """gRPC target robots dial (``host:port``)."""
        from learner.exposure import target
        return target(self.host, self.port)

    def serve(self, train: bool = True) -> "LearnerProcess":
        """Start serving: the gRPC server, the metrics endpoint (when ``cfg.serving.metrics_port`` is not None),
        the training thread (``train``; False leaves training to the caller) and, with a control-plane
        Redis, the control agent. Returns self, so ``build_learner(cfg).serve()`` reads as one line."""
        if self._served:
            raise RuntimeError("serve: this learner is already serving")
        self._served = True
        cfg = self.cfg
        self.server.start()
        if cfg.serving.metrics_port is not None:
            self.metrics_port = self.core.metrics.serve(cfg.serving.metrics_port, cfg.serving.host)
        if train:
            self.core.start_training()
        if self._redis_url:
            from learner.control_agent import ControlAgent
            self.agent = ControlAgent(self.core, self._redis_url, sessions=lambda: dict(self.servicer.sessions))
            self.agent.start()
        event(log, "learner_started", job=cfg.job_id, version=self.core.version, port=self.port,
              metrics_port=self.metrics_port, device=str(self.core.device), pid=os.getpid())
        return self

    def status(self) -> dict[str, Any]:
        """The core's status (``learner.api.RobotStatus`` or ``LlmStatus`` as a dict)."""
        return self.core.status()

    def address(self) -> dict[str, Any]:
        """``{"host", "port", "metrics_port", "pid"}``: where this learner is reached."""
        return {"host": self.host, "port": self.port, "metrics_port": self.metrics_port, "pid": os.getpid()}

    def stop(self, checkpoint: bool = True, grace_s: float = 2.0, wait_s: float = 5.0,
             announce: bool = True) -> dict[str, Any]:
        """Graceful stop; idempotent. ``announce``: tell the fleet the job is stopping first (actors
        finish their episode, flush and leave). Then the server stops (in-flight RPCs get ``grace_s``;
        at most ``wait_s`` is waited), training stops, a final checkpoint is written (``checkpoint``)
        and the ingest log is closed: every acknowledged chunk is on disk. The control agent, if any,
        makes its final tick and reports ``learner_stopped``. Returns the final status."""
        if self._stopped:
            return self.core.status()
        self._stopped = True
        if announce:
            self.core.begin_stop()
        self.server.stop(grace=grace_s).wait(wait_s)
        self.core.stop(checkpoint=checkpoint)
        if self.agent is not None:
            self.agent.stop(final_tick=True)
            self.agent.emit("learner_stopped", version=self.core.version, step=self.core.step)
        return self.core.status()

    def kill(self, wait_s: float = 10.0) -> None:
        """Abrupt stop, as a crash would leave the state folder: the server stops with no grace and
        training stops, but no checkpoint is written and the ingest log is not closed (what was
        acknowledged is already on disk: acks follow the log write)."""
        self._stopped = True
        self.server.stop(grace=0).wait(wait_s)
        self.core.stop_training(wait_s)
        if self.agent is not None:
            self.agent.stop(final_tick=False)


def build_learner(config: "LearnerConfig | LlmLearnerConfig | str", *, auth: "Authenticator | None" = None,
                  hooks: "LearnerHooks | None" = None) -> LearnerProcess:
    """Assemble one learner (module docstring); ``config`` may be the JSON of either config kind.
    ``auth`` replaces the credential check the config implies (static ``robot_tokens``, or enrollments
    in the control-plane Redis); ``hooks`` are the robot core's measurement hooks (benches)."""
    cfg = parse_config(config) if isinstance(config, str) else config
    return LearnerProcess(cfg, auth=auth, hooks=hooks)
