"""LearnerCore: one robot job's learner, independent of gRPC and Ray (both wrap it).

Owns the replay store, ingest path, staleness gate, sampler, algorithm, weight store and
checkpoints. ``train_step`` is one learner step: plan a batch with the sampler, gate it for
staleness, update the algorithm, feed per-(task, source) losses back to the sampler, and every
``publish_every`` steps publish new weights (version + 1). Versions, operator controls and the
training thread are the shared :class:`learner.lifecycle.CoreLifecycle`; batch assembly is
:mod:`learner.assemble`; the vocabulary (:class:`learner.api.LearnerCore`, status models, hooks) is
:mod:`learner.api`.

Restart path (invariant 5): load the newest intact checkpoint (algorithm, optimizer, sampler, step),
then replay the ingest log into fresh buffers and ledger; the weight store continues its version
counter from disk, so versions only increase and staleness stays measured against them.

RECAP wiring (an algorithm with ``needs_episode_targets``): the replay store keeps the per-row
``recap_*`` columns (:mod:`learner.replay`); demos are labelled at load with their manifest outcome,
online episodes when their outcome is seen (:func:`learner.assemble.sync_episode_ends`, before every
step's sampling); ``max_episode_steps`` defaults to the learner's; a fresh start (no checkpoint)
runs :func:`learner.pretrain.prepare_recap` (value function, then the indicator-conditioned policy
on the demos) before version 0 is published; initial weights from a plain BC file are lifted into
the conditioned layout (:func:`learner.pretrain.load_initial_weights`).

Memory (``memory_budget_mb``): after the demos are loaded, the online rings are sized so that
demos + online rings (at capacity) + the in-flight ingest limit fit the budget
(:func:`learner.backpressure.plan_memory`); ``status()["memory"]`` and the
``fleetloop_learner_buffer_bytes`` gauge report what is allocated.

Release channels (:mod:`learner.releases`, ``config.rollout``): ``self.releases`` sees every new episode
end (``ingestor.on_episode_end``) and publish (a weight-store listener), keeps stable and candidate from
pruning (``weights.retain``), picks each actor's version (:meth:`LearnerCore.weights_for`) and retrains
from stable on an automatic rollback (:meth:`LearnerCore.rollback`).

Hooks (:class:`learner.api.LearnerHooks`, constructor argument or ``core.hooks`` before
``start_training``): ``on_update`` around ``Algorithm.update``, ``on_gate`` after the staleness gate,
``on_lock_wait`` for a step's wait on the ingest lock (in the prefetch thread when batches are
prefetched: :mod:`learner.prefetch`, which also decodes compressed camera frames outside the lock,
:mod:`learner.frames`), ``on_ingest`` around :meth:`ingest` (the
servicer's path; not the start-up log replay) and ``wrap_training`` around the training loop.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fleetloop import wire_settings
from fleetloop.codec import check_specs
from fleetloop.errors import FailedPrecondition, InvalidArgument
from fleetloop.logs import event, get_logger
from fleetloop.policies import build_policy
from fleetloop.v1 import fleetloop_pb2 as pb
from fleetloop.weights import state_dict_to_blob
from learner.algorithms import make_algorithm
from learner import robot_status
from learner.api import AdmitGrant, LearnerHooks, RobotStatus
from learner.assemble import Part, gated_batch, observe_many, stack_parts, sync_episode_ends
from learner.backpressure import INFLIGHT_MESSAGES, FlowControl
from learner.batch import Batch
from learner.checkpoint import load_latest, save_checkpoint
from learner.config import LearnerConfig
from learner.ingest import Ingestor
from learner.ingest_log import IngestLog
from learner.lifecycle import CoreLifecycle, LifecycleTraits
from learner.metrics import LearnerMetrics
from learner.frames import compressed_names
from learner.prefetch import BatchSource
from learner.pretrain import load_initial_weights
from learner.device import pick_device, precision, prepare_policy, to_device
from learner.releases import ReleaseManager
from learner.replay import ReplayStore
from learner.startup import load_offline, size_buffers, write_policy_file
from learner.sampler import AdaptiveSampler
from learner.specs import to_proto_specs
from learner.staleness import StalenessGate
from learner.weight_store import WeightStore

__all__ = ["PUBLISH_LOG_INTERVAL_S", "SOURCES", "LearnerCore", "observe_many", "pick_device"]

log = get_logger("learner")
SOURCES = ("online", "offline")
PUBLISH_LOG_INTERVAL_S = 30.0  # at most one info-level "published" line per this many seconds
IDLE_WAIT_S = 0.05  # the training loop waits this long after a step that found nothing to train on


class LearnerCore(CoreLifecycle):
    """See module docstring. Thread-safe: gRPC threads ingest while one thread trains."""

    kind = "robot"
    traits = LifecycleTraits(log=log, thread_name="fleetloop-train", join_timeout_s=30.0,
                             publish_log_interval_s=PUBLISH_LOG_INTERVAL_S, step_traceback=False)

    def __init__(self, config: LearnerConfig, hooks: LearnerHooks | None = None) -> None:
        self.cfg = config
        self.job = config.job_id
        self.device = pick_device(config.device)
        self.metrics = LearnerMetrics(self.job)
        self.obs_specs = to_proto_specs(config.observation_specs)
        self.act_specs = to_proto_specs(config.action_specs)
        torch.manual_seed(config.seed)
        self.rng = np.random.default_rng(config.seed)
        state_dir, opt = Path(config.state_dir), config.optimisation
        state_dir.mkdir(parents=True, exist_ok=True)
        self.policy_spec = spec = config.policy_spec
        policy = build_policy(opt.policy_factory, opt.policy_kwargs, spec)
        self.initial_meta: dict[str, str] = {}
        if opt.initial_weights is not None:
            self.initial_meta = load_initial_weights(policy, Path(opt.initial_weights))
        params = dict(opt.algorithm_params)
        if opt.algorithm == "recap":  # returns are normalised by the episode limit the actors obey
            params.setdefault("max_episode_steps", config.episodes.max_episode_steps)
        self.algorithm = make_algorithm(opt.algorithm, prepare_policy(policy, self.device), params, self.device)
        self.gate = StalenessGate(opt.staleness or self.algorithm.default_staleness())
        self.metrics.staleness_bound.labels(self.job).set(self.gate.config.bound)
        self.targets = bool(getattr(self.algorithm, "needs_episode_targets", False))
        compressed = compressed_names(spec.observations, config.images.storage)  # cameras kept encoded (learner.frames)
        self.replay = ReplayStore(config.tasks, spec.observations, spec.act_dim, online_capacity=config.flow.online_capacity,
                                  episode_targets=self.algorithm.episode_targets if self.targets else None,
                                  compressed=compressed)
        self._ends_seen = 0  # ingestor episode records already applied to the replay's target columns
        self.recap_startup: dict[str, Any] | None = None
        self.sampler = AdaptiveSampler(config.tasks, opt.sampler)
        self.weights = WeightStore(state_dir / "weights", keep_in_memory=config.serving.keep_versions)
        write_policy_file(config)  # how to rebuild the policy offline (fleetloop eval / policy export --state-dir)
        self.ingest_log = IngestLog(state_dir / "ingest.log", fsync=config.fsync_log)
        budgeted, fc = config.flow.memory_budget_mb is not None, config.flow
        self.flow = FlowControl(fc.max_actor_steps_per_s, fc.actor_burst_s, fc.actor_hard_factor,
                                fc.max_ingest_steps_per_s, fc.max_backoff_ms,
                                INFLIGHT_MESSAGES * config.serving.max_message_bytes if budgeted else None)
        self.ingestor = Ingestor(self.job, config.tasks, self.obs_specs, self.act_specs, self.replay, self.gate,
                                 self.ingest_log, self.metrics, flow=self.flow,
                                 interventions_only=bool(self.algorithm.eligible("online").get("interventions_only")),
                                 keep_encoded=bool(compressed))
        self.releases = ReleaseManager(self.job, state_dir / "releases.json", config.rollout, self.weights, self.metrics,
                                       retrain=self.rollback)
        self.weights.retain, self.ingestor.on_episode_end = self.releases.protected, self.releases.on_episode_end
        self.weights.add_listener(self.releases.on_publish)
        self.batches = BatchSource.build(self._locked_sample, spec.observations, compressed, config.images,
                                         self.metrics.dropped_samples.labels(self.job, "corrupt_frame").inc)
        self.ckpt_dir = state_dir / "checkpoints"
        self.step = 0
        self._last_ckpt = time.monotonic()
        self._init_lifecycle(hooks)
        self.staleness_max = 0  # over every trained online sample, expert corrections included (admitted past the bound)
        self.staleness_max_autonomous = 0
        self.last_loss: float | None = None
        self.last_stats: dict[str, float] = {}  # the newest train_step's loss and algorithm stats
        # what start-up restored, fixed before the server or the training thread starts (later reads of
        # step/version/steps_total race with both): checkpoint_step (None: no checkpoint), version, replayed_steps
        self.restored: dict[str, int | None] = {}
        for task in config.tasks:  # live values, read at every scrape
            for source in SOURCES:
                self.metrics.buffer_bytes.labels(self.job, task, source).set_function(
                    lambda t=task, s=source: self.replay.nbytes(t, s))
        self.metrics.inflight_bytes.labels(self.job).set_function(lambda: self.flow.inflight.used)
        self.offline_steps = load_offline(config, self.replay)
        self.memory_plan = size_buffers(config, self.replay, spec, self.targets, self.metrics)
        self._restore()

    # -- start-up ----------------------------------------------------------------------------
    def _restore(self) -> None:
        restored = load_latest(self.ckpt_dir)
        if restored is not None:
            step, state = restored
            self.algorithm.load_state_dict(state["algorithm"])
            self.sampler.load_state_dict(state["sampler"])
            self.step = int(state["step"])
            event(log, "checkpoint_restored", job=self.job, step=self.step)
        elif self.cfg.optimisation.algorithm == "recap":  # fresh start: pretrain V (and the policy when nothing was published)
            from learner.pretrain import prepare_recap
            self.recap_startup = prepare_recap(self.algorithm, self.replay, self.cfg.tasks,
                                               self.cfg.optimisation.offline_dataset, self.cfg.optimisation.batch_size,
                                               self.weights.latest is None, self.initial_meta, seed=self.cfg.seed)
        replayed = 0
        version = self.version
        skipped = 0
        for payload in self.ingest_log.replay():  # straight into the ingestor: no on_ingest hook
            try:
                chunk = pb.EpisodeChunk.FromString(payload)
                self.ingestor.ingest(chunk, len(payload), max(version, chunk.behavior_version), raw=payload, durable=False)
                replayed += 1
            except Exception as exc:  # a record that no longer validates must not stop the restart
                skipped += 1
                event(log, "log_record_skipped", level=30, job=self.job, error=repr(exc)[:200])
        if replayed:
            event(log, "ingest_log_replayed", job=self.job, chunks=replayed)
        if self.weights.latest is None:
            self.publish()  # version 0: the initial (e.g. pretrained) policy
        else:
            if restored is None:  # weights survived but no checkpoint: continue from the newest weights
                from fleetloop.weights import load_verified
                latest = self.weights.latest
                self.algorithm.policy.load_state_dict(load_verified(self.weights.blob(latest.version), latest.sha256))
            self.metrics.version.labels(self.job).set(self.version)
            self._sync_fleet_metric()
        self.restored = {"checkpoint_step": None if restored is None else self.step, "version": self.version,
                         "replayed_steps": self.ingestor.steps_total}

    # -- versions ----------------------------------------------------------------------------
    def _publish_blob(self) -> bytes:
        return state_dict_to_blob(self.algorithm.policy_state_dict())

    def _after_publish(self) -> None:
        self.refresh_gauges()

    def rollback(self, version: int) -> int:
        """Continue training from ``version``'s weights: load them into the policy, reset the
        optimizer's moments, unpin, and publish them as a new version (versions never go back).
        Returns the new version."""
        from fleetloop.weights import load_verified
        info = self.weights.info(version)  # NotFound for an unknown version
        state = load_verified(self.weights.blob(version), info.sha256)
        with self._train_lock:
            self.algorithm.policy.load_state_dict({k: v.to(self.device) for k, v in state.items()})
            self.algorithm.optimizer = self.algorithm.make_optimizer()
            self.weights.pin(None)
            new = self.publish()
        event(log, "rolled_back", job=self.job, version=new, source_version=version, step=self.step)
        return new

    def weights_for(self, actor_id: str):
        """(VersionInfo, channel) announced to ``actor_id``: its release channel's version, the pin, or the newest."""
        version, channel = self.releases.assignment(actor_id)  # its stable/candidate version is never pruned
        return (self.weights.info(version), channel) if version is not None else (self.weights.fleet_version(), "")

    def refresh_gauges(self) -> None:
        """Update buffer-size and sampler-share gauges and drop idle actors' version series (called on publish
        and on status)."""
        self.ingestor.forget_idle_actors(self.cfg.flow.actor_metrics_ttl_s)
        for task in self.cfg.tasks:
            for source in SOURCES:
                self.metrics.buffer_steps.labels(self.job, task, source).set(self.replay.size(task, source))
            self.metrics.online_share.labels(self.job, task).set(self.sampler.online_share(task))

    # -- serving (what the servicer asks a core) ----------------------------------------------
    def check_handshake(self, req: pb.HandshakeRequest) -> None:
        """The actor's observation and action specs must equal the job's, bounds included (``codec.check_specs``:
        FailedPrecondition naming e.g. ``observation_specs[corner3]`` and the declared shape, dtype or bounds)."""
        for name, declared, expected in (("observation_specs", req.observation_specs, self.obs_specs),
                                         ("action_specs", req.action_specs, self.act_specs)):
            check_specs(declared, expected, name)

    def job_tasks(self) -> list[str]:
        return self.cfg.tasks

    def run_config(self) -> pb.RunConfig:
        """Policy, chunking, limits and the algorithm's inference settings for robots."""
        cfg, opt, ep = self.cfg, self.cfg.optimisation, self.cfg.episodes
        settings = getattr(self.algorithm, "inference_settings", None)  # RECAP: guidance beta, indicator
        return wire_settings.run_config(policy_factory=opt.policy_factory, policy_kwargs=opt.policy_kwargs, task_ids=cfg.tasks,
                                        chunk_steps=ep.chunk_steps, max_chunk_wait_s=ep.max_chunk_wait_s,
                                        max_episode_steps=ep.max_episode_steps, max_message_bytes=cfg.serving.max_message_bytes,
                                        algorithm=opt.algorithm, inference=settings() if callable(settings) else {})

    def check_chunk(self, chunk: pb.EpisodeChunk) -> None:
        """A robot job stores no CompletionGroup (InvalidArgument naming ``group``)."""
        if chunk.HasField("group"):
            raise InvalidArgument("chunk carries a CompletionGroup; this job trains a robot policy, not an "
                                  "LLM", field="group", value=chunk.group.prompt_id[:64])

    def check_admit(self) -> None:
        """Admit serves LLM jobs only (FailedPrecondition naming ``kind``)."""
        raise FailedPrecondition(f"job {self.job!r} trains a robot policy: Admit serves LLM jobs only",
                                 field="kind", value="ROBOT")

    def admit(self, actor_id: str, n: int, current_version: int) -> AdmitGrant:
        """Never grants: see :meth:`check_admit`."""
        self.check_admit()
        raise AssertionError("unreachable")

    def backoff_ms(self, actor: str = "") -> int:
        """Backpressure hint (ms) for an ack to ``actor``: the largest of its rate-limit debt, the
        fleet's excess over ``max_ingest_steps_per_s`` and the memory-pressure level (see
        :mod:`learner.backpressure`), capped at ``max_backoff_ms``; counted by reason when > 0."""
        ms, reason = self.flow.backoff(actor)
        if ms:
            self.metrics.backoff_acks.labels(self.job, reason).inc()
        return ms

    # -- training ----------------------------------------------------------------------------
    def _available(self) -> dict[tuple[str, str], int]:
        avail = {}
        for task in self.cfg.tasks:
            for source in SOURCES:
                avail[(task, source)] = self.replay.size(task, source, **self.algorithm.eligible(source))
        return avail

    def train_step(self) -> dict[str, float] | None:
        """One learner step; None when paused or when there is nothing eligible to train on yet."""
        if self.paused:
            return None
        with self._train_lock:
            return self._train_step()

    def _train_step(self) -> dict[str, float] | None:
        t0 = time.perf_counter()
        parts = self.batches.next()  # sampled under the ingest lock, frames decoded (maybe prefetched): learner.prefetch
        if parts is None:
            return None
        version = max(self.version, 0)
        batch, groups = self._assemble(parts, version)
        if batch is None:
            return None
        result = self._update(to_device(batch, self.device))
        with self.ingestor.lock:  # the sampler plans under this lock (maybe in the prefetch thread)
            for (task, source), idx in groups.items():
                kept = idx[idx >= 0]
                if kept.size and np.isfinite(result.per_sample_loss[kept]).all():
                    group_loss = float(np.mean(result.per_sample_loss[kept]))
                    self.sampler.observe(task, source, group_loss)
                    self.metrics.task_loss.labels(self.job, task, source).set(group_loss)
        if not result.stats.get("skipped"):
            self.metrics.loss.labels(self.job).set(float(result.loss))
        self.step += 1
        dt = time.perf_counter() - t0
        self.metrics.learner_steps.labels(self.job).inc()
        self.metrics.update_seconds.labels(self.job).observe(dt)
        if self.step % self.cfg.optimisation.publish_every == 0 and \
                time.monotonic() - self._last_publish >= self.cfg.optimisation.min_publish_interval_s:
            self.publish()
        if time.monotonic() - self._last_ckpt >= self.cfg.optimisation.checkpoint_every_s:
            self.checkpoint()
        self.last_loss = float(result.loss)
        self.last_stats = {"loss": float(result.loss), **result.stats}
        return self.last_stats

    def _locked_sample(self) -> list[Part] | None:
        """:meth:`_sample` under the ingest lock, the wait timed for ``hooks.on_lock_wait``."""
        lock, wait_hook, t_wait = self.ingestor.lock, self.hooks.on_lock_wait, time.perf_counter()
        with lock:
            if wait_hook is not None:
                wait_hook(time.perf_counter() - t_wait)
            return self._sample()

    def _sample(self) -> list[Part] | None:
        """This step's parts, one per (task, source) the sampler planned (the caller holds the ingest
        lock); None before ``min_online_steps`` or while nothing is eligible."""
        if self.targets:
            self._sync_episode_ends()
        online_total = sum(self.replay.size(t, "online") for t in self.cfg.tasks)
        if online_total < self.cfg.optimisation.min_online_steps:
            return None
        avail = self._available()
        if not any(avail.values()):
            return None
        plan = self.sampler.plan(self.cfg.optimisation.batch_size, avail, self.rng)
        return [(task, source, self.replay.sample(task, source, n, self.rng, **self.algorithm.eligible(source)))
                for (task, source), n in plan.items() if n > 0]

    def _update(self, batch: Batch):
        """``Algorithm.update`` (timed for ``hooks.on_update`` when set)."""
        hook, t0 = self.hooks.on_update, time.perf_counter()
        with precision(self.device, self.cfg.optimisation.mixed_precision):
            result = self.algorithm.update(batch)
        if hook is not None:
            hook(batch, time.perf_counter() - t0)
        return result

    def _sync_episode_ends(self) -> int:
        """Label the replay rows of online episodes whose outcome arrived since the last call (caller
        holds the ingestor lock). Returns the episodes applied."""
        seen, self._ends_seen = self._ends_seen, sync_episode_ends(self.ingestor, self.replay, self._ends_seen)
        return self._ends_seen - seen

    def _assemble(self, parts: list[Part], version: int) -> tuple[Batch | None, dict[tuple[str, str], np.ndarray]]:
        """Concatenate sampled parts, apply the staleness gate, record staleness. Returns the batch
        and, per (task, source), the batch indices of its kept samples. Sample keys beyond the
        standard fields (:func:`learner.batch.extra_keys`, e.g. ``recap_*``) go into ``Batch.extra``."""
        if not parts:
            return None, {}
        cols = stack_parts(parts, self.cfg.tasks)
        arrays = cols.arrays
        gated = self.gate.at_training(version, arrays["versions"], arrays["interventions"], arrays["source"])
        if self.hooks.on_gate is not None:
            self.hooks.on_gate(version, arrays["versions"], arrays["interventions"], arrays["source"], gated)
        keep, weights, staleness = gated
        online = arrays["source"] == 0
        observed = staleness[online & keep]
        observe_many(self.metrics.staleness.labels(self.job), observed)
        if observed.size:
            self.staleness_max = max(self.staleness_max, int(observed.max()))
        auto = staleness[online & keep & ~arrays["interventions"].astype(bool)]
        if auto.size:  # autonomous frames: these are the ones the bound applies to
            self.staleness_max_autonomous = max(self.staleness_max_autonomous, int(auto.max()))
        dropped = int((~keep).sum())
        if dropped:
            self.metrics.dropped_samples.labels(self.job, "stale_at_training").inc(dropped)
        if not keep.any():
            return None, {}
        return gated_batch(cols, keep, weights)

    def _turn(self) -> None:
        """One paced step: at most ``max_updates_per_s``; the wait (and ``IDLE_WAIT_S`` after a step
        that found nothing to train on) counts as learner idle time."""
        min_dt = 1.0 / self.cfg.optimisation.max_updates_per_s if self.cfg.optimisation.max_updates_per_s else 0.0
        t0 = time.perf_counter()
        out = self._guarded(self.train_step)
        wait = (IDLE_WAIT_S if out is None else 0.0) + max(0.0, min_dt - (time.perf_counter() - t0))
        if wait > 0:
            self.metrics.idle_seconds.labels(self.job).inc(wait)
            self._stop.wait(wait)

    # -- checkpoints -------------------------------------------------------------------------
    def checkpoint(self) -> Path:
        """Atomically checkpoint algorithm, optimizer, sampler and step."""
        path = save_checkpoint(self.ckpt_dir, self.step, {
            "algorithm": self.algorithm.state_dict(), "sampler": self.sampler.state_dict(), "step": self.step,
            "version": self.version})
        self._last_ckpt = time.monotonic()
        event(log, "checkpointed", job=self.job, version=self.version, step=self.step, path=path.name)
        return path

    def _housekeeping(self) -> None:
        self.releases.flush(due_only=True)  # release evidence at most PERSIST_EVERY_S late

    def _shutdown(self, checkpoint: bool) -> None:
        """Checkpoint (optionally), write release evidence, stop prefetching and close the ingest log."""
        self.releases.flush()
        if checkpoint:
            self.checkpoint()
        self.batches.close()
        self.ingest_log.close()

    # -- status (learner.robot_status) ------------------------------------------------------
    def memory_status(self) -> dict[str, Any]:
        """Budget and allocated bytes: buffers by source, in-flight ingest now and at its peak."""
        return robot_status.memory_status(self.memory_plan, self.flow, self.replay)

    def status_model(self) -> RobotStatus:
        """Snapshot for progress views, reports and the control plane (refreshes the gauges)."""
        self.refresh_gauges()
        return robot_status.status_model(self)

    def status(self) -> dict[str, Any]:
        """JSON-able snapshot for progress views, reports and the control plane: ``status_model().model_dump()``."""
        return self.status_model().model_dump()

    def audit(self) -> dict[str, Any]:
        """Exactly-once audit of the online buffers: stored steps, and steps stored more than once
        (same episode and step index). ``duplicates_stored`` must be 0."""
        return robot_status.audit(self.ingestor, self.replay, self.cfg.tasks)

    def episodes_since(self, index: int) -> tuple[int, list[dict[str, Any]]]:
        """Episode records with global index >= ``index`` (as far as retained); returns (next_index, records)."""
        return robot_status.episodes_since(self.ingestor, index)
