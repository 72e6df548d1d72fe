"""Learner configuration (pydantic). Every field is constrained and documented.

Loaded from a TOML/YAML/JSON file or built in code; ``FLEETLOOP_LEARNER_*`` environment variables
override top-level scalar fields for deployments.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from learner.sampler import SamplerConfig
from learner.staleness import StalenessConfig


class SpecModel(BaseModel):
    """One per-step tensor spec (mirrors ``fleetloop.v1.TensorSpec``)."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="Tensor name as used in chunk maps, e.g. 'state' or 'action'.")
    dtype: Literal["float32", "float16", "float64", "int64", "int32", "uint8", "bool"] = Field(
        "float32", description="Element type.")
    shape: list[int] = Field(description="Per-step shape (no time dimension).", min_length=0)
    low: list[float] = Field(default_factory=list, description="Inclusive lower bounds (actions); empty = none.")
    high: list[float] = Field(default_factory=list, description="Inclusive upper bounds (actions); empty = none.")


def _default_obs() -> list[SpecModel]:
    return [SpecModel(name="state", dtype="float32", shape=[39])]


def _default_act() -> list[SpecModel]:
    return [SpecModel(name="action", dtype="float32", shape=[4], low=[-1.0] * 4, high=[1.0] * 4)]


class LearnerConfig(BaseModel):
    """Everything one learner (one job) needs. Defaults run the Meta-World demo on one machine."""

    model_config = ConfigDict(extra="forbid")

    job_id: str = Field("demo", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
                        description="Job this learner serves; chunks for any other job are refused (NOT_FOUND).")
    host: str = Field("127.0.0.1", description="Interface the gRPC server binds (0.0.0.0 in a cluster). A bind beyond "
                      "loopback needs credentials (robot_tokens, control_redis_url enrollments or tls_client_ca_file) "
                      "or allow_unauthenticated = true; it is refused at start-up otherwise.")
    advertise_host: str | None = Field(None, max_length=253, description="Host robots dial to reach this learner "
                                       "(printed and reported as its target). None: the bound host, or for a wildcard "
                                       "bind (0.0.0.0) the address of this machine's routed interface.")
    port: int = Field(0, ge=0, le=65535, description="gRPC port; 0 picks a free one (reported by the learner).")
    metrics_port: int | None = Field(None, ge=0, le=65535,
                                     description="Prometheus /metrics HTTP port; None disables it, 0 picks a free one.")
    state_dir: Path = Field(Path("runs/learner"), description="Where the ingest log, weights and checkpoints live.")
    tasks: list[str] = Field(default_factory=lambda: ["reach-v3", "push-v3", "drawer-open-v3"], min_length=1,
                             description="Task ids of the job, in the order the policy indexes them.")
    observation_specs: list[SpecModel] = Field(default_factory=_default_obs, description="Per-step observation specs.")
    action_specs: list[SpecModel] = Field(default_factory=_default_act, description="Per-step action specs.")
    policy_factory: str = Field("fleetloop.policies:mlp_policy", description="Policy plug-in, 'module:function'.")
    policy_kwargs: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments for the factory.")
    initial_weights: Path | None = Field(None, description="safetensors file to start from (e.g. the pretrained policy).")
    algorithm: str = Field("hg_dagger", description="Algorithm plug-in name (see learner.algorithms.ALGORITHMS).")
    algorithm_params: dict[str, Any] = Field(default_factory=dict, description="Algorithm config fields.")
    sampler: SamplerConfig = Field(default_factory=SamplerConfig, description="Online/offline mix (SOP adaptive sampler).")
    staleness: StalenessConfig | None = Field(None, description="Staleness bound and policy; None = the algorithm's default.")
    offline_dataset: Path | None = Field(None, description="Demonstrations folder (fleetloop-demos/v1) for the offline buffers.")
    batch_size: int = Field(256, ge=1, le=65536, description="Samples per learner step.")
    publish_every: int = Field(25, ge=1, description="Publish new weights every K learner steps (SOP: K=25).")
    min_publish_interval_s: float = Field(0.0, ge=0, description="Never publish more often than this (0 = no limit).")
    max_updates_per_s: float | None = Field(None, gt=0, description="Cap on learner steps per second (None = as fast as possible).")
    min_online_steps: int = Field(0, ge=0, description="Do not train until this many online steps arrived (0 = train on demos at once).")
    max_ingest_steps_per_s: float | None = Field(None, gt=0, description="Fleet-wide ingest rate (steps/s over a 5 s window) "
                                                  "above which acks ask actors to back off (None = never).")
    checkpoint_every_s: float = Field(60.0, gt=0, description="Seconds between atomic checkpoints.")
    keep_versions: int = Field(8, ge=2, description="Weight versions kept in memory for fetches (older ones served from disk).")
    online_capacity: int = Field(200_000, ge=1000, description="Online buffer capacity per task (steps, FIFO).")
    chunk_steps: int = Field(50, ge=1, le=10_000, description="Steps per experience chunk asked of actors.")
    max_chunk_wait_s: float = Field(0.5, ge=0.0, le=3600.0,
                                    description="Longest an actor holds a chunk open, seconds from its first step; a "
                                                "chunk is sealed at chunk_steps steps or after this long, whichever "
                                                "comes first (0: no time limit). Bounds step -> trainable latency: "
                                                "at 30 Hz, 50-step chunks alone would hold a step up to 1.6 s.")
    max_episode_steps: int = Field(200, ge=1, description="Episode step limit (TIMEOUT past it).")
    max_message_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="Largest gRPC message accepted (and sent).")
    weight_chunk_bytes: int = Field(1 << 20, ge=4096, le=4 << 20, description="Weight fetch chunk size.")
    robot_tokens: list[str] = Field(default_factory=list,
                                    description="Accepted robot credentials (fleet-wide: a token may act as any actor id; "
                                                "enrolled tokens of the control plane are bound to their robots). Empty "
                                                "(and no enrollments or mTLS) = authentication off: loopback only.")
    allow_unauthenticated: bool = Field(False, description="Serve anonymous callers on a non-loopback host on purpose "
                                        "(e.g. behind an authenticating proxy). Logged as a warning at start and exported "
                                        "as fleetloop_learner_unauthenticated = 1. Without it such a bind is refused.")
    control_redis_url: str | None = Field(
        None, description="Control-plane Redis (redis://host:port/db). When set, the learner reports status, actors and "
                          "versions there, executes operator commands (pause, pin, rollback, stop) from it, and checks "
                          "robot tokens against the job's enrollments (robot_tokens stay valid too).")
    tls_cert_file: Path | None = Field(None, description="PEM certificate of the gRPC server; set with tls_key_file to serve TLS only.")
    tls_key_file: Path | None = Field(None, description="PEM private key of tls_cert_file.")
    tls_client_ca_file: Path | None = Field(None, description="With TLS: also require client certificates signed by this CA (mTLS).")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Training device; auto = CUDA when present.")
    grpc_workers: int = Field(136, ge=4, le=1024, description="gRPC server thread pool (each open stream holds one thread; "
                              "max_streams and max_subscriptions keep threads free for handshakes and weight fetches). "
                              "The default serves 64 robots at once (one experience stream and one weight subscription "
                              "each); the 65th is told RESOURCE_EXHAUSTED and retries. Raise it for a larger fleet.")
    max_streams: int | None = Field(
        None, ge=1, le=1024, description="Cap on concurrent StreamExperience streams, below the thread pool so stalled or idle "
        "actors can never take every thread. Extra streams are refused with RESOURCE_EXHAUSTED naming the cap and a "
        "grpc-retry-pushback-ms trailer; actors back off and retry. None = max(1, (grpc_workers - 8) // 2).")
    max_subscriptions: int | None = Field(
        None, ge=1, le=1024, description="Cap on concurrent SubscribeWeights streams (same refusal as max_streams). "
        "None = max(1, (grpc_workers - 8) // 2). max_streams + max_subscriptions must leave 4 threads of grpc_workers.")
    stream_idle_timeout_s: float = Field(
        60.0, gt=0, le=3600, description="An experience stream that brings no chunk for this long (a stalled or half-dead actor, "
        "or one that stopped reading acks), or a weight stream whose send makes no progress for this long, is ended by the "
        "learner with UNAVAILABLE ('stream idle ...'), freeing its thread; the actor reconnects and resends its spool.")
    keepalive_time_s: float = Field(20.0, gt=0, le=3600, description="The server pings every connection after this long "
                                    "without activity (HTTP/2 keepalive), also connections without calls.")
    keepalive_timeout_s: float = Field(10.0, gt=0, le=600, description="A ping unanswered for this long closes the connection "
                                       "and cancels its streams: a dead or black-holed peer is gone after keepalive_time_s + this.")
    max_actor_steps_per_s: float | None = Field(
        None, gt=0, description="Per-actor rate limit (token bucket, steps/s; None = off). Over it, acks carry backoff_ms "
        "(the time the actor's debt needs at this rate); an actor that ignores the hints and exceeds actor_hard_factor x this "
        "rate gets RESOURCE_EXHAUSTED naming the actor and the rate (counted as rejected reason rate_limited; resent later).")
    actor_burst_s: float = Field(2.0, gt=0, le=600, description="Depth of each actor's token bucket, in seconds of "
                                 "max_actor_steps_per_s (a burst this long passes without backoff).")
    actor_hard_factor: float = Field(3.0, ge=1.0, le=1000, description="Hard limit = this x max_actor_steps_per_s (bucket "
                                     "depth also x this): past it chunks are refused, not just slowed down.")
    max_backoff_ms: int = Field(5000, ge=1, le=600_000, description="Largest backoff hint an ack or refusal carries "
                                "(must stay below stream_idle_timeout_s, so a pausing actor is never cut as idle).")
    memory_budget_mb: float | None = Field(
        None, gt=0, description="Memory budget (MiB) of the replay buffers plus in-flight ingest; None = no budget (online "
        "rings hold online_capacity steps per task). With a budget: in-flight ingest (chunks being decoded and stored) is "
        "capped at 4 x max_message_bytes, the demos' buffers are counted, and each task's online ring holds "
        "min(online_capacity, what is left / tasks / bytes per step) steps. Evictions are counted in "
        "dropped_samples_total (evicted, evicted_unsampled); evicting never-trained-on steps makes acks ask for backoff.")
    seed: int = Field(0, description="Seed of the learner's sampling RNG and policy init.")
    actor_metrics_ttl_s: float = Field(600.0, gt=0, description="An actor with no chunk for this long loses its "
                                       "fleetloop_learner_actor_policy_version series (it is back with its next chunk).")
    fsync_log: bool = Field(False, description="fsync the ingest log before every ack (slower; survives power loss).")

    @model_validator(mode="after")
    def _tls_pair(self) -> "LearnerConfig":
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file must be set together")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("tls_client_ca_file needs tls_cert_file and tls_key_file")
        for name in ("tls_cert_file", "tls_key_file", "tls_client_ca_file"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{name} {str(path)!r} is not a readable file")
        return self

    @model_validator(mode="after")
    def _exposure(self) -> "LearnerConfig":
        from learner.exposure import exposure_problem
        problem = exposure_problem(self.host, self.robot_tokens, self.control_redis_url is not None,
                                   self.tls_client_ca_file is not None, self.allow_unauthenticated)
        if problem:
            raise ValueError(problem)
        return self

    @model_validator(mode="after")
    def _flow_limits(self) -> "LearnerConfig":
        explicit = self.max_streams is not None or self.max_subscriptions is not None
        if explicit and self.stream_cap + self.subscription_cap > self.grpc_workers - 4:
            raise ValueError(f"max_streams {self.stream_cap} + max_subscriptions {self.subscription_cap} must leave 4 of "
                             f"grpc_workers {self.grpc_workers} threads for handshakes and fetches")
        if self.max_backoff_ms >= self.stream_idle_timeout_s * 1000:
            raise ValueError(f"max_backoff_ms {self.max_backoff_ms} must be below stream_idle_timeout_s "
                             f"{self.stream_idle_timeout_s} (a pausing actor would be cut as idle)")
        if self.memory_budget_mb is not None and self.memory_budget_mb * (1 << 20) < 8 * self.max_message_bytes:
            raise ValueError(f"memory_budget_mb {self.memory_budget_mb} is below 8 x max_message_bytes "
                             f"({8 * self.max_message_bytes} bytes): no room for buffers beside in-flight ingest")
        return self

    @property
    def stream_cap(self) -> int:
        """Effective cap on concurrent experience streams (``max_streams`` or its default)."""
        return self.max_streams if self.max_streams is not None else max(1, (self.grpc_workers - 8) // 2)

    @property
    def subscription_cap(self) -> int:
        """Effective cap on concurrent weight subscriptions (``max_subscriptions`` or its default)."""
        return self.max_subscriptions if self.max_subscriptions is not None else max(1, (self.grpc_workers - 8) // 2)

    @field_validator("tasks")
    @classmethod
    def _unique_tasks(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"tasks must be unique, got {v}")
        return v

    @property
    def obs_dim(self) -> int:
        """Flattened size of the first observation spec (the MLP policy's input)."""
        n = 1
        for d in self.observation_specs[0].shape:
            n *= d
        return n

    @property
    def act_dim(self) -> int:
        """Flattened size of the first action spec."""
        n = 1
        for d in self.action_specs[0].shape:
            n *= d
        return n
