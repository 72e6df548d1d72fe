"""How an LLM rollout server is set up: its options (:class:`LlmActorOptions`), the local folder of the
job's base model (:func:`resolve_model_dir`) and the default vLLM engine (:func:`default_engine_factory`).
:class:`actor.llm.runtime.LlmActor` runs with them; both names are re-exported there."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class LlmActorOptions(BaseModel):
    """How one LLM actor runs (the job's rollout settings come from the learner at the handshake)."""

    model_config = ConfigDict(extra="forbid")
    learner: str = Field(description="Learner gRPC target HOST:PORT.")
    job_id: str = Field("llm", description="Job id.")
    actor_id: str = Field(min_length=1, max_length=128, description="This rollout server's id.")
    credential: str | None = Field(None, description="Bearer token (None = the learner runs without auth).")
    spool_dir: str | None = Field(None, description="Spool folder (default /tmp/fleetloop-spool-<actor_id>).")
    tasks: list[str] = Field(default_factory=list, description="Task ids to run (empty = all of the job's).")
    engine: Literal["inprocess", "server"] = Field("inprocess", description="vLLM in this process, or an "
                                                   "OpenAI-compatible vLLM server subprocess the engine supervises.")
    model_dir: str | None = Field(None, description="Use this Hugging Face folder instead of the job's model recipe.")
    model_cache_dir: str = Field("/tmp/fleetloop-models", description="Where 'tiny' / 'smollm2' models are built.")
    rollouts_per_admit: int = Field(2, ge=1, le=1024, description="Tickets asked per Admit (prompts per generate call).")
    weight_timeout_s: float = Field(120.0, gt=0, description="Deadline of one live weight update in the engine.")
    weight_wait_s: float = Field(30.0, ge=0, description="How long to wait for the admitted version's weights before "
                                 "generating on the version the engine has.")
    max_num_seqs: int | None = Field(None, ge=1, description="Engine batch limit (None = the engine's default).")
    dead_engine_grace_s: float = Field(10.0, gt=0, description="A generate call still blocked this long after its "
                                       "engine died is abandoned and the engine replaced.")
    seed: int = Field(0, description="Seed of prompt sampling and of the engine's sampling.")
    connect_timeout_s: float | None = Field(None, gt=0, description="Give up the handshake after this long (None = retry "
                                            "while the learner is unavailable).")
    tls_ca_file: str | None = Field(None, description="CA certificate (PEM) to trust: enables TLS.")
    tls_cert_file: str | None = Field(None, description="Client certificate (PEM) when the learner requires one.")
    tls_key_file: str | None = Field(None, description="Private key of tls_cert_file.")


def resolve_model_dir(settings: dict[str, Any], cache_dir: str | Path, override: str | None = None) -> Path:
    """The local folder of the job's base model: ``override``, or the recipe in ``settings`` built
    into ``cache_dir`` ('tiny' from model_seed: the same weights the learner built; 'smollm2')."""
    from fleetloop import llm_models
    if override:
        return Path(override)
    return llm_models.resolve_model(settings.get("model", "tiny"), int(settings.get("model_seed", 0)), cache_dir,
                                    missing_hint="; pass --model-dir")


def default_engine_factory(model_dir: Path, settings: dict[str, Any], opts: LlmActorOptions):
    """A started :class:`actor.llm.engine.VllmEngine` for ``model_dir`` sized for the job's rollouts."""
    from actor.llm.engine import EngineConfig, VllmEngine
    extra: dict[str, Any] = {"max_num_seqs": opts.max_num_seqs} if opts.max_num_seqs else {}
    cfg = EngineConfig(model_dir=str(model_dir), seed=opts.seed, mode=opts.engine,
                       max_model_len=int(settings["max_model_len"]), **extra)
    engine = VllmEngine(cfg)
    engine.start()
    return engine
