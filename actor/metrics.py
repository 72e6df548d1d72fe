"""Prometheus metrics of one actor process, named ``fleetloop_actor_*`` (private registry)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server


class ActorMetrics:
    """Counters and gauges for a robot actor; label ``actor`` on every series."""

    def __init__(self, actor: str) -> None:
        self.registry = r = CollectorRegistry()
        a = ["actor"]
        self.actor = actor
        self.steps = Counter("fleetloop_actor_steps_total", "Env steps taken.", a + ["task"], registry=r)
        self.intervention_steps = Counter("fleetloop_actor_intervention_steps_total", "Steps taken by the operator.", a + ["task"], registry=r)
        self.episodes = Counter("fleetloop_actor_episodes_total", "Episodes ended, by outcome.", a + ["task", "outcome"], registry=r)
        self.version = Gauge("fleetloop_actor_policy_version", "Policy version running.", a, registry=r)
        self.learner_version = Gauge("fleetloop_actor_learner_version", "Learner version seen in the last ack.", a, registry=r)
        self.spool_chunks = Gauge("fleetloop_actor_spool_chunks", "Chunks waiting for an ack.", a, registry=r)
        self.swaps = Counter("fleetloop_actor_policy_swaps_total", "Weight swaps (between episodes).", a, registry=r)
        self.oversized_steps = Counter("fleetloop_actor_oversized_steps_total", "Steps set aside, never sent: one step alone "
                                       "larger than the learner's max_message_bytes.", a + ["task"], registry=r)
        self.set_aside_chunks = Counter("fleetloop_actor_set_aside_chunks_total", "Spooled chunks moved to the spool's "
                                        "rejected/ and never resent, by reason (oversized, invalid_argument, internal, "
                                        "...).", a + ["reason"], registry=r)
        self.swap_delay = Histogram("fleetloop_actor_publish_to_run_seconds", "Version published on the learner -> running here.", a,
                                    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60), registry=r)

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        return int(server.server_port)
