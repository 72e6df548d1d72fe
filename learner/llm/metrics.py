"""Prometheus metrics of an LLM learner, named ``fleetloop_llm_*``, label ``job`` on every series.

They live in the registry of the core's :class:`learner.metrics.LearnerMetrics` (one ``/metrics``
endpoint per learner; the servicer's generic series, rejected chunks, refused handshakes, served
weight bytes, streams, stay where they are). Admission counts are read from the
:class:`~learner.llm.admission.AdmissionController` at scrape time (a custom collector), so they
can never drift from the controller's own bookkeeping.

Definitions: *staleness* of a group = learner version when it is trained minus the oldest
``policy_version`` of its completions (observed once per trained group); *reward_mean* /
*accuracy* = mean reward / share of completions with reward >= 1 (the tasks' full score) over the
groups of the newest learner step; *idle share* = ``learner_idle_seconds / (idle + busy)``.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

STALENESS_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 32, 64)


class _AdmissionCollector:
    """Scrape-time view of an admission controller's counters."""

    def __init__(self, job: str, controller: Callable[[], Any]) -> None:
        self.job, self.controller = job, controller

    def describe(self) -> list:  # no eager collect() at registration (the controller may not exist yet)
        return []

    def collect(self) -> Iterator:
        ctl = self.controller()
        if ctl is None:
            return
        for name, attr, doc in (("fleetloop_llm_admitted", "admitted_total", "Rollout tickets granted."),
                                ("fleetloop_llm_blocked", "blocked_total", "Rollouts asked for and not granted "
                                 "(over the staleness capacity or max_in_flight)."),
                                ("fleetloop_llm_expired_tickets", "expired_total", "Tickets whose group did not arrive "
                                 "within ticket_ttl_s."),
                                ("fleetloop_llm_completed_tickets", "completed_total", "Tickets whose group arrived.")):
            fam = CounterMetricFamily(name, doc, labels=["job"])
            fam.add_metric([self.job], float(getattr(ctl, attr, 0)))
            yield fam
        fam = GaugeMetricFamily("fleetloop_llm_inflight_rollouts", "Admitted rollouts whose group has not arrived yet.",
                                labels=["job"])
        fam.add_metric([self.job], float(ctl.in_flight))
        yield fam


class LlmMetrics:
    """The LLM learner's own series (see the module docstring for definitions)."""

    def __init__(self, job: str, registry: CollectorRegistry, controller: Callable[[], Any]) -> None:
        r, j = registry, ["job"]
        self.job = job
        registry.register(_AdmissionCollector(job, controller))
        self.staleness = Histogram("fleetloop_llm_staleness", "Versions between the policy that generated a group and the "
                                   "learner version that trained it (one observation per trained group).", j,
                                   buckets=STALENESS_BUCKETS, registry=r)
        self.dropped_stale = Counter("fleetloop_llm_dropped_stale_total", "Groups dropped at train time because their "
                                     "staleness exceeded eta (never trained).", j, registry=r)
        self.groups = Counter("fleetloop_llm_groups_received_total", "Groups stored (duplicates excluded), by task.",
                              j + ["task"], registry=r)
        self.completions = Counter("fleetloop_llm_completions_received_total", "Completions stored.", j, registry=r)
        self.completion_tokens = Counter("fleetloop_llm_completion_tokens_total", "Generated tokens stored.", j, registry=r)
        self.rejected = Counter("fleetloop_llm_rejected_groups_total", "Groups refused at ingest, by field (indices "
                                "removed, e.g. group.completions.logprobs).", j + ["reason"], registry=r)
        self.unknown_tickets = Counter("fleetloop_llm_unknown_tickets_total", "Groups whose ticket the learner did not "
                                       "know (expired, never issued, or none): stored, staleness still enforced.", j,
                                       registry=r)
        self.verifier_errors = Counter("fleetloop_llm_verifier_errors_total", "Completions whose verifier raised on the "
                                       "actor (scored as failed).", j, registry=r)
        self.queue = Gauge("fleetloop_llm_queued_groups", "Groups stored and waiting for a learner step.", j, registry=r)
        self.reward_mean = Gauge("fleetloop_llm_reward_mean", "Mean reward of the groups trained by the newest step.", j,
                                 registry=r)
        self.accuracy = Gauge("fleetloop_llm_accuracy", "Share of completions with reward >= 1 in the newest step.", j,
                              registry=r)
        self.steps = Counter("fleetloop_llm_learner_steps_total", "GRPO steps taken (one version published each).", j,
                             registry=r)
        self.step_seconds = Histogram("fleetloop_llm_step_seconds", "Time of one learner step (batch build, update, "
                                      "publish).", j, buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120), registry=r)
        self.idle_seconds = Counter("fleetloop_llm_learner_idle_seconds_total", "Time the training thread waited for "
                                    "groups.", j, registry=r)
        self.busy_seconds = Counter("fleetloop_llm_learner_busy_seconds_total", "Time the training thread spent in steps.",
                                    j, registry=r)
        self.update_failures = Counter("fleetloop_llm_update_failures_total", "GRPO updates that raised (a bug: the step "
                                       "published unchanged weights to keep the admission schedule).", j, registry=r)
        self.loss = Gauge("fleetloop_llm_loss", "GRPO loss of the newest step.", j, registry=r)
        self.eta = Gauge("fleetloop_llm_max_staleness", "Configured eta (versions).", j, registry=r)
