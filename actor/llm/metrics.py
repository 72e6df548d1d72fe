"""What an LLM actor measures: its Prometheus series (:class:`LlmActorMetrics`, a private registry,
label ``actor``) and the run totals of its final log line (:class:`LlmActorStats`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server


class LlmActorMetrics:
    """Prometheus series of an LLM actor (label ``actor``); private registry."""

    def __init__(self, actor: str) -> None:
        self.registry = r = CollectorRegistry()
        a = ["actor"]
        self.actor = actor
        self.weight_update_seconds = Histogram("fleetloop_llm_weight_update_seconds", "Time to load a new version into "
                                               "the running engine.", a, registry=r,
                                               buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120))
        self.weight_update_failures = Counter("fleetloop_llm_weight_update_failures_total", "Weight updates that failed "
                                              "or timed out (retried next turn), by reason.", a + ["reason"], registry=r)
        self.engine_restarts = Counter("fleetloop_llm_engine_restarts_total", "Dead engines restarted.", a, registry=r)
        self.groups = Counter("fleetloop_llm_actor_groups_total", "Groups generated and spooled, by task.", a + ["task"],
                              registry=r)
        self.tokens = Counter("fleetloop_llm_actor_tokens_total", "Completion tokens generated.", a, registry=r)
        self.verifier_errors = Counter("fleetloop_llm_actor_verifier_errors_total", "Completions whose verifier raised.",
                                       a, registry=r)
        self.reward = Gauge("fleetloop_llm_actor_reward_mean", "Mean reward of the newest generate call.", a, registry=r)
        self.version = Gauge("fleetloop_llm_actor_policy_version", "Version the engine runs.", a, registry=r)
        self.generate_seconds = Counter("fleetloop_llm_actor_generate_seconds_total", "Time in generate calls.", a,
                                        registry=r)
        self.wait_seconds = Counter("fleetloop_llm_actor_admission_wait_seconds_total", "Time waiting for admission "
                                    "tickets (rollout-server idle time).", a, registry=r)
        self.blocked = Counter("fleetloop_llm_actor_admit_blocked_total", "Admit calls that granted nothing.", a, registry=r)
        self.spool = Gauge("fleetloop_llm_actor_spool_chunks", "Groups waiting for an ack.", a, registry=r)
        self.set_aside = Counter("fleetloop_llm_actor_set_aside_groups_total", "Groups never sent or never resent, by "
                                 "reason: oversized (larger than the learner's max_message_bytes: not spooled, or set "
                                 "aside by the sender), or the learner's refusal (invalid_argument, internal, ...).",
                                 a + ["reason"], registry=r)

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        return int(server.server_port)


@dataclass
class LlmActorStats:
    """What a run did (also the CLI's final log line)."""

    groups: int = 0
    completions: int = 0
    tokens: int = 0
    verifier_errors: int = 0
    reward_sum: float = 0.0
    admit_calls: int = 0
    tickets: int = 0
    blocked: int = 0
    weight_updates: int = 0
    weight_update_failures: int = 0
    engine_restarts: int = 0
    generate_s: float = 0.0
    wait_s: float = 0.0
    skipped_prompts: int = 0
    oversized_groups: int = 0  # groups over the learner's max_message_bytes: logged, counted, never spooled
    versions: dict[int, int] = field(default_factory=dict)  # engine version -> groups generated on it

    def as_dict(self) -> dict[str, Any]:
        d = dict(vars(self))
        d["versions"] = {str(k): v for k, v in self.versions.items()}
        busy = self.generate_s + self.wait_s
        d["idle_share"] = self.wait_s / busy if busy > 0 else 0.0
        return d
