"""LlmLearnerCore: one GRPO job's learner, independent of gRPC and Ray (both wrap it).

Owns the base Hugging Face causal LM (on ``device``), the GRPO algorithm, the weight store, the
admission controller and a FIFO queue of validated groups. It exposes what
:class:`learner.server.LearnerServicer` uses on any core (``cfg``, ``metrics``, ``weights``,
``job_state``, ``version``, ``flow.inflight``, ``backoff_ms``, ``ingestor.ingest``, ``status``) plus
``kind = "llm"``, :meth:`admit` and :meth:`rollout_settings`.

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
accuracy, staleness and loss per version in ``status()["history"]``.

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

import threading
import time
from collections import deque
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fleetloop.errors import FailedPrecondition, InvalidArgument
from fleetloop.logs import event, get_logger
from fleetloop.weights import load_verified, state_dict_to_blob
from learner.algorithms import make_algorithm
from learner.backpressure import FlowControl
from learner.core import pick_device
from learner.llm.config import LlmLearnerConfig
from learner.llm.durability import GroupJournal, recover_groups
from learner.llm.ingest import GroupIngestor, ValidatedGroup
from learner.llm.metrics import LlmMetrics
from learner.llm.optimizer_state import OptimizerCheckpointer, restore_optimizer
from learner.metrics import LearnerMetrics
from learner.weight_store import WeightStore

log = get_logger("learner.llm")
#: A completion counts as correct (accuracy) when its reward reaches the tasks' full score.
CORRECT_REWARD = 1.0 - 1e-6


def _chunk_key(payload: bytes) -> tuple[str, int]:
    """(episode_id, seq) of a logged EpisodeChunk."""
    from fleetloop.v1 import fleetloop_pb2 as pb
    chunk = pb.EpisodeChunk.FromString(payload)
    return chunk.episode_id, int(chunk.seq)


def resolve_model(model: str, seed: int, cache_dir: Path) -> Path:
    """The HF folder of ``model`` (:func:`fleetloop.llm_models.resolve_model`; imported here lazily so
    this module loads without transformers)."""
    from fleetloop import llm_models
    return llm_models.resolve_model(model, seed, cache_dir)


class LlmLearnerCore:
    """See module docstring."""

    kind = "llm"

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
        self.flow = FlowControl(None, 1.0, 1.0, None, config.max_backoff_ms, None)
        self._cond = threading.Condition()
        self._queue: deque[ValidatedGroup] = deque()   # groups that arrived under a live ticket, FIFO
        self._extra: deque[ValidatedGroup] = deque()   # groups without one (expired, unknown, no ticket, re-queued)
        self.journal = GroupJournal(state_dir / "llm", _chunk_key)
        self.ingestor = GroupIngestor(
            {"job_id": self.job, "task_ids": frozenset(self.tasks), "group_size": config.group_size,
             "vocab_size": self.vocab_size, "max_new_tokens": config.max_new_tokens,
             "max_prompt_tokens": config.max_prompt_tokens}, self._on_group, self.llm_metrics, journal=self.journal)
        self.weights = WeightStore(state_dir / "weights", keep_in_memory=config.keep_versions,
                                   keep_on_disk=config.keep_versions_on_disk)
        self.step = 0
        self.paused = False
        self.job_state = "running"
        self.last_loss: float | None = None
        self.last_stats: dict[str, float] = {}
        self.history: deque[dict[str, Any]] = deque(maxlen=config.history_size)
        self.actor_versions: dict[str, tuple[int, float]] = {}  # actor -> (engine version at its last Admit, time)
        self.groups_total = 0
        self.groups_requeued = 0
        self.groups_by_version: dict[int, int] = {}  # oldest policy_version of a group -> groups stored
        self.trained_groups = 0
        self.dropped_stale = 0
        self.staleness_max = 0
        self.idle_s = 0.0
        self.busy_s = 0.0
        self._train_lock = threading.RLock()
        self._stop = threading.Event()
        self._stopped = False
        self._thread: threading.Thread | None = None
        self.llm_metrics.queue.labels(self.job).set_function(lambda: len(self._queue) + len(self._extra))
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
        rec = recover_groups(self.journal, self.ingestor, self.version, self._requeue)
        self.recovery = {"marker": marker, **asdict(rec)}
        if rec.records or rec.ledger_keys or self.optimizer_restore["restored"]:
            event(log, "durable_state_restored", job=self.job, version=self.version, step=self.step, marker=marker,
                  requeued=rec.requeued, consumed=rec.consumed, skipped=rec.skipped, ledger_keys=rec.ledger_keys,
                  optimizer=self.optimizer_restore["restored"], optimizer_behind=self.optimizer_restore["behind_steps"])

    @property
    def version(self) -> int:
        """Newest published version (-1 before the first publish)."""
        latest = self.weights.latest
        return -1 if latest is None else latest.version

    def publish(self) -> int:
        """Serialise the policy, store it as the next version, announce it. Returns the version.
        Holds the training lock: a manual publish never falls between a step's marker and its publish."""
        t0 = time.perf_counter()
        with self._train_lock:
            blob = state_dict_to_blob({k: v for k, v in self.algorithm.policy_state_dict().items()
                                       if k in self._publish_names})
            info = self.weights.publish(blob, self.step)
        dt = time.perf_counter() - t0
        self.metrics.publish_seconds.labels(self.job).observe(dt)
        self.metrics.published_bytes.labels(self.job).inc(info.size_bytes)
        self.metrics.version.labels(self.job).set(info.version)
        self._sync_fleet_metric()
        event(log, "published", job=self.job, version=info.version, step=self.step, bytes=info.size_bytes,
              sha256=info.sha256[:12], seconds=dt)
        return info.version

    def _sync_fleet_metric(self) -> None:
        fv = self.weights.fleet_version()
        if fv is not None:
            self.metrics.fleet_version.labels(self.job).set(fv.version)

    def pin(self, version: int | None) -> None:
        """Pin the fleet to a version (or unpin). Rollouts then run the pinned weights; their groups are
        still trained while within eta of the learner's newest version."""
        self.weights.pin(version)
        self._sync_fleet_metric()
        event(log, "pinned", job=self.job, version=version)

    def set_paused(self, paused: bool) -> None:
        """Pause (or resume) training; ingest and admission go on (admission capacity stops growing)."""
        self.paused = bool(paused)
        self.job_state = "paused" if self.paused else "running"
        event(log, "paused" if self.paused else "resumed", job=self.job, version=self.version, step=self.step)

    def begin_stop(self) -> None:
        """Announce ``stopping`` to the fleet and stop training; serving goes on until :meth:`stop`."""
        self.paused = True
        self.job_state = "stopping"
        event(log, "stopping", job=self.job, version=self.version, step=self.step)

    # -- rollouts in -------------------------------------------------------------------------
    def rollout_settings(self) -> dict[str, Any]:
        """RunConfig.llm_json for actors (plus the tokenizer's vocabulary size, a consistency check)."""
        return {**self.cfg.rollout_settings(), "vocab_size": self.vocab_size}

    def admit(self, actor_id: str, n: int, current_version: int) -> dict[str, Any]:
        """Grant up to ``n`` admission tickets to ``actor_id`` (its engine runs ``current_version``)."""
        if n < 1:
            raise InvalidArgument(f"rollouts {n} must be >= 1", field="rollouts", value=n)
        self.admission.expire()
        version = max(self.version, 0)
        tickets = [] if self.job_state == "stopping" else self.admission.admit(actor_id, n, version)
        self.actor_versions[actor_id] = (int(current_version), time.time())
        retry = 0 if tickets else int(self.admission.retry_after_ms())
        if not tickets:
            retry = max(retry, 100)
        return {"ticket_ids": [t.id for t in tickets], "learner_version": version, "retry_after_ms": retry,
                "ticket_ttl_s": self.cfg.ticket_ttl_s, "max_staleness": self.cfg.eta}

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
        with self._cond:
            (self._queue if tracked else self._extra).append(vg)
            self.groups_total += 1
            self.groups_by_version[vg.min_version] = self.groups_by_version.get(vg.min_version, 0) + 1
            self._cond.notify_all()

    def _requeue(self, vg: ValidatedGroup) -> None:
        """A group re-queued from the group log at start: untracked (no live ticket), not counted as received."""
        with self._cond:
            self._extra.append(vg)
            self.groups_requeued += 1
            self._cond.notify_all()

    def backoff_ms(self, actor: str = "") -> int:
        """Ack backpressure hint (admission already bounds what actors produce: 0 unless flow control says so)."""
        ms, _ = self.flow.backoff(actor)
        return ms

    # -- training ----------------------------------------------------------------------------
    def _take_batch(self, timeout: float) -> list[ValidatedGroup] | None:
        """``batch_groups`` ticketed groups (FIFO) plus up to as many untracked ones riding along, or
        ``batch_groups`` untracked ones when that many wait (clients that skip Admit); None on timeout."""
        need = self.cfg.batch_groups
        with self._cond:
            ready = lambda: len(self._queue) >= need or len(self._extra) >= need  # noqa: E731
            if not self._cond.wait_for(lambda: ready() or self._stop.is_set(), timeout=timeout) or not ready():
                return None
            if len(self._queue) >= need:
                out = [self._queue.popleft() for _ in range(need)]
                return out + [self._extra.popleft() for _ in range(min(need, len(self._extra)))]
            return [self._extra.popleft() for _ in range(need)]

    def train_step(self, timeout: float = 0.5) -> dict[str, Any] | None:
        """One learner step if ``batch_groups`` groups are queued within ``timeout`` s; see the module docstring.
        Returns the step's record (also appended to the history), or None when nothing was trained."""
        if self.cfg.max_steps is not None and self.step >= self.cfg.max_steps:
            self._stop.wait(timeout)
            return None
        t_wait = time.perf_counter()
        groups = self._take_batch(timeout)
        t0 = time.perf_counter()
        self._idle(t0 - t_wait)
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
            result = None
            if fresh:
                try:
                    batch = self.algorithm.build_batch([g.group for g in fresh], self.pad_id, vocab_size=self.vocab_size,
                                                       learner_version=version)
                    result = self.algorithm.update(batch)
                except Exception as exc:  # a bug, not bad input: logged and counted; the schedule still advances
                    self.llm_metrics.update_failures.labels(self.job).inc()
                    event(log, "update_failed", level=40, job=self.job, version=version, groups=len(fresh),
                          error=f"{type(exc).__name__}: {exc}"[:300])
                    log.exception("update_failed job=%s", self.job)
            self.step += 1
            self.journal.mark_consumed(g.record for g in groups)
            self.journal.prepare(self.step)   # pending: counts once this step's version is published
            new_version = self.publish()
            self.journal.commit(self.step)    # committed: compact fully consumed log segments
            self.optimizer_ckpt.maybe_save(self.step, new_version)
        dt = time.perf_counter() - t0
        self._busy(dt)
        record = self._record(fresh, version, new_version, result, dt, len(dropped))
        event(log, "trained", job=self.job, version=new_version, step=self.step, groups=len(fresh),
              reward=record["reward_mean"], accuracy=record["accuracy"], staleness_max=record["staleness_max"],
              loss=record["loss"], skipped=record["stats"].get("skipped", 1.0), seconds=dt)
        return record

    def _record(self, fresh: list[ValidatedGroup], version: int, new_version: int, result, dt: float,
                dropped: int) -> dict[str, Any]:
        """History entry and metrics of one step (``result`` None: every group was dropped as stale)."""
        rewards = np.array([r for g in fresh for r in g.rewards], dtype=np.float64)
        staleness = [version - g.min_version for g in fresh]
        m, j = self.llm_metrics, self.job
        for s in staleness:
            m.staleness.labels(j).observe(s)
            self.metrics.staleness.labels(j).observe(s)
        self.staleness_max = max([self.staleness_max, *staleness])
        self.trained_groups += len(fresh)
        if result is not None:
            self.last_loss = float(result.loss)
            self.last_stats = {k: float(v) for k, v in (result.stats or {}).items()}
        record = {"step": self.step, "version": new_version, "trained_on_version": version, "time": time.time(),
                  "groups": len(fresh), "dropped_stale": dropped,
                  "reward_mean": float(rewards.mean()) if rewards.size else None,
                  "accuracy": float((rewards >= CORRECT_REWARD).mean()) if rewards.size else None,
                  "staleness": staleness, "staleness_max": max(staleness, default=None),
                  "loss": float(result.loss) if result is not None else None, "seconds": dt,
                  "tasks": sorted({g.task_id for g in fresh}),
                  "stats": dict(self.last_stats) if result is not None else {"skipped": 1.0}}
        self.history.append(record)
        if rewards.size:
            m.reward_mean.labels(j).set(record["reward_mean"])
            m.accuracy.labels(j).set(record["accuracy"])
        if result is not None:
            m.loss.labels(j).set(self.last_loss)
            self.metrics.loss.labels(j).set(self.last_loss)
        m.steps.labels(j).inc()
        m.step_seconds.labels(j).observe(dt)
        self.metrics.learner_steps.labels(j).inc()
        self.metrics.update_seconds.labels(j).observe(dt)
        return record

    def _idle(self, s: float) -> None:
        self.idle_s += s
        self.llm_metrics.idle_seconds.labels(self.job).inc(s)
        self.metrics.idle_seconds.labels(self.job).inc(s)

    def _busy(self, s: float) -> None:
        self.busy_s += s
        self.llm_metrics.busy_seconds.labels(self.job).inc(s)

    # -- loop --------------------------------------------------------------------------------
    def start_training(self) -> None:
        """Run :meth:`train_step` continuously in a background thread until :meth:`stop`."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="fleetloop-llm-train", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.admission.expire()
            if self.paused:  # operator pause is not learner idle time
                self._stop.wait(0.2)
                continue
            try:
                self.train_step(timeout=0.5)
            except Exception as exc:  # never let one bad step kill the learner; log and continue
                event(log, "train_step_failed", level=40, job=self.job, version=self.version, error=repr(exc)[:300])
                log.exception("train_step_failed job=%s", self.job)
                self._stop.wait(1.0)

    def stop(self, checkpoint: bool = True) -> None:
        """Stop training; with ``checkpoint`` save the optimizer state (weights and the group log are already
        durable); close the group log. Idempotent."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=60)
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
    @property
    def idle_share(self) -> float:
        """Learner idle share: time waiting for groups / (waiting + training)."""
        total = self.idle_s + self.busy_s
        return self.idle_s / total if total > 0 else 0.0

    def status(self) -> dict[str, Any]:
        """JSON-able snapshot for progress views, reports and tests."""
        fv = self.weights.fleet_version()
        with self._cond:
            queued = len(self._queue) + len(self._extra)
            by_version = {str(k): v for k, v in sorted(self.groups_by_version.items())}
        ing = self.ingestor
        return {
            "kind": "llm", "job": self.job, "version": self.version, "fleet_version": None if fv is None else fv.version,
            "pinned": self.weights.pinned, "step": self.step, "paused": self.paused, "job_state": self.job_state,
            "device": str(self.device), "time": time.time(), "algorithm": self.cfg.algorithm, "model": self.cfg.model,
            "tasks": list(self.tasks), "eta": self.cfg.eta, "staleness_bound": self.cfg.eta,
            "group_size": self.cfg.group_size, "batch_groups": self.cfg.batch_groups,
            "groups_total": self.groups_total, "groups_queued": queued, "groups_by_version": by_version,
            "groups_requeued": self.groups_requeued,
            "durability": {**self.journal.stats(), "recovery": dict(self.recovery),
                           "optimizer": {**self.optimizer_restore, "saver": self.optimizer_ckpt.stats()}},
            "trained_groups": self.trained_groups, "dropped_stale": self.dropped_stale, "staleness_max": self.staleness_max,
            "duplicates": ing.duplicates, "rejected": dict(ing.rejected), "admission": self.admission.stats(),
            "learner_idle_s": self.idle_s, "learner_busy_s": self.busy_s, "learner_idle_share": self.idle_share,
            "loss": self.last_loss, "train_stats": dict(self.last_stats),
            "actors": {a: {"version": v, "last_seen": t} for a, (v, t) in list(self.actor_versions.items())},
            "history": list(self.history),
        }

    def audit(self) -> dict[str, Any]:
        """Exactly-once audit: groups stored vs resends recognised (duplicates are never stored)."""
        return {"stored_groups": self.ingestor.stored, "duplicates_recognised": self.ingestor.duplicates,
                "duplicates_stored": 0}

    def episodes_since(self, index: int) -> tuple[int, list[dict[str, Any]]]:
        """Learner-step records with index >= ``index`` (a group is an LLM 'episode'; steps are what reports plot)."""
        recs = list(self.history)
        total = self.step
        first = total - len(recs)
        start = max(index, first)
        return total, recs[start - first:]
