"""How the Kubernetes launcher builds a job's objects: :class:`KubeSettings` (env ``FLEETLOOP_K8S_*``
in the API pod, set by the helm chart's ``_launcher.tpl``) and the fixed ports and paths inside job pods."""

from __future__ import annotations

from collections.abc import Mapping
from contextvars import ContextVar
from typing import Any, Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, InitSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict

from fleetloop.config_files import StrictEnvSource

GRPC_PORT, METRICS_PORT, ROBOT_METRICS_PORT = 50051, 9400, 9100
STATE_DIR = "/var/lib/fleetloop/learner"
TLS_DIR, ROBOT_TLS_DIR = "/etc/fleetloop/tls", "/etc/fleetloop/robot-tls"
LEARNER_COMMAND = ["fleetloop", "learner", "--config", "/etc/fleetloop/learner.json"]

#: the environment and defaults of the KubeSettings being built by :meth:`KubeSettings.from_env`
_FROM_ENV: ContextVar[tuple[Mapping[str, str] | None, Mapping[str, Any]]] = ContextVar("kube_settings_env",
                                                                                      default=(None, {}))


class KubeSettings(BaseSettings):
    """How the Kubernetes launcher builds a job's objects (env ``FLEETLOOP_K8S_*`` in the API pod).

    A pydantic-settings model: ``KubeSettings(...)`` (and ``model_validate``) take their arguments, then
    ``FLEETLOOP_K8S_<FIELD>`` variables of ``os.environ`` (lists and mappings as JSON); :meth:`from_env`
    reads any mapping, over defaults. An unknown ``FLEETLOOP_K8S_*`` variable is refused with
    InvalidArgument naming it (a typo must not be ignored)."""

    model_config = SettingsConfigDict(extra="forbid", env_prefix="FLEETLOOP_K8S_")
    namespace: str = Field("default", description="Namespace of every job object.")
    learner_image: str = Field("fleetloop/learner:0.1.0", description="Image of the learner.")
    robot_image: str = Field("fleetloop/robot:0.1.0", description="Image of the simulated robots.")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = Field("IfNotPresent", description="Pull policy of both.")
    redis_url: str = Field(description="Redis URL as seen from job pods (control agent + enrollment checks).")
    learner_service_type: Literal["LoadBalancer", "NodePort", "ClusterIP"] = Field(
        "LoadBalancer", description="Service type of a learner's gRPC endpoint (robots outside need LoadBalancer/NodePort).")
    kuberay: bool = Field(False, description="Run learners as KubeRay RayJobs (the KubeRay operator must be installed).")
    state_storage_class: str | None = Field(None, description="StorageClass for the learner's state volume; None = emptyDir "
                                                              "(state lost when the pod moves).")
    state_size: str = Field("20Gi", description="Size of the learner's state volume.")
    node_selector: dict[str, str] = Field(default_factory=dict, description="nodeSelector of learner pods (e.g. GPU nodes).")
    tolerations: list[dict[str, Any]] = Field(default_factory=list, description="Tolerations of learner pods.")
    learner_memory: str = Field("8Gi", description="Memory request (and limit) of a learner.")
    robot_cpu: str = Field("1", description="CPU request of a simulated robot.")
    robot_memory: str = Field("1Gi", description="Memory request (and limit) of a simulated robot.")
    image_pull_secrets: list[str] = Field(default_factory=list, description="Names of image pull Secrets for job pods.")
    learner_service_annotations: dict[str, str] = Field(
        default_factory=dict, description="Annotations of a learner's gRPC Service (e.g. a cloud load balancer's settings).")
    ray_workers: int = Field(0, ge=0, le=64, description="KubeRay only: GPU worker replicas in each job's Ray cluster "
                                                          "(capacity for data-parallel training; the learner runs on the head).")
    ray_worker_gpus: int = Field(1, ge=1, le=16, description="KubeRay only: GPUs (nvidia.com/gpu) per Ray worker.")
    tls_secret: str | None = Field(None, description="Secret (tls.crt, tls.key, optional ca.crt) mounted into learners: "
                                                      "their gRPC endpoint serves TLS; simulated robots trust its ca.crt.")
    tls_client_auth: bool = Field(False, description="With tls_secret: learners require client certificates signed by its "
                                                     "ca.crt (mTLS); simulated robots then need robot_tls_secret.")
    robot_tls_secret: str | None = Field(None, description="Secret (tls.crt, tls.key) with the client certificate simulated "
                                                            "robots present when tls_client_auth is on.")

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource) -> tuple[PydanticBaseSettingsSource, ...]:
        environ, defaults = _FROM_ENV.get()
        return init_settings, StrictEnvSource(settings_cls, environ), InitSettingsSource(settings_cls, dict(defaults))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, *, defaults: Mapping[str, Any] | None = None,
                 **overrides: Any) -> "KubeSettings":
        """Settings from ``environ`` (default ``os.environ``): ``overrides`` > ``FLEETLOOP_K8S_*`` > ``defaults``."""
        token = _FROM_ENV.set((environ, defaults or {}))
        try:
            return cls(**overrides)
        finally:
            _FROM_ENV.reset(token)

    @model_validator(mode="after")
    def _tls(self) -> "KubeSettings":
        if self.tls_client_auth and not self.tls_secret:
            raise ValueError(f"tls_client_auth=true needs tls_secret (got tls_secret={self.tls_secret!r})")
        if self.robot_tls_secret and not self.tls_secret:
            raise ValueError(f"robot_tls_secret={self.robot_tls_secret!r} needs tls_secret (the learner serves TLS)")
        return self
