"""Learner configuration (pydantic). Every field is constrained and documented.

A :class:`LearnerConfig` is a small top-level model (identity, tasks, specs, device) with nested
groups: ``serving`` (:class:`ServingConfig`: bind, ports, threads, stream caps, keepalive, message
limits, credentials), ``tls`` (:class:`TlsConfig`), ``flow`` (:class:`FlowControlConfig`: rate
limits, backoff, memory budget), ``optimisation`` (:class:`OptimisationConfig`: policy, algorithm,
sampler, schedule), ``episodes`` (:class:`EpisodeConfig`: what actors are told), ``images``
(:class:`ImageConfig`: camera frame storage and batch-time decoding; no flat names) and ``rollout``
(:class:`learner.releases_config.RolloutPolicy`: release channels; no flat names). The LLM learner
(:mod:`learner.llm.config`) reuses ``serving`` and ``tls``.

Old flat names still load: each key of :data:`LEGACY` (``port``, ``tls_cert_file``, ``batch_size``,
...) is lifted to its nested path (``serving.port``, ``tls.cert_file``, ``optimisation.batch_size``)
before validation, so ``LearnerConfig(port=0, batch_size=16)`` and old files and ConfigMaps stay
valid; giving the old and the new name together is an error naming both. Validated with
``context={"source": ...}`` (a file or the environment, see :mod:`learner.settings`) each lifted name
is logged once as ``event=config_name_deprecated old=port new=serving.port``; in code it is silent.

Built in code, loaded from a TOML/YAML/JSON file, and overridden by ``FLEETLOOP_LEARNER_*``
environment variables (``FLEETLOOP_LEARNER_SERVING__PORT``) by :func:`learner.settings.load_learner_config`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from fleetloop.logs import event, get_logger
from fleetloop.specs import PolicySpec
from learner.releases_config import RolloutPolicy
from learner.sampler import SamplerConfig
from learner.staleness import StalenessConfig

log = get_logger("learner.config")


class SpecModel(BaseModel):
    """One per-step tensor spec (mirrors ``fleetloop.v1.TensorSpec``; see :mod:`fleetloop.specs`).

    A uint8 spec of rank 3 is a camera image ``[H, W, C]``: channels last, C in (1, 3, 4), H and W
    >= 1 (:attr:`is_image`); any other uint8 rank-3 layout (e.g. channels first) is refused naming
    ``shape``. ``low``/``high`` are empty, one value for every element, or one per element
    (``prod(shape)`` values), and ``low <= high``. :meth:`check_list` holds a list of specs to unique
    names (and action specs to float dtypes)."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=128,
                      description="Tensor name as used in chunk maps, e.g. 'state', 'corner3' or 'action'.")
    dtype: Literal["float32", "float16", "float64", "int64", "int32", "uint8", "bool"] = Field(
        "float32", description="Element type; uint8 [H, W, C] is a camera image.")
    shape: list[int] = Field(description="Per-step shape (no time dimension, at most 16 dimensions, none negative); an "
                             "image is [H, W, C], channels last.", min_length=0, max_length=16)
    low: list[float] = Field(default_factory=list, description="Inclusive lower bounds (actions): empty = none, one "
                             "value for every element, or one per element.")
    high: list[float] = Field(default_factory=list, description="Inclusive upper bounds (actions): empty = none, one "
                              "value for every element, or one per element.")

    @field_validator("shape")
    @classmethod
    def _image_layout(cls, v: list[int], info: ValidationInfo) -> list[int]:
        if any(d < 0 for d in v):
            raise ValueError(f"shape {v} has a negative dimension")
        if info.data.get("dtype") == "uint8" and len(v) == 3 and not (v[2] in (1, 3, 4) and v[0] >= 1 and v[1] >= 1):
            hint = f" (channels first? use [{v[1]}, {v[2]}, {v[0]}])" if v[0] in (1, 3, 4) and min(v[1:]) >= 1 else ""
            raise ValueError(f"shape {v}: a uint8 spec of rank 3 is a camera image [H, W, C], channels last, with C in "
                             f"1, 3 or 4 and H, W >= 1{hint}")
        return v

    @field_validator("low", "high")
    @classmethod
    def _bounds(cls, v: list[float], info: ValidationInfo) -> list[float]:
        shape, size = info.data.get("shape"), None
        if shape is not None:
            size = 1
            for d in shape:
                size *= d
        if any(x != x for x in v):
            raise ValueError(f"{info.field_name} {v} holds NaN (every value would be out of bounds)")
        if v and size is not None and len(v) not in (1, size):
            raise ValueError(f"{info.field_name} has {len(v)} values; shape {shape} needs 1 or {size}")
        low = info.data.get("low") if info.field_name == "high" else None
        if low and v:
            n = max(len(low), len(v))
            lo, hi = (low * n if len(low) == 1 else low), (v * n if len(v) == 1 else v)
            if len(lo) == len(hi) and any(a > b for a, b in zip(lo, hi)):
                raise ValueError(f"high {v} is below low {low}")
        return v

    @property
    def is_image(self) -> bool:
        """uint8 ``[H, W, C]`` with C in (1, 3, 4): a camera frame (:attr:`fleetloop.specs.TensorInfo.is_image`)."""
        return self.dtype == "uint8" and len(self.shape) == 3 and self.shape[2] in (1, 3, 4) and min(self.shape[:2]) >= 1

    @staticmethod
    def check_list(specs: list["SpecModel"], field: str) -> list["SpecModel"]:
        """``specs`` unchanged if their names are unique, and for ``field == "action_specs"`` every
        dtype is a float type; ValueError naming ``field[i]`` and the value otherwise."""
        first: dict[str, int] = {}
        for i, s in enumerate(specs):
            if s.name in first:
                raise ValueError(f"{field}[{i}] name {s.name!r} repeats {field}[{first[s.name]}]: names must be unique")
            first[s.name] = i
            if field == "action_specs" and s.dtype not in ("float32", "float16", "float64"):
                raise ValueError(f"{field}[{i}] {s.name!r} has dtype {s.dtype!r}: actions are float32, float16 or float64")
        return specs


def _default_obs() -> list[SpecModel]:
    return [SpecModel(name="state", dtype="float32", shape=[39])]


def _default_act() -> list[SpecModel]:
    return [SpecModel(name="action", dtype="float32", shape=[4], low=[-1.0] * 4, high=[1.0] * 4)]


class ServingConfig(BaseModel):
    """The gRPC server: bind, ports, threads, stream caps, keepalive, message limits, credentials."""

    model_config = ConfigDict(extra="forbid")
    host: str = Field("127.0.0.1", description="Interface the gRPC server binds (0.0.0.0 in a cluster). A bind beyond "
                      "loopback needs credentials (serving.robot_tokens, control_redis_url enrollments or "
                      "tls.client_ca_file) or serving.allow_unauthenticated = true; it is refused at start-up otherwise.")
    advertise_host: str | None = Field(None, max_length=253, description="Host robots dial to reach this learner "
                                       "(printed and reported as its target). None: the bound host, or for a wildcard "
                                       "bind (0.0.0.0) the address of this machine's routed interface.")
    port: int = Field(0, ge=0, le=65535, description="gRPC port; 0 picks a free one (reported by the learner).")
    metrics_port: int | None = Field(None, ge=0, le=65535,
                                     description="Prometheus /metrics HTTP port; None disables it, 0 picks a free one.")
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
    max_message_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="Largest gRPC message accepted (and sent).")
    weight_chunk_bytes: int = Field(1 << 20, ge=4096, le=4 << 20, description="Weight fetch chunk size.")
    keep_versions: int = Field(8, ge=2, description="Weight versions kept in memory for fetches (older ones served from disk).")
    robot_tokens: list[str] = Field(default_factory=list,
                                    description="Accepted robot credentials (fleet-wide: a token may act as any actor id; "
                                                "enrolled tokens of the control plane are bound to their robots). Empty "
                                                "(and no enrollments or mTLS) = authentication off: loopback only.")
    allow_unauthenticated: bool = Field(False, description="Serve anonymous callers on a non-loopback host on purpose "
                                        "(e.g. behind an authenticating proxy). Logged as a warning at start and exported "
                                        "as fleetloop_learner_unauthenticated = 1. Without it such a bind is refused.")

    @property
    def stream_cap(self) -> int:
        """Effective cap on concurrent experience streams (``max_streams`` or its default)."""
        return self.max_streams if self.max_streams is not None else max(1, (self.grpc_workers - 8) // 2)

    @property
    def subscription_cap(self) -> int:
        """Effective cap on concurrent weight subscriptions (``max_subscriptions`` or its default)."""
        return self.max_subscriptions if self.max_subscriptions is not None else max(1, (self.grpc_workers - 8) // 2)


class TlsConfig(BaseModel):
    """TLS of the gRPC server (all None: plaintext)."""

    model_config = ConfigDict(extra="forbid")
    cert_file: Path | None = Field(None, description="PEM certificate of the gRPC server; set with key_file to serve TLS only.")
    key_file: Path | None = Field(None, description="PEM private key of cert_file.")
    client_ca_file: Path | None = Field(None, description="With TLS: also require client certificates signed by this CA (mTLS).")

    @model_validator(mode="after")
    def _tls_pair(self) -> "TlsConfig":
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("tls_cert_file and tls_key_file (tls.cert_file, tls.key_file) must be set together")
        if self.client_ca_file is not None and self.cert_file is None:
            raise ValueError("tls_client_ca_file (tls.client_ca_file) needs tls.cert_file and tls.key_file")
        for name in ("cert_file", "key_file", "client_ca_file"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"tls_{name} (tls.{name}) {str(path)!r} is not a readable file")
        return self


class BackoffConfig(BaseModel):
    """The backoff hint every learner's acks and refusals carry (the LLM learner's whole ``flow`` group)."""

    model_config = ConfigDict(extra="forbid")
    max_backoff_ms: int = Field(5000, ge=1, le=600_000, description="Largest backoff hint an ack or refusal carries "
                                "(must stay below serving.stream_idle_timeout_s, so a pausing actor is never cut as idle).")


class FlowControlConfig(BackoffConfig):
    """Flow control of a robot learner: per-actor and fleet-wide rate limits, backoff, memory budget."""

    max_actor_steps_per_s: float | None = Field(
        None, gt=0, description="Per-actor rate limit (token bucket, steps/s; None = off). Over it, acks carry backoff_ms "
        "(the time the actor's debt needs at this rate); an actor that ignores the hints and exceeds actor_hard_factor x this "
        "rate gets RESOURCE_EXHAUSTED naming the actor and the rate (counted as rejected reason rate_limited; resent later).")
    actor_burst_s: float = Field(2.0, gt=0, le=600, description="Depth of each actor's token bucket, in seconds of "
                                 "max_actor_steps_per_s (a burst this long passes without backoff).")
    actor_hard_factor: float = Field(3.0, ge=1.0, le=1000, description="Hard limit = this x max_actor_steps_per_s (bucket "
                                     "depth also x this): past it chunks are refused, not just slowed down.")
    max_ingest_steps_per_s: float | None = Field(None, gt=0, description="Fleet-wide ingest rate (steps/s over a 5 s window) "
                                                 "above which acks ask actors to back off (None = never).")
    memory_budget_mb: float | None = Field(
        None, gt=0, description="Memory budget (MiB) of the replay buffers plus in-flight ingest; None = no budget (online "
        "rings hold online_capacity steps per task). With a budget: in-flight ingest (chunks being decoded and stored) is "
        "capped at 4 x serving.max_message_bytes, the demos' buffers are counted, and each task's online ring holds "
        "min(online_capacity, what is left / tasks / bytes per step) steps; cameras stored compressed (images.storage) "
        "count their frames' actual bytes, and each ring also evicts (FIFO) by bytes to stay within its share. Evictions "
        "are counted in "
        "dropped_samples_total (evicted, evicted_unsampled); evicting never-trained-on steps makes acks ask for backoff.")
    online_capacity: int = Field(200_000, ge=1000, description="Online buffer capacity per task (steps, FIFO).")
    actor_metrics_ttl_s: float = Field(600.0, gt=0, description="An actor with no chunk for this long loses its "
                                       "fleetloop_learner_actor_policy_version series (it is back with its next chunk).")


class OptimisationConfig(BaseModel):
    """What is trained and how: policy, algorithm, data mix, schedule, checkpoints."""

    model_config = ConfigDict(extra="forbid")
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
    checkpoint_every_s: float = Field(60.0, gt=0, description="Seconds between atomic checkpoints.")
    mixed_precision: Literal["auto", "bf16", "off"] = Field(
        "auto", description="Autocast of each update: auto = bf16 on CUDA and none on CPU; bf16 = always where the "
                            "device supports it; off = full fp32. Robots always run fp32.")


class EpisodeConfig(BaseModel):
    """What actors are told about chunks and episodes (sent in the handshake's RunConfig)."""

    model_config = ConfigDict(extra="forbid")
    chunk_steps: int = Field(50, ge=1, le=10_000, description="Steps per experience chunk asked of actors.")
    max_chunk_wait_s: float = Field(0.5, ge=0.0, le=3600.0,
                                    description="Longest an actor holds a chunk open, seconds from its first step; a "
                                                "chunk is sealed at chunk_steps steps or after this long, whichever "
                                                "comes first (0: no time limit). Bounds step -> trainable latency: "
                                                "at 30 Hz, 50-step chunks alone would hold a step up to 1.6 s.")
    max_episode_steps: int = Field(200, ge=1, description="Episode step limit (TIMEOUT past it).")


class ImageConfig(BaseModel):
    """Camera observations in the replay: how frames are stored and decoded (:mod:`learner.frames`)."""

    model_config = ConfigDict(extra="forbid")
    storage: Literal["decoded", "compressed"] = Field(
        "compressed", description="How the online replay keeps camera frames that arrive JPEG/PNG-encoded: compressed = "
        "as the encoded bytes (the ingest checks headers and end markers only; frames are decoded when a batch is built, "
        "a frame that fails then is dropped from its batch as dropped_samples_total{reason=corrupt_frame}; the memory "
        "budget counts the actual frame bytes); decoded = decoded and fully checked at ingest (a corrupt frame is refused "
        "with INVALID_ARGUMENT). Frames that arrive raw are stored decoded either way.")
    decode_workers: int = Field(2, ge=1, le=64, description="Threads that decode a batch's compressed frames (the "
                                "training thread is one of them; JPEG/PNG decoders release the GIL).")
    prefetch: int = Field(1, ge=0, le=8, description="Batches sampled and decoded ahead, while the current update runs "
                          "(0 = sample and decode in the step). Jobs with compressed frames only; the staleness gate is "
                          "applied when a batch is used, with the version current then.")
    decoder: Literal["auto", "pillow", "simplejpeg"] = Field(
        "auto", description="JPEG decoder at batch time: auto = simplejpeg when installed (pip install "
        "'fleetloop[images]'), else Pillow; PNG always uses Pillow.")


def _group(name: str, fields: tuple[str, ...], prefix: str = "") -> dict[str, tuple[str, str]]:
    return {prefix + f: (name, f) for f in fields}


#: Old flat name -> (group, field) of every LearnerConfig field that moved into a group (frozen: a new
#: field gets no flat name).
LEGACY: dict[str, tuple[str, str]] = {
    **_group("serving", ("host", "advertise_host", "port", "metrics_port", "grpc_workers", "max_streams",
                         "max_subscriptions", "stream_idle_timeout_s", "keepalive_time_s", "keepalive_timeout_s",
                         "max_message_bytes", "weight_chunk_bytes", "keep_versions", "robot_tokens",
                         "allow_unauthenticated")),
    **_group("tls", ("cert_file", "key_file", "client_ca_file"), prefix="tls_"),
    **_group("flow", ("max_actor_steps_per_s", "actor_burst_s", "actor_hard_factor", "max_ingest_steps_per_s",
                      "max_backoff_ms", "memory_budget_mb", "online_capacity", "actor_metrics_ttl_s")),
    **_group("optimisation", ("policy_factory", "policy_kwargs", "initial_weights", "algorithm", "algorithm_params",
                              "sampler", "staleness", "offline_dataset", "batch_size", "publish_every",
                              "min_publish_interval_s", "max_updates_per_s", "min_online_steps", "checkpoint_every_s")),
    **_group("episodes", ("chunk_steps", "max_chunk_wait_s", "max_episode_steps")),
}


def lift_legacy(data: Any, legacy: dict[str, tuple[str, str]], source: str | None = None,
                renamed: dict[str, str] | None = None) -> Any:
    """``data`` with each old flat key of ``legacy`` moved to its nested path (a new dict; ``data``
    itself when it holds none). The old and the new name together raise ValueError naming both.
    ``source`` (a file or the environment): each lifted name is logged as deprecated (once per call);
    ``renamed`` (if given) collects ``old -> group.field``."""
    if not isinstance(data, dict) or not any(k in legacy for k in data):
        return data
    out = dict(data)
    for old in [k for k in data if k in legacy]:
        group, name = legacy[old]
        sub = out.get(group)
        if isinstance(sub, BaseModel):  # a group given as a model: keep what it set explicitly
            sub = {k: getattr(sub, k) for k in sub.model_fields_set}
        elif sub is None:
            sub = {}
        if not isinstance(sub, dict):
            continue  # a malformed group: validation names it (and the extra flat key)
        if name in sub:
            raise ValueError(f"{old} and {group}.{name} are the same setting (old and new name): give only {group}.{name}")
        out[group] = {**sub, name: out.pop(old)}
        if renamed is not None:
            renamed[old] = f"{group}.{name}"
        if source is not None:
            event(log, "config_name_deprecated", level=30, old=old, new=f"{group}.{name}", source=source)
    return out


def _source(info: ValidationInfo) -> str | None:
    return info.context.get("source") if isinstance(info.context, dict) else None


def serving_problem(serving: ServingConfig, tls: TlsConfig, enrollments: bool) -> str | None:
    """Why these serving settings expose a learner to anyone (see :mod:`learner.exposure`), or None."""
    from learner.exposure import exposure_problem
    return exposure_problem(serving.host, serving.robot_tokens, enrollments, tls.client_ca_file is not None,
                            serving.allow_unauthenticated)


def flow_problem(serving: ServingConfig, max_backoff_ms: int, memory_budget_mb: float | None = None) -> str | None:
    """Why the stream caps, backoff and memory budget do not fit together, or None."""
    s = serving
    explicit = s.max_streams is not None or s.max_subscriptions is not None
    if explicit and s.stream_cap + s.subscription_cap > s.grpc_workers - 4:
        return (f"serving.max_streams {s.stream_cap} + serving.max_subscriptions {s.subscription_cap} must leave 4 of "
                f"serving.grpc_workers {s.grpc_workers} threads for handshakes and fetches")
    if max_backoff_ms >= s.stream_idle_timeout_s * 1000:
        return (f"flow.max_backoff_ms {max_backoff_ms} must be below serving.stream_idle_timeout_s "
                f"{s.stream_idle_timeout_s} (a pausing actor would be cut as idle)")
    if memory_budget_mb is not None and memory_budget_mb * (1 << 20) < 8 * s.max_message_bytes:
        return (f"flow.memory_budget_mb {memory_budget_mb} is below 8 x serving.max_message_bytes "
                f"({8 * s.max_message_bytes} bytes): no room for buffers beside in-flight ingest")
    return None


class LearnerConfig(BaseModel):
    """Everything one learner (one job) needs. Defaults run the Meta-World demo on one machine."""

    model_config = ConfigDict(extra="forbid")
    #: old flat name -> nested path accepted by this model (see the module docstring)
    legacy_names: ClassVar[dict[str, tuple[str, str]]] = LEGACY

    kind: Literal["robot"] = Field("robot", description="Config discriminator: 'robot' (the default; 'llm' selects "
                                   "learner.llm.config.LlmLearnerConfig).")
    job_id: str = Field("demo", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
                        description="Job this learner serves; chunks for any other job are refused (NOT_FOUND).")
    state_dir: Path = Field(Path("runs/learner"), description="Where the ingest log, weights and checkpoints live.")
    tasks: list[str] = Field(default_factory=lambda: ["reach-v3", "push-v3", "drawer-open-v3"], min_length=1,
                             description="Task ids of the job, in the order the policy indexes them.")
    observation_specs: list[SpecModel] = Field(default_factory=_default_obs, description="Per-step observation specs.")
    action_specs: list[SpecModel] = Field(default_factory=_default_act, description="Per-step action specs.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Training device; auto = CUDA when present.")
    seed: int = Field(0, description="Seed of the learner's sampling RNG and policy init.")
    control_redis_url: str | None = Field(
        None, description="Control-plane Redis (redis://host:port/db). When set, the learner reports status, actors and "
                          "versions there, executes operator commands (pause, pin, rollback, stop) from it, and checks "
                          "robot tokens against the job's enrollments (serving.robot_tokens stay valid too).")
    fsync_log: bool = Field(False, description="fsync the ingest log before every ack (slower; survives power loss).")
    serving: ServingConfig = Field(default_factory=ServingConfig, description="The gRPC server (ServingConfig).")
    tls: TlsConfig = Field(default_factory=TlsConfig, description="TLS of the gRPC server (TlsConfig).")
    flow: FlowControlConfig = Field(default_factory=FlowControlConfig, description="Rate limits, backoff and memory "
                                    "budget (FlowControlConfig).")
    optimisation: OptimisationConfig = Field(default_factory=OptimisationConfig, description="Policy, algorithm, data "
                                             "mix and schedule (OptimisationConfig).")
    episodes: EpisodeConfig = Field(default_factory=EpisodeConfig, description="Chunk and episode limits actors are "
                                    "told (EpisodeConfig).")
    images: ImageConfig = Field(default_factory=ImageConfig, description="Camera frames in the replay: storage, "
                                "batch-time decoding and prefetch (ImageConfig).")
    rollout: RolloutPolicy = Field(default_factory=RolloutPolicy, description="Release channels (RolloutPolicy, "
                                   "learner.releases): strategy all (every robot runs the newest version) or canary "
                                   "(a canary cohort judges each candidate before the fleet gets it).")

    @model_validator(mode="before")
    @classmethod
    def _legacy_names(cls, data: Any, info: ValidationInfo) -> Any:
        return lift_legacy(data, cls.legacy_names, _source(info))

    @model_validator(mode="after")
    def _exposure(self) -> "LearnerConfig":
        problem = serving_problem(self.serving, self.tls, self.control_redis_url is not None)
        if problem:
            raise ValueError(problem)
        return self

    @model_validator(mode="after")
    def _flow_limits(self) -> "LearnerConfig":
        problem = flow_problem(self.serving, self.flow.max_backoff_ms, self.flow.memory_budget_mb)
        if problem:
            raise ValueError(problem)
        return self

    @field_validator("observation_specs", "action_specs")
    @classmethod
    def _spec_lists(cls, v: list[SpecModel], info: ValidationInfo) -> list[SpecModel]:
        return SpecModel.check_list(v, info.field_name)

    @field_validator("tasks")
    @classmethod
    def _unique_tasks(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"tasks must be unique, got {v}")
        return v

    @property
    def policy_spec(self) -> PolicySpec:
        """The job's observation/action tensors and tasks, as policies and the replay see them."""
        return PolicySpec.from_specs(self.observation_specs, self.action_specs, self.tasks)

    @property
    def obs_dim(self) -> int:
        """Width of the vector (non-image) observation tensors, flattened (the MLP policy's input)."""
        return self.policy_spec.vector_dim

    @property
    def act_dim(self) -> int:
        """Width of the flat action: every action spec, flattened, in spec order."""
        return self.policy_spec.act_dim
