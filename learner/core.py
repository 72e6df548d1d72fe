"""LearnerCore: one job's learner, independent of gRPC and Ray (both wrap it).

Owns the replay store, ingest path, staleness gate, sampler, algorithm, weight store and
checkpoints. ``train_step`` is one learner step: plan a batch with the sampler, gate it for
staleness, update the algorithm, feed per-(task, source) losses back to the sampler, and every
``publish_every`` steps publish new weights (version + 1).

Restart path (invariant 5): load the newest intact checkpoint (algorithm, optimizer, sampler, step),
then replay the ingest log into fresh buffers and ledger; the weight store continues its version
counter from disk, so versions only increase and staleness stays measured against them.

RECAP wiring (an algorithm with ``needs_episode_targets``): the replay store keeps the per-row
``recap_*`` columns (:mod:`learner.replay`); demos are labelled at load with their manifest outcome,
online episodes when their outcome is seen (:meth:`LearnerCore._sync_episode_ends`, before every
step's sampling); ``max_episode_steps`` defaults to the learner's; a fresh start (no checkpoint)
runs :func:`learner.pretrain.prepare_recap` (value function, then the indicator-conditioned policy
on the demos) before version 0 is published; initial weights from a plain BC file are lifted into
the conditioned layout (:func:`learner.pretrain.load_initial_weights`).

Memory (``memory_budget_mb``): after the demos are loaded, the online rings are sized so that
demos + online rings (at capacity) + the in-flight ingest limit fit the budget
(:func:`learner.backpressure.plan_memory`); ``status()["memory"]`` and the
``fleetloop_learner_buffer_bytes`` gauge report what is allocated.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fleetloop.dataset import iter_episodes
from fleetloop.logs import event, get_logger
from fleetloop.policies import build_policy
from fleetloop.weights import state_dict_to_blob
from learner.algorithms import make_algorithm
from learner.backpressure import INFLIGHT_MESSAGES, FlowControl, MemoryPlan, plan_memory
from learner.batch import SAMPLE_FIELDS, Batch, extra_keys
from learner.checkpoint import load_latest, save_checkpoint
from learner.config import LearnerConfig
from learner.ingest import Ingestor
from learner.ingest_log import IngestLog
from learner.metrics import LearnerMetrics
from learner.pretrain import load_initial_weights
from learner.replay import ReplayStore, bytes_per_step
from learner.sampler import AdaptiveSampler
from learner.specs import to_proto_specs
from learner.staleness import StalenessGate
from learner.weight_store import WeightStore

log = get_logger("learner")
SOURCES = ("online", "offline")
PUBLISH_LOG_INTERVAL_S = 30.0  # at most one info-level "published" line per this many seconds


def observe_many(histogram, values: np.ndarray) -> None:
    """Observe every element of ``values`` in one prometheus ``Histogram`` child: the same buckets,
    sum and count as calling ``observe`` once per element, in one update per distinct value.

    Why: the learner observes the staleness of every online sample of every step; one ``observe``
    (plus a ``labels`` lookup) per sample was about a quarter of a CPU learner step (256 samples).
    Uses the client's bucket fields when it has them (prometheus_client's ``Histogram``), else
    falls back to ``observe`` per element."""
    if values.size == 0:
        return
    vals, counts = np.unique(values, return_counts=True)
    bounds, buckets, total = (getattr(histogram, a, None) for a in ("_upper_bounds", "_buckets", "_sum"))
    if bounds is None or buckets is None or total is None:
        for v in values.tolist():
            histogram.observe(float(v))
        return
    for v, c in zip(vals.tolist(), counts.tolist()):
        total.inc(float(v) * c)
        buckets[bisect.bisect_left(bounds, float(v))].inc(c)  # first bucket with v <= bound, as observe()


def pick_device(requested: str) -> torch.device:
    """CUDA when requested or (auto and available), else CPU."""
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


class LearnerCore:
    """See module docstring. Thread-safe: gRPC threads ingest while one thread trains."""

    def __init__(self, config: LearnerConfig) -> None:
        self.cfg = config
        self.job = config.job_id
        self.device = pick_device(config.device)
        self.metrics = LearnerMetrics(self.job)
        self.obs_specs = to_proto_specs(config.observation_specs)
        self.act_specs = to_proto_specs(config.action_specs)
        torch.manual_seed(config.seed)
        self.rng = np.random.default_rng(config.seed)
        state_dir = Path(config.state_dir)
        state_dir.mkdir(parents=True, exist_ok=True)
        policy = build_policy(config.policy_factory, config.policy_kwargs, config.obs_dim, config.act_dim, len(config.tasks))
        self.initial_meta: dict[str, str] = {}
        if config.initial_weights is not None:
            self.initial_meta = load_initial_weights(policy, Path(config.initial_weights))
        params = dict(config.algorithm_params)
        if config.algorithm == "recap":  # returns are normalised by the episode limit the actors obey
            params.setdefault("max_episode_steps", config.max_episode_steps)
        self.algorithm = make_algorithm(config.algorithm, policy.to(self.device), params, self.device)
        self.gate = StalenessGate(config.staleness or self.algorithm.default_staleness())
        self.metrics.staleness_bound.labels(self.job).set(self.gate.config.bound)
        self.targets = bool(getattr(self.algorithm, "needs_episode_targets", False))
        self.replay = ReplayStore(config.tasks, config.obs_dim, config.act_dim, online_capacity=config.online_capacity,
                                  episode_targets=self.algorithm.episode_targets if self.targets else None)
        self._ends_seen = 0  # ingestor episode records already applied to the replay's target columns
        self.recap_startup: dict[str, Any] | None = None
        self.sampler = AdaptiveSampler(config.tasks, config.sampler)
        self.weights = WeightStore(state_dir / "weights", keep_in_memory=config.keep_versions)
        self.ingest_log = IngestLog(state_dir / "ingest.log", fsync=config.fsync_log)
        budgeted = config.memory_budget_mb is not None
        self.flow = FlowControl(config.max_actor_steps_per_s, config.actor_burst_s, config.actor_hard_factor,
                                config.max_ingest_steps_per_s, config.max_backoff_ms,
                                INFLIGHT_MESSAGES * config.max_message_bytes if budgeted else None)
        self.ingestor = Ingestor(self.job, config.tasks, self.obs_specs, self.act_specs, self.replay, self.gate,
                                 self.ingest_log, self.metrics, flow=self.flow,
                                 interventions_only=bool(self.algorithm.eligible("online").get("interventions_only")))
        self.ckpt_dir = state_dir / "checkpoints"
        self.step = 0
        self._last_publish = 0.0
        self._last_publish_log = -PUBLISH_LOG_INTERVAL_S  # the first version is always logged at info
        self._published_unlogged = 0
        self._last_ckpt = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.staleness_max = 0  # over every trained online sample, expert corrections included (admitted past the bound)
        self.staleness_max_autonomous = 0
        self.paused = False  # operator pause: no training steps and no publishes; ingest goes on
        self.job_state = "running"  # announced to actors with every weight announcement ('stopping' ends them)
        self.last_loss: float | None = None
        self.last_stats: dict[str, float] = {}  # the newest train_step's loss and algorithm stats
        self._train_lock = threading.Lock()  # one update at a time (training thread vs. rollback)
        # what start-up restored, fixed before the server or the training thread starts (later reads of
        # step/version/steps_total race with both): checkpoint_step (None: no checkpoint), version, replayed_steps
        self.restored: dict[str, int | None] = {}
        for task in config.tasks:  # live values, read at every scrape
            for source in SOURCES:
                self.metrics.buffer_bytes.labels(self.job, task, source).set_function(
                    lambda t=task, s=source: self.replay.nbytes(t, s))
        self.metrics.inflight_bytes.labels(self.job).set_function(lambda: self.flow.inflight.used)
        self.offline_steps = self._load_offline()
        self.memory_plan = self._size_buffers()
        self._restore()

    # -- start-up ----------------------------------------------------------------------------
    def _load_offline(self) -> int:
        if self.cfg.offline_dataset is None:
            return 0
        n = 0
        for ep in iter_episodes(self.cfg.offline_dataset, tasks=self.cfg.tasks):
            self.replay.add_offline(ep.task_id, ep.obs, ep.actions, ep.rewards, ep.interventions, outcome=ep.outcome)
            n += len(ep)
        event(log, "offline_loaded", job=self.job, steps=n, dataset=str(self.cfg.offline_dataset))
        return n

    def _size_buffers(self) -> MemoryPlan | None:
        """With a memory budget: size the (still empty) online rings from what the demos left."""
        if self.cfg.memory_budget_mb is None:
            return None
        plan = plan_memory(self.cfg.memory_budget_mb, self.cfg.max_message_bytes, self.replay.nbytes(source="offline"),
                           len(self.cfg.tasks), bytes_per_step(self.cfg.obs_dim, self.cfg.act_dim, self.targets),
                           self.cfg.online_capacity,
                           min_steps=max(2 * self.cfg.chunk_steps, 100))
        self.replay.set_online_capacity(plan.online_capacity)
        self.metrics.memory_budget.labels(self.job).set(plan.budget_bytes)
        event(log, "memory_planned", job=self.job, budget=plan.budget_bytes, inflight=plan.inflight_bytes,
              offline=plan.offline_bytes, online_capacity=plan.online_capacity, step_bytes=plan.step_bytes)
        return plan

    def _restore(self) -> None:
        restored = load_latest(self.ckpt_dir)
        if restored is not None:
            step, state = restored
            self.algorithm.load_state_dict(state["algorithm"])
            self.sampler.load_state_dict(state["sampler"])
            self.step = int(state["step"])
            event(log, "checkpoint_restored", job=self.job, step=self.step)
        elif self.cfg.algorithm == "recap":  # fresh start: pretrain V (and the policy when nothing was published)
            from learner.pretrain import prepare_recap
            self.recap_startup = prepare_recap(self.algorithm, self.replay, self.cfg.tasks, self.cfg.offline_dataset,
                                               self.cfg.batch_size, self.weights.latest is None, self.initial_meta,
                                               seed=self.cfg.seed)
        replayed = 0
        from fleetloop.v1 import fleetloop_pb2
        version = self.version
        skipped = 0
        for payload in self.ingest_log.replay():
            try:
                chunk = fleetloop_pb2.EpisodeChunk.FromString(payload)
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
    @property
    def version(self) -> int:
        """Newest published version (-1 before the first publish)."""
        latest = self.weights.latest
        return -1 if latest is None else latest.version

    def publish(self) -> int:
        """Serialise the policy, store it as the next version, announce it. Returns the version."""
        t0 = time.perf_counter()
        blob = state_dict_to_blob(self.algorithm.policy_state_dict())
        info = self.weights.publish(blob, self.step)
        dt = time.perf_counter() - t0
        self.metrics.publish_seconds.labels(self.job).observe(dt)
        self.metrics.published_bytes.labels(self.job).inc(info.size_bytes)
        self.metrics.version.labels(self.job).set(info.version)
        self._sync_fleet_metric()
        self.refresh_gauges()
        self._last_publish = time.monotonic()
        # one info line per PUBLISH_LOG_INTERVAL_S (a version a second would bury an operator's console);
        # every version at debug. Metrics and the weight index carry every version regardless.
        self._published_unlogged += 1
        quiet = self._last_publish - self._last_publish_log < PUBLISH_LOG_INTERVAL_S
        if not quiet:
            self._last_publish_log = self._last_publish
        event(log, "published", logging.DEBUG if quiet else logging.INFO, job=self.job, version=info.version,
              step=self.step, bytes=info.size_bytes, sha256=info.sha256[:12], seconds=dt,
              **({} if quiet else {"versions_since_last_line": self._published_unlogged}))
        if not quiet:
            self._published_unlogged = 0
        return info.version

    def pin(self, version: int | None) -> None:
        """Pin the fleet to a version (roll back) or unpin (None)."""
        self.weights.pin(version)
        self._sync_fleet_metric()
        event(log, "pinned", job=self.job, version=version)

    def set_paused(self, paused: bool) -> None:
        """Pause (or resume) training and publishing. Ingest, weight serving and checkpoints go on,
        so a paused job loses nothing and its fleet keeps running the current version."""
        self.paused = bool(paused)
        self.job_state = "paused" if self.paused else "running"
        event(log, "paused" if self.paused else "resumed", job=self.job, version=self.version, step=self.step)

    def begin_stop(self) -> None:
        """Announce ``stopping`` to every subscribed actor (they finish their episode, flush and exit)
        and stop training; serving goes on until :meth:`stop`."""
        self.paused = True
        self.job_state = "stopping"
        event(log, "stopping", job=self.job, version=self.version, step=self.step)

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

    def refresh_gauges(self) -> None:
        """Update buffer-size and sampler-share gauges and drop idle actors' version series (called on publish
        and on status)."""
        self.ingestor.forget_idle_actors(self.cfg.actor_metrics_ttl_s)
        for task in self.cfg.tasks:
            for source in SOURCES:
                self.metrics.buffer_steps.labels(self.job, task, source).set(self.replay.size(task, source))
            self.metrics.online_share.labels(self.job, task).set(self.sampler.online_share(task))

    def _sync_fleet_metric(self) -> None:
        fv = self.weights.fleet_version()
        if fv is not None:
            self.metrics.fleet_version.labels(self.job).set(fv.version)

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
        with self.ingestor.lock:
            if self.targets:
                self._sync_episode_ends()
            online_total = sum(self.replay.size(t, "online") for t in self.cfg.tasks)
            if online_total < self.cfg.min_online_steps:
                return None
            avail = self._available()
            if not any(avail.values()):
                return None
            plan = self.sampler.plan(self.cfg.batch_size, avail, self.rng)
            parts = []
            for (task, source), n in plan.items():
                if n <= 0:
                    continue
                s = self.replay.sample(task, source, n, self.rng, **self.algorithm.eligible(source))
                parts.append((task, source, s))
        version = max(self.version, 0)
        batch, groups = self._assemble(parts, version)
        if batch is None:
            return None
        result = self.algorithm.update(batch.to(self.device))
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
        if self.step % self.cfg.publish_every == 0 and \
                time.monotonic() - self._last_publish >= self.cfg.min_publish_interval_s:
            self.publish()
        if time.monotonic() - self._last_ckpt >= self.cfg.checkpoint_every_s:
            self.checkpoint()
        self.last_loss = float(result.loss)
        self.last_stats = {"loss": float(result.loss), **result.stats}
        return self.last_stats

    def _sync_episode_ends(self) -> int:
        """Label the replay rows of online episodes whose outcome arrived since the last call (caller
        holds the ingestor lock). Returns the episodes applied."""
        ing = self.ingestor
        total = ing.episodes_total
        if total == self._ends_seen:
            return 0
        recs = list(itertools.islice(reversed(ing.episodes), total - self._ends_seen))[::-1]  # newest first, then reordered
        keys = ing._episode_keys  # (actor, episode id) -> the replay's episode key (assigned at ingest)
        for r in recs:
            key = keys.get((r.actor_id, r.episode_id))
            if key is not None:
                self.replay.end_episode(r.task_id, key, r.outcome, r.steps)
        self._ends_seen = total
        return len(recs)

    def _assemble(self, parts, version: int) -> tuple[Batch | None, dict[tuple[str, str], np.ndarray]]:
        """Concatenate sampled parts, apply the staleness gate, record staleness. Returns the batch
        and, per (task, source), the batch indices of its kept samples. Sample keys beyond the
        standard fields (:func:`learner.batch.extra_keys`, e.g. ``recap_*``) go into ``Batch.extra``."""
        if not parts:
            return None, {}
        task_index = {t: i for i, t in enumerate(self.cfg.tasks)}
        ext = extra_keys(parts[0][2])
        cols: dict[str, list[np.ndarray]] = {k: [] for k in (*SAMPLE_FIELDS, "task", "source", *ext)}
        spans = {}
        offset = 0
        for task, source, s in parts:
            n = len(s["rewards"])
            for k in (*SAMPLE_FIELDS, *ext):
                cols[k].append(s[k])
            cols["task"].append(np.full(n, task_index[task], np.int64))
            cols["source"].append(np.full(n, 0 if source == "online" else 1, np.uint8))
            spans[(task, source)] = (offset, offset + n)
            offset += n
        arrays = {k: np.concatenate(v) for k, v in cols.items()}
        keep, weights, staleness = self.gate.at_training(version, arrays["versions"], arrays["interventions"], arrays["source"])
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
        new_index = np.cumsum(keep) - 1
        groups = {}
        for key, (a, b) in spans.items():
            groups[key] = np.where(keep[a:b], new_index[a:b], -1)
        sel = {k: v[keep] for k, v in arrays.items()}
        batch = Batch.from_numpy(obs=sel["obs"], actions=sel["actions"], task=sel["task"], interventions=sel["interventions"],
                                 source=sel["source"], versions=sel["versions"], rewards=sel["rewards"], weights=weights[keep],
                                 extra={k: sel[k] for k in ext} or None)
        return batch, groups

    # -- checkpoints -------------------------------------------------------------------------
    def checkpoint(self) -> Path:
        """Atomically checkpoint algorithm, optimizer, sampler and step."""
        path = save_checkpoint(self.ckpt_dir, self.step, {
            "algorithm": self.algorithm.state_dict(), "sampler": self.sampler.state_dict(), "step": self.step,
            "version": self.version})
        self._last_ckpt = time.monotonic()
        event(log, "checkpointed", job=self.job, version=self.version, step=self.step, path=path.name)
        return path

    # -- loop --------------------------------------------------------------------------------
    def start_training(self) -> None:
        """Run :meth:`train_step` continuously in a background thread until :meth:`stop`."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="fleetloop-train", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        min_dt = 1.0 / self.cfg.max_updates_per_s if self.cfg.max_updates_per_s else 0.0
        while not self._stop.is_set():
            if self.paused:  # operator pause is not learner idle time
                self._stop.wait(0.2)
                continue
            t0 = time.perf_counter()
            try:
                out = self.train_step()
            except Exception as exc:  # never let one bad step kill the learner; log and continue
                event(log, "train_step_failed", level=40, job=self.job, version=self.version, error=repr(exc)[:300])
                out = None
                self._stop.wait(1.0)
            wait = (0.05 if out is None else 0.0) + max(0.0, min_dt - (time.perf_counter() - t0))
            if wait > 0:
                self.metrics.idle_seconds.labels(self.job).inc(wait)
                self._stop.wait(wait)

    def stop(self, checkpoint: bool = True) -> None:
        """Stop training, checkpoint (optionally) and close the log."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if checkpoint:
            self.checkpoint()
        self.ingest_log.close()

    # -- backpressure ------------------------------------------------------------------------
    def backoff_ms(self, actor: str = "") -> int:
        """Backpressure hint (ms) for an ack to ``actor``: the largest of its rate-limit debt, the
        fleet's excess over ``max_ingest_steps_per_s`` and the memory-pressure level (see
        :mod:`learner.backpressure`), capped at ``max_backoff_ms``; counted by reason when > 0."""
        ms, reason = self.flow.backoff(actor)
        if ms:
            self.metrics.backoff_acks.labels(self.job, reason).inc()
        return ms

    def memory_status(self) -> dict[str, Any]:
        """Budget and allocated bytes: buffers by source, in-flight ingest now and at its peak."""
        plan = self.memory_plan
        inflight = self.flow.inflight
        return {"budget_bytes": plan.budget_bytes if plan else None, "inflight_limit_bytes": inflight.limit,
                "online_capacity": self.replay.online_capacity, "online_bytes": self.replay.nbytes(source="online"),
                "offline_bytes": self.replay.nbytes(source="offline"), "buffer_bytes": self.replay.nbytes(),
                "inflight_bytes": inflight.used, "inflight_peak_bytes": inflight.peak,
                "pressure_ms": self.flow.pressure.level_ms(), "pressure_allowed_steps_per_s": self.flow.pressure.allowed,
                "pressure_tightened": self.flow.pressure.tightened}

    # -- status ------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """JSON-able snapshot for progress views, reports and the control plane."""
        self.refresh_gauges()
        with self.ingestor.lock:
            tasks = {}
            for task in self.cfg.tasks:
                tally = self.ingestor.tally[task]
                tasks[task] = {
                    "steps": tally.steps, "intervention_steps": tally.intervention_steps,
                    "episodes": dict(tally.episodes),
                    "online_buffer": self.replay.size(task, "online"),
                    "offline_buffer": self.replay.size(task, "offline"),
                    "online_share": self.sampler.online_share(task),
                }
            actors = {a: {**vars(t), "dropped": dict(t.dropped)} for a, t in self.ingestor.actor_stats.items()}
            episodes_total = self.ingestor.episodes_total
        fv = self.weights.fleet_version()
        return {
            "job": self.job, "version": self.version, "fleet_version": None if fv is None else fv.version,
            "pinned": self.weights.pinned, "step": self.step, "tasks": tasks, "actors": actors,
            "episodes_total": episodes_total, "staleness_bound": self.gate.config.bound,
            "staleness_max": self.staleness_max, "staleness_max_autonomous": self.staleness_max_autonomous, "ingested_steps": self.ingestor.steps_total,
            "gate": self.gate.stats(), "device": str(self.device), "time": time.time(),
            "paused": self.paused, "job_state": self.job_state, "loss": self.last_loss,
            "offline_steps": self.offline_steps, "memory": self.memory_status(),
            "algorithm": self.cfg.algorithm, "train_stats": dict(self.last_stats), "recap_startup": self.recap_startup,
        }

    def audit(self) -> dict[str, Any]:
        """Exactly-once audit of the online buffers: stored steps, and steps stored more than once
        (same episode and step index). ``duplicates_stored`` must be 0."""
        with self.ingestor.lock:
            stored, dups, mixed = {}, 0, 0
            for task in self.cfg.tasks:
                arr = self.replay.export(task, "online")
                keys = arr["episode_keys"].astype(np.int64) * (1 << 32) + arr["steps"].astype(np.int64)
                stored[task] = int(keys.size)
                dups += int(keys.size - np.unique(keys).size)
                pairs = np.unique(np.stack([arr["episode_keys"], arr["versions"]], axis=1), axis=0) if keys.size else np.zeros((0, 2))
                mixed += int(pairs.shape[0] - np.unique(pairs[:, 0]).size)
            stats = self.replay.stats()
            return {"stored_steps": stored, "duplicates_stored": dups, "episodes_with_mixed_versions": mixed,
                    "evicted": {t: stats[t]["online_evicted"] for t in self.cfg.tasks}}

    def episodes_since(self, index: int) -> tuple[int, list[dict[str, Any]]]:
        """Episode records with global index >= ``index`` (as far as retained); returns (next_index, records)."""
        with self.ingestor.lock:
            total = self.ingestor.episodes_total
            recs = list(self.ingestor.episodes)
        first = total - len(recs)
        start = max(index, first)
        return total, [vars(r) for r in recs[start - first:]]
