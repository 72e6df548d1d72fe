"""The LLM actor runtime: a rollout server that drives a vLLM engine for one learner's GRPO job.

    actor = LlmActor(LlmActorOptions(learner="learner:50051", job_id="llm", actor_id="llm-0", credential=token))
    actor.connect()            # handshake (kind LLM, protocol 2), base model, engine, fleet weights
    stats = actor.run(deadline=time.monotonic() + 600)
    actor.close()

Loop (one turn): supervise the engine (a dead one is restarted with ``ensure_running``, counted) ->
apply the newest verified weights, if any -> ``Admit(rollouts_per_admit)`` (none granted: wait
``retry_after_ms``, counted as admission wait) -> bring the engine to the admitted version (wait up
to ``weight_wait_s`` for its weights; with a pinned fleet, to the pinned one) -> for each ticket
sample a prompt, apply the chat template, generate G completions in one ``generate`` call for all
tickets (an engine that dies mid-call is restarted and the tickets reused once; one whose call
never returns is abandoned and replaced), score each with :func:`fleetloop.llm_tasks.safe_score`
(a verifier that raises scores the task's failure score, is logged and flagged ``verifier_error``;
it never stops the actor) -> one EpisodeChunk per group (``group`` set, ``episode_id`` unique per group, seq 0, end SUCCESS) into the
spool; the existing :class:`~fleetloop.client.sender.Sender` ships it (acknowledged data is never lost;
unacknowledged groups survive a restart on the same spool folder). A group larger than the
learner's ``max_message_bytes`` (a group cannot be split) is never spooled: one
``event=group_oversized`` line, ``fleetloop_llm_actor_set_aside_groups_total{reason="oversized"}``;
the sender sets aside (never retries) a spooled group over the limit or refused for size, counted
there too (:mod:`fleetloop.client.limits`).

Weights: :class:`~fleetloop.client.weight_client.WeightClient` subscribes, fetches and verifies every announced
version (digest first); updates are applied between ``generate`` calls only, so every completion is
tagged with the version its ``generate`` started on (the engine's policy). An update that fails or
times out (``weight_timeout_s``) is counted (``fleetloop_llm_weight_update_failures_total{reason}``),
logged, and retried on the next turn unless a newer version arrived meanwhile; the actor never
hangs on it. A turn that fails for a transient reason (learner unavailable, an engine restart that
failed) is logged and retried with backoff; a refusal no retry can fix (bad credential, unknown job,
a robot job) ends :meth:`LlmActor.run` with that error. Structured logs carry job, actor and version.

Parts: the learner connection (channel, sender, handshake retry, weight follower) is
:class:`fleetloop.client.connection.LearnerConnection`, shared with the robot runtime; the engine's supervision
(restart, stuck-call replacement) is :mod:`actor.llm.supervisor`; prompt sampling and group chunks are
:mod:`actor.llm.rollout`. This module runs the loop.

This package never imports the learner: the model recipe comes from ``RunConfig.llm`` (``llm_json``), the
tasks from :mod:`fleetloop.llm_tasks`, models from :mod:`fleetloop.llm_models`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import grpc
import numpy as np

from fleetloop.client.connection import ConnectionParts, LearnerConnection
from fleetloop.client.limits import announced_limit, over_limit, report_oversized
from actor.llm.metrics import LlmActorMetrics, LlmActorStats  # noqa: F401 - re-exported
from actor.llm.options import LlmActorOptions, default_engine_factory, resolve_model_dir  # noqa: F401 - re-exported
from actor.llm.rollout import Rollouts
from actor.llm.supervisor import EngineSupervisor
from fleetloop.client.spool import Spool
from fleetloop.client.weight_client import VerifiedWeights, WeightClient
from fleetloop import wire_settings
from fleetloop.codec import PROTOCOL_VERSION
from fleetloop.errors import FailedPrecondition, FleetloopError, ResourceExhausted, Unavailable
from fleetloop.logs import event, get_logger
from fleetloop.v1 import fleetloop_pb2 as pb

log = get_logger("actor.llm")


class _AnnouncedWeightClient(WeightClient):
    """A WeightClient that also remembers the newest announcement (to know whether the fleet is pinned)."""

    announced: pb.WeightAnnouncement | None = None

    def _handle(self, ann: pb.WeightAnnouncement) -> None:
        self.announced = ann
        super()._handle(ann)


class LlmActor(ConnectionParts):
    """One LLM rollout server; see the module docstring. One control loop (``run``) per instance."""

    def __init__(self, opts: LlmActorOptions, engine_factory: Callable[..., Any] = default_engine_factory,
                 metrics: LlmActorMetrics | None = None) -> None:
        self.opts = opts
        self.job, self.actor_id = opts.job_id, opts.actor_id
        self.metrics = metrics or LlmActorMetrics(opts.actor_id)
        self.engine_factory = engine_factory
        self.connection = LearnerConnection(
            opts.learner, opts.job_id, opts.actor_id, spool=Spool(opts.spool_dir or f"/tmp/fleetloop-spool-{opts.actor_id}"),
            credential=opts.credential, tls_ca_file=opts.tls_ca_file, tls_cert_file=opts.tls_cert_file,
            tls_key_file=opts.tls_key_file, on_ack=lambda ack: self._on_ack(ack),
            on_reject=lambda entry, label, reason: self._on_reject(entry, label, reason))
        self.settings: dict[str, Any] = {}
        self.tasks: dict[str, Any] = {}
        self.tokenizer = None
        self.learner_version = -1
        self.stats = LlmActorStats()
        self.rng = np.random.default_rng(opts.seed)
        self.supervisor = EngineSupervisor(engine_factory, opts, self.stats, self.metrics, on_replaced=self._refetch)
        self.rollouts: Rollouts | None = None  # made at connect (needs the job's tasks and the tokenizer)
        self._retry: VerifiedWeights | None = None  # an update that failed, retried next turn
        self._started = False

    # -- the supervisor's parts, as the actor's attributes (the connection's: ConnectionParts) --
    @property
    def engine(self):
        """The engine (None before :meth:`connect`)."""
        return self.supervisor.engine

    @property
    def model_dir(self) -> Path | None:
        return self.supervisor.model_dir

    # -- connection --------------------------------------------------------------------------
    def handshake(self) -> pb.HandshakeResponse:
        """Handshake as kind LLM (protocol 2), retrying while the learner is unavailable."""
        req = pb.HandshakeRequest(protocol_version=PROTOCOL_VERSION, job_id=self.job, actor_id=self.actor_id, kind=pb.LLM,
                                  tasks=self.opts.tasks, capabilities={"engine": "vllm", "mode": self.opts.engine})
        return self.connection.handshake(req, self.opts.connect_timeout_s, self._handshake_retry, self._unreachable)

    def _handshake_retry(self, delay: float, err: grpc.RpcError) -> None:
        event(log, "learner_unreachable", level=30, job=self.job, actor=self.actor_id, retry_in=delay)

    def _unreachable(self, err: grpc.RpcError) -> Unavailable:
        return Unavailable(f"learner {self.opts.learner} unreachable: {err.details()}", field="learner",
                           value=self.opts.learner)

    def connect(self) -> dict[str, Any]:
        """Handshake, build the base model locally, start the engine, load the fleet version, start the
        sender and the weight follower. Returns the job's rollout settings. Idempotent."""
        if self._started:
            return self.settings
        from fleetloop.llm_models import load_tokenizer
        from fleetloop.llm_tasks import make_task
        resp = self.handshake()
        settings = wire_settings.rollout_settings(resp.run_config)  # typed `llm`, else `llm_json`
        if settings is None:
            raise FailedPrecondition("the learner sent no llm_json: not an LLM job", field="llm_json", value="")
        self.settings = settings
        specs = [t for t in self.settings["tasks"] if not self.opts.tasks or t["id"] in self.opts.tasks]
        self.tasks = {t["id"]: (make_task(t["name"], t.get("params") or {}), float(t.get("weight", 1.0))) for t in specs}
        model_dir = resolve_model_dir(self.settings, self.opts.model_cache_dir, self.opts.model_dir)
        self.tokenizer = load_tokenizer(model_dir)
        self.settings["max_model_len"] = self._max_model_len(model_dir)
        self.rollouts = Rollouts(self.job, self.actor_id, self.tasks, self.tokenizer, self.settings, self.rng, self.stats,
                                 self.metrics)
        self.supervisor.start(model_dir, self.settings)
        weights = self.connection.follow_weights(_AnnouncedWeightClient, zero_copy=False)
        if resp.HasField("current_policy") and resp.current_policy.size_bytes:
            weights.announced = resp.current_policy
            weights.job_state = wire_settings.job_state(resp.current_policy)
            self._apply(weights.fetch_now(resp.current_policy))
        self.connection.start(announced_limit(resp.run_config))  # within the learner's limit (None: unknown)
        self._started = True
        event(log, "connected", job=self.job, actor=self.actor_id, version=self.version, tasks=",".join(self.tasks),
              group_size=self.settings["group_size"], spooled=len(self.spool))
        return self.settings

    def _max_model_len(self, model_dir: Path) -> int:
        want = int(self.settings.get("max_prompt_tokens", 512)) + int(self.settings["max_new_tokens"])
        try:
            limit = int(json.loads((model_dir / "config.json").read_text()).get("max_position_embeddings") or want)
        except (OSError, ValueError):
            limit = want
        return min(want, limit)

    def _on_ack(self, ack: pb.Ack) -> None:
        self.learner_version = int(ack.learner_version)

    def _on_reject(self, entry, label: str, reason: str) -> None:
        """A spooled group the sender set aside (oversized, or refused for good): counted."""
        self.metrics.set_aside.labels(self.actor_id, label).inc()

    @property
    def version(self) -> int:
        """Version the engine runs (-1 before the first load)."""
        return self.supervisor.version

    @property
    def job_stopping(self) -> bool:
        return self.connection.job_stopping

    # -- weights -----------------------------------------------------------------------------
    def _apply(self, weights: VerifiedWeights) -> bool:
        """Load ``weights`` into the engine (timeout -> counted, kept for a retry next turn). True on success."""
        try:
            self.supervise()  # a dead engine takes no weights: restart it (on its last good ones) first
            seconds = self.engine.update_weights(weights.state_dict, weights.version, self.opts.weight_timeout_s)
        except Exception as exc:  # noqa: BLE001 - a failed update must never end the rollout loop
            reason = "timeout" if "timeout" in type(exc).__name__.lower() else type(exc).__name__
            self.stats.weight_update_failures += 1
            self.metrics.weight_update_failures.labels(self.actor_id, reason).inc()
            event(log, "weight_update_failed", level=40, job=self.job, actor=self.actor_id, version=self.version,
                  target=weights.version, reason=reason, error=str(exc)[:300])
            self._retry = weights
            return False
        self._retry = None
        self.stats.weight_updates += 1
        self.metrics.weight_update_seconds.labels(self.actor_id).observe(float(seconds or 0.0))
        self.metrics.version.labels(self.actor_id).set(weights.version)
        if self.weights is not None:
            self.weights.current_version = weights.version
        event(log, "weights_loaded", job=self.job, actor=self.actor_id, version=weights.version, seconds=seconds,
              delay_s=time.time() - weights.announced_at if weights.announced_at else None)
        return True

    def apply_pending(self) -> bool:
        """Load the newest verified version not yet in the engine (or retry a failed one). True if one loaded."""
        new = self.weights.pending() if self.weights is not None else None
        candidate = new if new is not None else self._retry
        if candidate is None or candidate.version == self.version:
            return False
        return self._apply(candidate)

    def _catch_up(self, learner_version: int) -> None:
        """Wait (up to weight_wait_s) until the engine runs ``learner_version`` (or the pinned fleet version)."""
        ann = self.weights.announced if self.weights is not None else None
        target = int(ann.version) if ann is not None and ann.pinned else learner_version
        deadline = time.monotonic() + self.opts.weight_wait_s
        while self.version < target and time.monotonic() < deadline:
            if not self.apply_pending():
                time.sleep(0.02)
        if self.version < target:
            event(log, "weights_behind", level=30, job=self.job, actor=self.actor_id, version=self.version, target=target)

    def supervise(self) -> None:
        """Restart a dead engine (it reloads its last good weights); replace a stuck one."""
        self.supervisor.supervise()

    def _refetch(self) -> None:
        """A replacement engine started: load the newest announced weights into it."""
        ann = self.weights.announced if self.weights is not None else None
        if ann is not None and ann.size_bytes:
            try:
                self._apply(self.weights.fetch_now(ann))
            except Exception as exc:  # noqa: BLE001 - the next announcement brings weights again
                event(log, "refetch_failed", level=40, job=self.job, actor=self.actor_id, version=self.version,
                      error=str(exc)[:300])

    # -- admission ---------------------------------------------------------------------------
    def admit(self, n: int) -> pb.AdmitResponse | None:
        """Ask for ``n`` tickets; None when the learner is unreachable right now (caller retries)."""
        req = pb.AdmitRequest(job_id=self.job, actor_id=self.actor_id, rollouts=n, current_version=max(self.version, 0))
        self.stats.admit_calls += 1
        try:
            resp = self.connection.unary("Admit", req)
        except grpc.RpcError as err:  # unreachable right now (a refusal raised a FleetloopError)
            event(log, "admit_unavailable", level=30, job=self.job, actor=self.actor_id, error=str(err.code()))
            return None
        self.learner_version = max(self.learner_version, int(resp.learner_version))
        return resp

    # -- rollouts ----------------------------------------------------------------------------
    def rollout(self, resp: pb.AdmitResponse) -> int:
        """Generate one group per ticket of ``resp`` and spool them; returns groups spooled."""
        jobs = []
        for ticket in resp.ticket_ids:
            for _ in range(5):
                sampled = self.rollouts.sample_prompt()
                if sampled is not None:
                    jobs.append((ticket, *sampled))
                    break
        if not jobs:
            return 0
        s = self.settings
        t0 = time.monotonic()
        outs = None
        for attempt in range(2):  # an engine that dies mid-generate is restarted and the tickets reused once
            try:
                self.supervise()
                outs = self.supervisor.generate([j[4] for j in jobs], n=int(s["group_size"]), max_new_tokens=int(s["max_new_tokens"]),
                                      temperature=float(s["temperature"]), top_p=float(s["top_p"]),
                                      seed=int(self.rng.integers(2**31 - 1)))
                break
            except Exception as exc:  # noqa: BLE001 - the actor outlives its engine
                event(log, "generate_failed", level=40, job=self.job, actor=self.actor_id, version=self.version,
                      attempt=attempt, error=f"{type(exc).__name__}: {exc}"[:300])
        dt = time.monotonic() - t0
        if outs is None:  # the tickets expire on the learner (ticket_ttl_s) and free their capacity
            return 0
        self.stats.generate_s += dt
        self.metrics.generate_seconds.labels(self.actor_id).inc(dt)
        spooled, rewards = 0, []
        for (ticket, task_id, task, prompt, prompt_ids), samples in zip(jobs, outs):
            chunk = self.rollouts.group_chunk(ticket, int(resp.learner_version), task_id, task, prompt, prompt_ids, samples)
            if chunk is None:
                continue
            raw = chunk.SerializeToString()
            limit = self.sender.max_message_bytes
            if over_limit(len(raw), limit):  # never spooled: the learner could only refuse it
                self.stats.oversized_groups += 1
                self.metrics.set_aside.labels(self.actor_id, "oversized").inc()
                report_oversized("group", job=self.job, actor=self.actor_id, episode=chunk.episode_id, seq=chunk.seq,
                                 size=len(raw), limit=limit, action="dropped",
                                 version=chunk.behavior_version, task=task_id, completions=len(chunk.group.completions))
                continue
            self.spool.put(chunk.episode_id, 0, raw)
            spooled += 1
            rewards += [c.reward for c in chunk.group.completions]
            self.metrics.groups.labels(self.actor_id, task_id).inc()
        if rewards:
            self.metrics.reward.labels(self.actor_id).set(float(np.mean(rewards)))
        self.metrics.spool.labels(self.actor_id).set(len(self.spool))
        return spooled

    # -- loop --------------------------------------------------------------------------------
    def step(self) -> int:
        """One turn of the loop (see the module docstring); returns groups spooled."""
        self.supervise()
        self.apply_pending()
        resp = self.admit(self.opts.rollouts_per_admit)
        if resp is None:
            self._wait(1.0)
            return 0
        if not resp.ticket_ids:
            self.stats.blocked += 1
            self.metrics.blocked.labels(self.actor_id).inc()
            self._wait(max(resp.retry_after_ms, 20) / 1000.0)
            return 0
        self.stats.tickets += len(resp.ticket_ids)
        if resp.learner_version > self.version:
            self._catch_up(int(resp.learner_version))
        return self.rollout(resp)

    def _wait(self, seconds: float) -> None:
        """Idle time waiting for admission; new weights are applied meanwhile."""
        t0 = time.monotonic()
        end = t0 + seconds
        while time.monotonic() < end:
            if not self.apply_pending():
                time.sleep(min(0.02, max(0.0, end - time.monotonic())))
        dt = time.monotonic() - t0
        self.stats.wait_s += dt
        self.metrics.wait_seconds.labels(self.actor_id).inc(dt)

    def run(self, should_stop: Callable[[], bool] = lambda: False, deadline: float | None = None,
            max_groups: int | None = None) -> LlmActorStats:
        """Loop until ``should_stop()``, the monotonic ``deadline``, ``max_groups`` groups, or the job stopping."""
        self.connect()
        backoff = 1.0
        while not should_stop() and not self.job_stopping:
            if deadline is not None and time.monotonic() >= deadline:
                break
            if max_groups is not None and self.stats.groups >= max_groups:
                break
            try:
                self.step()
                backoff = 1.0
            except (FleetloopError, grpc.RpcError) as exc:  # a refusal that no retry can fix ends the actor
                if not isinstance(exc, (Unavailable, ResourceExhausted)) and not isinstance(exc, grpc.RpcError):
                    raise
                self._step_failed(exc, backoff)
                backoff = min(30.0, backoff * 2)
            except Exception as exc:  # noqa: BLE001 - e.g. an engine restart that failed: retried after a pause
                self._step_failed(exc, backoff)
                backoff = min(30.0, backoff * 2)
        return self.stats

    def _step_failed(self, exc: BaseException, backoff: float) -> None:
        event(log, "step_failed", level=40, job=self.job, actor=self.actor_id, version=self.version, retry_in=backoff,
              error=f"{type(exc).__name__}: {exc}"[:300])
        time.sleep(backoff)

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every spooled group is acknowledged; False on timeout."""
        return self.connection.flush(timeout)

    def close(self, flush_timeout: float = 10.0) -> None:
        """Flush (bounded), stop the sender and the weight follower, close the channel, close the engine.
        Unacknowledged groups stay in the spool folder (:meth:`~fleetloop.client.connection.LearnerConnection.close`)."""
        self.connection.close(flush_timeout, flush=self._started)
        self.supervisor.close()

