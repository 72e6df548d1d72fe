"""Prometheus metrics of one learner, named ``fleetloop_learner_*``.

Each learner owns a private CollectorRegistry (so tests can run several in one process); the
``/metrics`` endpoint serves that registry. Counters end in ``_total``, times in ``_seconds``.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

STALENESS_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64, 128)


class LearnerMetrics:
    """All learner metrics; label ``job`` on every series."""

    def __init__(self, job: str) -> None:
        self.registry = CollectorRegistry()
        r, j = self.registry, ["job"]
        self.job = job
        self.ingested_steps = Counter("fleetloop_learner_ingested_steps_total", "Steps stored in the replay store.", j + ["task"], registry=r)
        self.ingested_bytes = Counter("fleetloop_learner_ingested_bytes_total", "Serialized chunk bytes received and stored.", j, registry=r)
        self.ingested_chunks = Counter("fleetloop_learner_ingested_chunks_total", "Chunks stored.", j, registry=r)
        self.duplicates = Counter("fleetloop_learner_duplicate_chunks_total", "Resent chunks recognised and not stored again.", j, registry=r)
        self.refused_handshakes = Counter("fleetloop_learner_refused_handshakes_total", "Handshakes refused, by reason.",
                                          j + ["reason"], registry=r)
        self.rejected = Counter("fleetloop_learner_rejected_chunks_total", "Chunks refused, by reason.", j + ["reason"], registry=r)
        self.staleness = Histogram("fleetloop_learner_staleness_versions", "Learner version minus behaviour version of online samples at training time.",
                                   j, buckets=STALENESS_BUCKETS, registry=r)
        self.staleness_bound = Gauge("fleetloop_learner_staleness_bound_versions", "Configured staleness bound.", j, registry=r)
        self.dropped_samples = Counter("fleetloop_learner_dropped_samples_total", "Samples dropped before training, by reason.", j + ["reason"], registry=r)
        self.version = Gauge("fleetloop_learner_policy_version", "Newest published policy version.", j, registry=r)
        self.fleet_version = Gauge("fleetloop_learner_fleet_policy_version", "Version actors are told to run (pin or newest).", j, registry=r)
        self.learner_steps = Counter("fleetloop_learner_steps_total", "Learner (gradient) steps.", j, registry=r)
        self.update_seconds = Histogram("fleetloop_learner_update_seconds", "Time of one learner step (sample + update).", j, registry=r)
        self.publish_seconds = Histogram("fleetloop_learner_publish_seconds", "Time to serialise, hash and store a version.", j, registry=r)
        self.published_bytes = Counter("fleetloop_learner_published_bytes_total", "Bytes of published weight blobs.", j, registry=r)
        self.served_bytes = Counter("fleetloop_learner_weight_served_bytes_total", "Weight bytes sent to actors.", j, registry=r)
        self.received_steps = Counter("fleetloop_learner_received_steps_total", "Steps received in new chunks, stored or "
                                      "dropped (ingested_steps_total counts the stored ones).", j + ["task"], registry=r)
        self.intervention_steps = Counter("fleetloop_learner_intervention_steps_total", "Operator-taken steps received in new "
                                          "chunks (rate over received_steps_total = windowed intervention rate).", j + ["task"], registry=r)
        self.actor_version = Gauge("fleetloop_learner_actor_policy_version", "Behaviour version of each actor's newest chunk "
                                   "(series removed after actor_metrics_ttl_s without a chunk).", j + ["actor"], registry=r)
        self.episodes = Counter("fleetloop_learner_episodes_total", "Episodes ended, by task and outcome.", j + ["task", "outcome"], registry=r)
        self.intervention_ratio = Gauge("fleetloop_learner_intervention_ratio", "Share of online steps taken by the operator.", j + ["task"], registry=r)
        self.buffer_steps = Gauge("fleetloop_learner_buffer_steps", "Steps held, by task and source.", j + ["task", "source"], registry=r)
        self.online_share = Gauge("fleetloop_learner_sampler_online_share", "Sampler online share w_on per task.", j + ["task"], registry=r)
        self.step_to_store = Histogram("fleetloop_learner_ingest_latency_seconds", "Chunk produced on the actor -> stored on the learner.", j,
                                       buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30), registry=r)
        self.loss = Gauge("fleetloop_learner_loss", "Loss the newest learner step minimised (steps that skipped the update leave it unchanged).", j, registry=r)
        self.task_loss = Gauge("fleetloop_learner_task_loss", "Mean unweighted per-sample loss of the newest step's samples, by task and source (what the sampler sees).",
                               j + ["task", "source"], registry=r)
        self.idle_seconds = Counter("fleetloop_learner_idle_seconds_total", "Time the training loop waited for data or throttling.", j, registry=r)
        # -- flow control: backpressure, rate limits, memory budget, stream guard --------------------
        self.backoff_acks = Counter("fleetloop_learner_backoff_acks_total", "Acks that asked the actor to back off, by reason "
                                    "(actor_rate, ingest_rate, memory_pressure: the largest hint wins).", j + ["reason"], registry=r)
        self.buffer_bytes = Gauge("fleetloop_learner_buffer_bytes", "Bytes allocated by the replay buffers, by task and source.",
                                  j + ["task", "source"], registry=r)
        self.inflight_bytes = Gauge("fleetloop_learner_ingest_inflight_bytes", "Bytes reserved by chunks being decoded and stored now.",
                                    j, registry=r)
        self.memory_budget = Gauge("fleetloop_learner_memory_budget_bytes", "Configured memory budget of buffers plus in-flight "
                                   "ingest (0 = no budget).", j, registry=r)
        self.streams_open = Gauge("fleetloop_learner_streams_open", "Long-lived RPCs being served now, by rpc.", j + ["rpc"], registry=r)
        self.streams_closed = Counter("fleetloop_learner_streams_closed_total", "Long-lived RPCs the learner refused or ended, by rpc "
                                      "and reason (over_cap: refused at the cap; idle_timeout: no progress for stream_idle_timeout_s; "
                                      "revoked: its credential was revoked while it was open).", j + ["rpc", "reason"], registry=r)
        self.seq_gaps = Counter("fleetloop_learner_seq_gaps_total", "Chunk seqs skipped within episodes (chunks the actor "
                                "set aside: refused, oversized, or failed by a learner bug); the rest of each episode is kept.",
                                j, registry=r)
        self.unauthenticated = Gauge("fleetloop_learner_unauthenticated", "1 when the learner accepts callers without a credential "
                                     "(no robot_tokens, enrollments or mTLS), 0 when every RPC needs one. Beyond loopback this "
                                     "needs allow_unauthenticated = true.", j + ["host"], registry=r)

        # -- release channels (issue 21, learner.releases) ---------------------------------------
        self.release_decisions = Counter("fleetloop_release_decisions_total", "Release candidates decided, by decision "
                                         "(promoted, rolled_back, aborted) and by (auto, operator).",
                                         j + ["decision", "by"], registry=r)
        self.release_exposure = Counter("fleetloop_release_exposure_episodes_total", "Robot episodes ended, by the "
                                        "channel of their behaviour version: candidate, stable, other (neither), all "
                                        "(strategy all) or pinned (an operator pin held).", j + ["channel"], registry=r)
        self.release_version = Gauge("fleetloop_release_version", "Version of each release channel (stable, "
                                     "candidate); -1 when there is none.", j + ["channel"], registry=r)

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Start the /metrics HTTP server; returns the bound port (0 picks a free one)."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return int(server.server_port)
