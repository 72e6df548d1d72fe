"""LlmLearnerCore: one GRPO job's learner, independent of gRPC and Ray (both wrap it).

Owns the base Hugging Face causal LM (on ``device``), the GRPO algorithm, the weight store, the
admission controller and a FIFO queue of validated groups (:mod:`learner.llm.queue`). It implements
:class:`learner.api.LearnerCore` (``kind = "llm"``; versions, operator controls and the training
thread are the shared :class:`learner.lifecycle.CoreLifecycle`), plus :meth:`rollout_settings`.
Of the :class:`learner.api.LearnerHooks` (``core.hooks``), ``on_ingest`` and ``wrap_training`` apply.

Versions: version 0 is the base model, published at start; then one version per learner step
(version v = the weights after v steps of this job's history; each version records its
``learner_step``). A restart on a state dir with published weights continues from the newest
version's weights, its learner step and the optimizer state (see Durability).

Training thread (:meth:`train_step`): wait until ``batch_groups`` groups that arrived under a live
admission ticket are queued, take exactly that many (FIFO: the admission rule counts on it) plus up
to as many *untracked* groups (ticket expired or unknown: the proto lets them be stored) riding
along, so an untracked group never pushes a ticketed one to a later step (``batch_groups``
untracked groups alone also make a step, for clients that skip Admit). Then drop every group whose staleness (learner version now
minus the oldest ``policy_version`` of its completions) exceeds ``eta`` (counted in
``fleetloop_llm_dropped_stale_total``; the whole group goes, its advantages are normalised within
it), build a :class:`~learner.llm.grpo.TokenBatch` of the rest, ``GRPO.update``, publish. Every
step that trains publishes a version, even when GRPO skipped the update (all groups zero-variance):
admission capacity grows with the version, so versions must advance with the consumed groups (a
step whose groups were all dropped trains nothing and still publishes, for the same reason; with
eta = 0 the fleet would otherwise deadlock; likewise a GRPO update that raises is logged, counted in
``fleetloop_llm_update_failures_total`` and the step still publishes). Each step records mean reward,
accuracy, staleness and loss per version in ``status()["history"]`` (:mod:`learner.llm.history`).

Durability (:mod:`learner.llm.durability` has the contract; files under ``STATE_DIR/llm``): acknowledged
groups are never lost and are stored exactly once, also across crashes. A group's chunk is appended
(fsynced) to the group log before it is stored and acknowledged. Each step marks the records it took
(trained or dropped), writes the consumed marker atomically as *pending* for its learner step,
publishes, then commits: a crash never retrains groups of a published step and never loses groups of
an unpublished one (they are trained again). On start the ledger is rebuilt (a resend of any
acknowledged group is a duplicate) and every acknowledged, unconsumed group is re-queued, untracked
(its ticket died with the old process), in log order; re-queued groups obey the same staleness rule (more
than ``eta`` versions stale when a step takes it: dropped and counted, never trained). Fully consumed
log segments are compacted after each commit (keys to ``ledger.log``, ~50 bytes per group), so the log
holds the records from the oldest unconsumed group on plus at most one segment.

Optimizer: the AdamW state (2x the trainable parameters in float32: ~1.1 GB for SmolLM2-135M, ~MBs for
the tiny model) and the optimizer step counter are checkpointed to ``STATE_DIR/llm/optimizer``
(:mod:`learner.llm.optimizer_state`): after a step once ``optimizer_ckpt.every_s`` seconds
passed since the last save (``LlmLearnerConfig.optimizer_checkpoint_every_s``, default 300 s), as a CPU
snapshot written in the background (the training thread pays the copy, 1-2 s per GB here; the write, ~100
MiB/s here, runs beside it), and synchronously on :meth:`LlmLearnerCore.checkpoint` and a clean
:meth:`LlmLearnerCore.stop`. Per version would be exact but costs SmolLM2 a 1.1 GB write per ~40 s step.
A restart restores the newest intact one onto the newest weights; after a crash it may be a few steps
older than the weights (``status()["durability"]["optimizer"]["behind_steps"]``), still far closer than
fresh moments. A missing, torn or mismatched checkpoint logs ``optimizer_fresh`` and training goes on
with a fresh optimizer.

Thread-safety: gRPC threads ingest and admit while one thread trains; the queue has its own
condition, GRPO updates, publishes and optimizer checkpoints hold ``_train_lock`` (re-entrant).
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fleetloop import wire_settings
from fleetloop.errors import FailedPrecondition, InvalidArgument
from fleetloop.logs import event, get_logger
from fleetloop.v1 import fleetloop_pb2 as pb
from fleetloop.weights import load_verified, state_dict_to_blob
from learner.algorithms import make_algorithm
from learner.api import AdmitGrant, JobState, LlmStatus
from learner.backpressure import FlowControl
from learner.core import pick_device
from learner.lifecycle import CoreLifecycle, LifecycleTraits
from learner.llm.config import LlmLearnerConfig
from learner.llm.durability import GroupJournal, recover_groups
from learner.llm.history import CORRECT_REWARD, TrainingHistory
from learner.llm.ingest import GroupIngestor, ValidatedGroup
from learner.llm.metrics import LlmMetrics
from learner.llm.optimizer_state import OptimizerCheckpointer, restore_optimizer
from learner.llm.queue import GroupQueue
from learner.metrics import LearnerMetrics
from learner.weight_store import WeightStore

__all__ = ["CORRECT_REWARD", "LlmLearnerCore", "resolve_model"]

log = get_logger("learner.llm")
STEP_WAIT_S = 0.5  # the training loop's step waits this long for a batch of groups


def _chunk_key(payload: bytes) -> tuple[str, int]:
    """(episode_id, seq) of a logged EpisodeChunk."""
    chunk = pb.EpisodeChunk.FromString(payload)
    return chunk.episode_id, int(chunk.seq)


def resolve_model(model: str, seed: int, cache_dir: Path) -> Path:
    """The HF folder of ``model`` (:func:`fleetloop.llm_models.resolve_model`; imported here lazily so
    this module loads without transformers)."""
    from fleetloop import llm_models
    return llm_models.resolve_model(model, seed, cache_dir)


def _via(owner: str, name: str, doc: str) -> property:
    """A read-only attribute of the core that lives on one of its parts."""
    return property(lambda self: getattr(getattr(self, owner), name), doc=doc)


class LlmLearnerCore(CoreLifecycle):
    """See module docstring."""

    kind = "llm"
    traits = LifecycleTraits(log=log, thread_name="fleetloop-llm-train", join_timeout_s=60.0,
                             publish_log_interval_s=None, step_traceback=True)

    # parts' state, read as the core's own (status, tests, harnesses)
    groups_total = _via("groups", "total", "Groups received (not re-queued ones).")
    groups_requeued = _via("groups", "requeued", "Groups re-queued from the group log at start.")
    groups_by_version = _via("groups", "by_version", "Oldest policy_version of a received group -> groups.")
    history = _via("training", "records", "The newest step records (learner.llm.history).")
    trained_groups = _via("training", "trained_groups", "Groups trained on.")
    staleness_max = _via("training", "staleness_max", "Largest staleness of a trained group.")
    last_loss = _via("training", "last_loss", "The newest update's loss.")
    last_stats = _via("training", "last_stats", "The newest update's GRPO stats.")
    idle_s = _via("training", "idle_s", "Seconds the training thread waited for groups.")
    busy_s = _via("training", "busy_s", "Seconds in learner steps.")
    idle_share = _via("training", "idle_share", "Learner idle share: waiting / (waiting + training).")
    _cond = _via("groups", "cond", "The queue's condition.")
    _queue = _via("groups", "ticketed", "Queued groups that arrived under a live ticket, FIFO.")
    _extra = _via("groups", "untracked", "Queued groups without one (expired, unknown, no ticket, re-queued).")

    def __init__(self, config: LlmLearnerConfig) -> None:
        from fleetloop.llm_models import load_causal_lm, load_tokenizer, publishable_state_dict
        from fleetloop.llm_tasks import make_task
        from learner.llm.admission import AdmissionConfig, AdmissionController
        import learner.llm.grpo  # noqa: F401  (registers "grpo" if learner.algorithms does not import it)

        self.cfg = config
        self.job = config.job_id
        self.device = pick_device(config.device)
        torch.manual_seed(config.seed)
        self.rng = np.random.default_rng(config.seed)
        self.tasks = {spec.task_id: make_task(spec.name, dict(spec.params)) for spec in config.tasks}
        state_dir = Path(config.state_dir)
        state_dir.mkdir(parents=True, exist_ok=True)
        cache = Path(config.model_cache_dir) if config.model_cache_dir else state_dir / "models"
        self.model_dir = resolve_model(config.model, config.model_seed, cache)
        self.tokenizer = load_tokenizer(self.model_dir)
        model = load_causal_lm(self.model_dir, device=str(self.device))
        self.vocab_size = int(model.get_input_embeddings().num_embeddings)
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else (self.tokenizer.eos_token_id or 0))
        # tied duplicates (lm_head.weight = embed_tokens) are not published: actors' engines re-tie them
        self._publish_names = frozenset(publishable_state_dict(model))
        self.algorithm = make_algorithm(config.algorithm, model, config.grpo_params(), self.device)
        self.metrics = LearnerMetrics(self.job)
        self.admission = AdmissionController(AdmissionConfig(eta=config.eta, batch_groups=config.batch_groups,
                                                             ticket_ttl_s=config.ticket_ttl_s,
                                                             max_in_flight=config.max_in_flight))
        self.llm_metrics = LlmMetrics(self.job, self.metrics.registry, lambda: self.admission)
        self.llm_metrics.eta.labels(self.job).set(config.eta)
        self.metrics.staleness_bound.labels(self.job).set(config.eta)
        # no rate limits or memory budget for groups (admission bounds them); the servicer reserves through it
        self.flow = FlowControl(None, 1.0, 1.0, None, config.flow.max_backoff_ms, None)
        self.groups = GroupQueue()
        self.journal = GroupJournal(state_dir / "llm", _chunk_key)
        self.ingestor = GroupIngestor(
            {"job_id": self.job, "task_ids": frozenset(self.tasks), "group_size": config.group_size,
             "vocab_size": self.vocab_size, "max_new_tokens": config.max_new_tokens,
             "max_prompt_tokens": config.max_prompt_tokens}, self._on_group, self.llm_metrics, journal=self.journal)
        self.weights = WeightStore(state_dir / "weights", keep_in_memory=config.serving.keep_versions,
                                   keep_on_disk=config.serving.keep_versions_on_disk)
        self.step = 0
        self.training = TrainingHistory(self.job, self.metrics, self.llm_metrics, config.history_size)
        self.actor_versions: dict[str, tuple[int, float]] = {}  # actor -> (engine version at its last Admit, time)
        self.dropped_stale = 0
        self._init_lifecycle(None)
        self._stopped = False
        self.llm_metrics.queue.labels(self.job).set_function(lambda: len(self.groups))
        self.optimizer_dir = state_dir / "llm" / "optimizer"
        self._start_versions()
        self._restore_durable_state()

    # -- versions ----------------------------------------------------------------------------
    def _start_versions(self) -> None:
        latest = self.weights.latest
        if latest is None:
            self.publish()  # version 0: the base model
            return
        state = load_verified(self.weights.blob(latest.version), latest.sha256)
        missing, unexpected = self.algorithm.policy.load_state_dict({k: v.to(self.device) for k, v in state.items()},
                                                                    strict=False)
        if unexpected or set(missing) & self._publish_names:
            raise FailedPrecondition(f"weights v{latest.version} in {self.weights.root} do not fit model {self.cfg.model!r} "
                                     f"(missing {sorted(set(missing) & self._publish_names)[:5]}, unexpected "
                                     f"{sorted(unexpected)[:5]})", field="state_dir", value=str(self.cfg.state_dir))
        self.step = int(latest.learner_step)
        self.metrics.version.labels(self.job).set(latest.version)
        self._sync_fleet_metric()
        event(log, "resumed", job=self.job, version=latest.version, step=self.step)

    def _restore_durable_state(self) -> None:
        """Optimizer state, then the group log: ledger rebuilt, unconsumed groups re-queued (see Durability)."""
        self.optimizer_restore = restore_optimizer(self.optimizer_dir, self.algorithm, self.step)
        every_s = float(self.cfg.optimizer_checkpoint_every_s)
        self.optimizer_ckpt = OptimizerCheckpointer(self.optimizer_dir, self.algorithm, every_s)
        marker = self.journal.load_marker(self.step)
        rec = recover_groups(self.journal, self.ingestor, self.version, self.groups.requeue)
        self.recovery = {"marker": marker, **asdict(rec)}
        if rec.records or rec.ledger_keys or self.optimizer_restore["restored"]:
            event(log, "durable_state_restored", job=self.job, version=self.version, step=self.step, marker=marker,
                  requeued=rec.requeued, consumed=rec.consumed, skipped=rec.skipped, ledger_keys=rec.ledger_keys,
                  optimizer=self.optimizer_restore["restored"], optimizer_behind=self.optimizer_restore["behind_steps"])

    def _publish_blob(self) -> bytes:
        return state_dict_to_blob({k: v for k, v in self.algorithm.policy_state_dict().items() if k in self._publish_names})

    # -- serving (what the servicer asks a core) ----------------------------------------------
    def check_handshake(self, req: pb.HandshakeRequest) -> None:
        """LLM rollouts need protocol 2 (FailedPrecondition naming ``protocol_version``)."""
        if req.protocol_version < 2:
            raise FailedPrecondition(f"protocol_version {req.protocol_version} has no LLM rollouts; LLM jobs need 2",
                                     field="protocol_version", value=req.protocol_version)

    def job_tasks(self) -> list[str]:
        return self.cfg.task_ids

    def run_config(self) -> pb.RunConfig:
        """One group = one chunk = one whole "episode"; the rollout settings travel in ``llm`` (and ``llm_json``)."""
        return wire_settings.run_config(task_ids=self.cfg.task_ids, chunk_steps=1, max_episode_steps=1,
                                        max_message_bytes=self.cfg.serving.max_message_bytes, algorithm=self.cfg.algorithm,
                                        inference={}, llm=self.rollout_settings())

    def rollout_settings(self) -> dict[str, Any]:
        """RunConfig.llm_json for actors (plus the tokenizer's vocabulary size, a consistency check)."""
        return {**self.cfg.rollout_settings(), "vocab_size": self.vocab_size}

    def check_chunk(self, chunk: pb.EpisodeChunk) -> None:
        """Nothing beyond the ingestor's validation."""

    def check_admit(self) -> None:
        """Admit serves LLM jobs."""

    def admit(self, actor_id: str, n: int, current_version: int) -> AdmitGrant:
        """Grant up to ``n`` admission tickets to ``actor_id`` (its engine runs ``current_version``);
        none while the job is stopping."""
        if n < 1:
            raise InvalidArgument(f"rollouts {n} must be >= 1", field="rollouts", value=n)
        self.admission.expire()
        version = max(self.version, 0)
        tickets = [] if self.job_state == JobState.STOPPING else self.admission.admit(actor_id, n, version)
        self.actor_versions[actor_id] = (int(current_version), time.time())
        retry = 0 if tickets else int(self.admission.retry_after_ms())
        if not tickets:
            retry = max(retry, 100)
        return AdmitGrant(ticket_ids=[t.id for t in tickets], learner_version=version, retry_after_ms=retry,
                          ticket_ttl_s=self.cfg.ticket_ttl_s, max_staleness=self.cfg.eta)

    def _on_group(self, vg: ValidatedGroup) -> None:
        """Called by the ingestor (under its lock) for each new group."""
        tracked = bool(vg.ticket_id) and self.admission.complete(vg.ticket_id, vg.actor_id) is not None
        if not tracked:
            self.llm_metrics.unknown_tickets.labels(self.job).inc()
        m = self.llm_metrics
        m.groups.labels(self.job, vg.task_id).inc()
        m.completions.labels(self.job).inc(len(vg.group["completions"]))
        m.completion_tokens.labels(self.job).inc(vg.tokens)
        if vg.verifier_errors:
            m.verifier_errors.labels(self.job).inc(vg.verifier_errors)
        self.actor_versions.setdefault(vg.actor_id, (vg.max_version, time.time()))
        self.groups.put(vg, tracked)

    def queued_episode_ids(self) -> list[str]:
        """Episode ids of the queued groups, in the order steps take them (ticketed first, then untracked)."""
        return self.groups.episode_ids()

    def backoff_ms(self, actor: str = "") -> int:
        """Ack backpressure hint (admission already bounds what actors produce: 0 unless flow control says so)."""
        ms, _ = self.flow.backoff(actor)
        return ms

    # -- training ----------------------------------------------------------------------------
    def train_step(self, timeout: float = STEP_WAIT_S) -> dict[str, Any] | None:
        """One learner step if ``batch_groups`` groups are queued within ``timeout`` s; see the module docstring.
        Returns the step's record (also appended to the history), or None when nothing was trained."""
        if self.cfg.max_steps is not None and self.step >= self.cfg.max_steps:
            self._stop.wait(timeout)
            return None
        t_wait = time.perf_counter()
        groups = self.groups.take(self.cfg.batch_groups, timeout, self._stop.is_set)
        t0 = time.perf_counter()
        self.training.idle(t0 - t_wait)
        if groups is None:
            return None
        with self._train_lock:
            version = self.version
            fresh, dropped = [], []
            for g in groups:
                (fresh if version - g.min_version <= self.cfg.eta else dropped).append(g)
            if dropped:
                self.dropped_stale += len(dropped)
                self.llm_metrics.dropped_stale.labels(self.job).inc(len(dropped))
                self.metrics.dropped_samples.labels(self.job, "stale").inc(sum(len(g.group["completions"]) for g in dropped))
                event(log, "dropped_stale", level=30, job=self.job, version=version, groups=len(dropped),
                      staleness=max(version - g.min_version for g in dropped), eta=self.cfg.eta)
            result = self._update(fresh, version) if fresh else None
            self.step += 1
            self.journal.mark_consumed(g.record for g in groups)
            self.journal.prepare(self.step)   # pending: counts once this step's version is published
            new_version = self.publish()
            self.journal.commit(self.step)    # committed: compact fully consumed log segments
            self.optimizer_ckpt.maybe_save(self.step, new_version)
        dt = time.perf_counter() - t0
        self.training.busy(dt)
        record = self.training.record(self.step, fresh, version, new_version, result, dt, len(dropped))
        event(log, "trained", job=self.job, version=new_version, step=self.step, groups=len(fresh),
              reward=record["reward_mean"], accuracy=record["accuracy"], staleness_max=record["staleness_max"],
              loss=record["loss"], skipped=record["stats"].get("skipped", 1.0), seconds=dt)
        return record

    def _update(self, fresh: list[ValidatedGroup], version: int):
        """GRPO on ``fresh``; None when the update raised (a bug, not bad input: logged and counted; the
        schedule still advances)."""
        try:
            batch = self.algorithm.build_batch([g.group for g in fresh], self.pad_id, vocab_size=self.vocab_size,
                                               learner_version=version)
            return self.algorithm.update(batch)
        except Exception as exc:
            self.llm_metrics.update_failures.labels(self.job).inc()
            event(log, "update_failed", level=40, job=self.job, version=version, groups=len(fresh),
                  error=f"{type(exc).__name__}: {exc}"[:300])
            log.exception("update_failed job=%s", self.job)
            return None

    def _housekeeping(self) -> None:
        self.admission.expire()  # tickets expire while paused too

    def _turn(self) -> None:
        self._guarded(self.train_step)

    def _wake(self) -> None:
        self.groups.wake()

    # -- durability --------------------------------------------------------------------------
    def _shutdown(self, checkpoint: bool) -> None:
        """With ``checkpoint`` save the optimizer state (weights and the group log are already durable);
        close the group log. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        with self._train_lock:
            if checkpoint:
                self.optimizer_ckpt.save_now(self.step, self.version)
            self.optimizer_ckpt.wait()
        self.journal.close()

    def checkpoint(self) -> Path:
        """Save the optimizer state now; returns its checkpoint folder (the weights are the newest version's)."""
        with self._train_lock:
            return self.optimizer_ckpt.save_now(self.step, self.version, force=True) or self.optimizer_dir

    # -- status ------------------------------------------------------------------------------
    def status_model(self) -> LlmStatus:
        """Snapshot for progress views, reports and tests."""
        fv = self.weights.fleet_version()
        queued, by_version = self.groups.snapshot()
        ing, tr = self.ingestor, self.training
        return LlmStatus(
            job=self.job, version=self.version, fleet_version=None if fv is None else fv.version,
            pinned=self.weights.pinned, step=self.step, paused=self.paused, job_state=self.job_state,
            device=str(self.device), time=time.time(), algorithm=self.cfg.algorithm, model=self.cfg.model,
            tasks=list(self.tasks), eta=self.cfg.eta, staleness_bound=self.cfg.eta,
            group_size=self.cfg.group_size, batch_groups=self.cfg.batch_groups,
            groups_total=self.groups.total, groups_queued=queued, groups_by_version=by_version,
            groups_requeued=self.groups.requeued,
            durability={**self.journal.stats(), "recovery": dict(self.recovery),
                        "optimizer": {**self.optimizer_restore, "saver": self.optimizer_ckpt.stats()}},
            trained_groups=tr.trained_groups, dropped_stale=self.dropped_stale, staleness_max=tr.staleness_max,
            duplicates=ing.duplicates, rejected=dict(ing.rejected), admission=self.admission.stats(),
            learner_idle_s=tr.idle_s, learner_busy_s=tr.busy_s, learner_idle_share=tr.idle_share,
            loss=tr.last_loss, train_stats=dict(tr.last_stats),
            actors={a: {"version": v, "last_seen": t} for a, (v, t) in list(self.actor_versions.items())},
            history=list(tr.records))

    def status(self) -> dict[str, Any]:
        """JSON-able snapshot: ``status_model().model_dump()``."""
        return self.status_model().model_dump()

    def audit(self) -> dict[str, Any]:
        """Exactly-once audit: groups stored vs resends recognised (duplicates are never stored)."""
        return {"stored_groups": self.ingestor.stored, "duplicates_recognised": self.ingestor.duplicates,
                "duplicates_stored": 0}

    def episodes_since(self, index: int) -> tuple[int, list[dict[str, Any]]]:
        """Learner-step records with index >= ``index`` (a group is an LLM 'episode'; steps are what reports plot)."""
        return self.training.since(index, self.step)
