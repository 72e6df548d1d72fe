"""Data-parallel learner update: the config, batches, invariants and the single-process baseline.

The Ray Train runner is :mod:`learner.data_parallel_ray` (``run_data_parallel``, ``ray_session``;
both are also importable from here, loaded on first use so that this module never imports Ray). This
module holds what both paths share: the config, the result, the global batches and their shards, the
algorithm build and the timed update loop.

``run_data_parallel`` runs the learner's algorithm update (HG-DAgger by default, on the robot policy
network built by :func:`fleetloop.policies.build_policy`) on ``num_workers`` Ray Train workers
(``TorchTrainer``, ``ScalingConfig(num_workers=W, use_gpu=...)``; process group gloo on the CPU, NCCL
on CUDA). On every worker the policy is wrapped in ``DistributedDataParallel`` (also at W = 1, so one
code path), each worker draws its shard of every global batch, DDP all-reduces (averages) the
gradients during backward, and every worker takes the same optimizer step.
:func:`run_single_process` is the same loop in this process without Ray Train or DDP: the learner's
current path (:meth:`learner.core.LearnerCore.train_step` calling ``Algorithm.update`` in one thread).

Batches (:func:`make_global_batch`) have the fields, dtypes and layout the learner's
``_assemble`` produces: the real :class:`~learner.sampler.AdaptiveSampler` plans the per-(task,
source) counts (cold start: tasks uniform, online share 0.5), samples are concatenated in plan
order, demos carry version -1 and the intervention flag, online frames a share
``intervention_share`` of operator labels, gate weights 1. Observations are random, actions a fixed
random tanh-linear "expert" of them per task, so the loss falls as the policy learns.

Invariants (checked, reported in :class:`DataParallelResult`):

- **Stratified shards**: a global batch is S strata (``strata``, default W) laid end to end, each
  built from the *same* sampler plan and the same count of operator labels; worker r of W takes the
  r-th contiguous S/W of them. HG-DAgger divides a shard's loss by its own trainable count, and DDP
  averages the shards' gradients, so the all-reduced gradient equals the single-process gradient of
  the whole global batch exactly when every shard has the same trainable count; this layout
  guarantees it (a random split would weight samples unequally).
- **Identical weights**: DDP broadcasts rank 0's initial parameters; after every ``verify_every``
  steps and at the end, each parameter's max minus min across ranks is all-reduced; it must be 0
  (``max_weight_spread``, ``weights_identical``), and the sha256 of every rank's final weights is
  reported (``rank_digests``).
- **Same result as one process**: 1 worker, W workers and :func:`run_single_process` on the same
  config and global batches end with the same weights up to float summation order (tests hold it).

Threads: each worker sets ``torch.set_num_threads(cores // W)`` (``torch_threads`` overrides), so
W workers never oversubscribe the node; the single-process baseline uses every core.

How the learner would use it (not wired in yet): ``LearnerCore``'s training thread becomes one
long-running ``TorchTrainer`` whose loop takes, per step, its shard from the learner (which keeps
ingest, replay, staleness gate and sampler in one process and plans W stratified shards per step,
passed as Ray object refs), runs ``Algorithm.update`` under DDP and sends the per-sample losses back
for :meth:`AdaptiveSampler.observe`; rank 0 publishes to the ``WeightStore`` every K steps and writes
the checkpoint (weights are identical on every rank). What it takes: that shard queue, resume by
loading the checkpoint on every rank before DDP wraps the model, and all-reducing the trainable count
before normalising, for shards with unequal trainable counts.
"""

from __future__ import annotations

import hashlib
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from fleetloop.errors import InvalidArgument
from fleetloop.policies import build_policy
from learner.algorithms import Algorithm, make_algorithm
from learner.batch import OFFLINE, OFFLINE_VERSION, ONLINE, Batch
from learner.sampler import AdaptiveSampler

def usable_cores() -> int:
    """CPU cores this process may run on (the affinity mask; ``os.cpu_count`` where there is none)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class DataParallelConfig(BaseModel):
    """One data-parallel (or single-process baseline) run of the learner's algorithm update."""

    model_config = ConfigDict(extra="forbid")

    num_workers: int = Field(1, ge=1, le=256, description="Ray Train workers W (DDP world size).")
    device: Literal["cpu", "cuda"] = Field("cpu", description="'cpu' (gloo) or 'cuda' (one GPU per worker, NCCL).")
    backend: Literal["auto", "gloo", "nccl"] = Field("auto", description="Process group; auto: gloo / nccl by device.")
    global_batch_size: int = Field(256, ge=1, le=1 << 20, description="Samples per learner step over all workers; "
                                                                      "must be a multiple of num_workers.")
    steps: int = Field(200, ge=1, le=10_000_000, description="Timed optimizer steps.")
    warmup_steps: int = Field(10, ge=0, le=100_000, description="Untimed steps before the timed ones (same weights "
                                                                 "on every path: they train too).")
    strata: int | None = Field(None, ge=1, le=4096, description="Strata the global batch is laid out in (each built "
                                "from the same sampler plan, with the same trainable count); None = num_workers. "
                                "Must be a multiple of num_workers: runs with equal strata, seed and global batch "
                                "size train on identical global batches whatever their worker count.")
    batch_pool: int = Field(8, ge=1, le=4096, description="Distinct global batches generated up front and cycled "
                                                           "(step i uses batch i mod pool; generation is not timed).")
    obs_dim: int = Field(39, ge=1, le=1 << 20, description="Observation size (Meta-World state: 39).")
    act_dim: int = Field(4, ge=1, le=4096, description="Action size (Meta-World: 4).")
    num_tasks: int = Field(3, ge=1, le=1024, description="Tasks of the job (the demo's default: 3).")
    policy_factory: str = Field("fleetloop.policies:mlp_policy", description="Policy plug-in, 'module:function'.")
    policy_kwargs: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments for the factory.")
    algorithm: str = Field("hg_dagger", description="Algorithm plug-in name (learner.algorithms.ALGORITHMS).")
    algorithm_params: dict[str, Any] = Field(default_factory=dict, description="Algorithm config fields.")
    intervention_share: float = Field(0.5, ge=0.0, le=1.0, description="Share of each online group that carries "
                                                                       "operator labels (rounded per group).")
    seed: int = Field(0, ge=0, description="Seeds the policy's initial weights and the synthetic batches.")
    torch_threads: int | None = Field(None, ge=1, le=1024, description="torch threads per worker; None = usable "
                                                                        "cores // num_workers (at least 1).")
    cpus_per_worker: float = Field(1.0, gt=0, le=1024, description="Ray CPUs reserved per worker.")
    gradient_as_bucket_view: bool = Field(True, description="DDP: gradients are views into the all-reduce buckets.")
    static_graph: bool = Field(False, description="DDP static_graph (every parameter used in every step).")
    verify_every: int = Field(50, ge=0, description="Untimed identical-weights check every N steps (0: at the end).")
    profile_steps: int = Field(20, ge=0, le=10_000, description="After the timed steps (and the final weight check): "
                                                                "N DDP steps under torch.profiler on rank 0, then N "
                                                                "steps without gradient sync (compute only); 0 = skip.")
    allreduce_reps: int = Field(30, ge=0, le=10_000, description="Timed all-reduces of a gradient-sized buffer after "
                                                                  "training (0 = skip).")

    @model_validator(mode="after")
    def _check(self) -> "DataParallelConfig":
        if self.global_batch_size % self.num_workers:
            raise ValueError(f"global_batch_size {self.global_batch_size} must be a multiple of num_workers "
                             f"{self.num_workers}")
        if self.global_batch_size % self.layout or self.layout % self.num_workers:
            raise ValueError(f"strata {self.layout} must be a multiple of num_workers {self.num_workers} and divide "
                             f"global_batch_size {self.global_batch_size}")
        if self.backend == "nccl" and self.device != "cuda":
            raise ValueError(f"backend 'nccl' needs device 'cuda', got device {self.device!r}")
        return self

    @property
    def per_worker_batch(self) -> int:
        """Samples per worker per step (``global_batch_size / num_workers``)."""
        return self.global_batch_size // self.num_workers

    @property
    def layout(self) -> int:
        """The resolved strata count (``strata`` or ``num_workers``)."""
        return self.strata or self.num_workers

    @property
    def dist_backend(self) -> str:
        """The resolved torch.distributed backend."""
        if self.backend != "auto":
            return self.backend
        return "nccl" if self.device == "cuda" else "gloo"

    def threads(self, workers: int) -> int:
        """torch threads for one of ``workers`` processes on this node."""
        return self.torch_threads or max(1, usable_cores() // workers)


@dataclass
class DataParallelResult:
    """What one run measured. Times are seconds on the slowest rank; samples = global samples."""

    mode: Literal["single_process", "ray_train"]
    num_workers: int
    device: str
    backend: str | None
    global_batch_size: int
    per_worker_batch: int
    torch_threads: int
    steps: int
    step_times_s: list[float]  #: per timed step, rank 0 (update call only)
    train_s: float  #: timed window: sum of the timed steps' times, max over ranks
    samples_per_s: float  #: global_batch_size * steps / train_s
    loss_first: float  #: mean over ranks of the first timed step's loss
    loss_last: float  #: mean over ranks of the last timed step's loss
    weights_identical: bool  #: every check found max - min across ranks == 0 for every parameter
    weight_checks: int
    max_weight_spread: float
    rank_digests: list[str]  #: sha256 of each rank's final weights (float32 bytes, parameter order)
    final_state: dict[str, torch.Tensor] = field(repr=False)  #: rank 0's final policy weights (CPU)
    compute_step_s: float | None = None  #: median step time without gradient sync (DDP no_sync), rank 0
    synced_step_s: float | None = None  #: median step time with sync over the same profiling phase, rank 0
    allreduce_s: float | None = None  #: median stand-alone all-reduce of a gradient-sized buffer
    grad_bytes: int = 0
    profile_top: list[list[Any]] = field(default_factory=list)  #: [op, self CPU s, share] on rank 0, top 12
    setup_s: float | None = None  #: TorchTrainer.fit wall time minus the timed window (Ray Train start-up etc.)

    @property
    def step_time_median_s(self) -> float:
        return statistics.median(self.step_times_s)

    def summary(self) -> dict[str, Any]:
        """JSON-ready fields (no weights, step times summarised)."""
        out = {k: v for k, v in asdict(self).items() if k not in ("final_state", "step_times_s")}
        out["step_time_median_s"] = self.step_time_median_s
        out["step_time_p90_s"] = float(np.quantile(self.step_times_s, 0.9))
        return out


# -- batches -------------------------------------------------------------------------------------
def _expert(config: DataParallelConfig) -> np.ndarray:
    """The fixed per-task linear map whose tanh is the synthetic operator's action: [tasks, obs, act]."""
    rng = np.random.default_rng([config.seed, 0xE5])
    shape = (config.num_tasks, config.obs_dim, config.act_dim)
    return (rng.standard_normal(shape) / np.sqrt(config.obs_dim)).astype(np.float32)


def make_global_batch(config: DataParallelConfig, index: int) -> Batch:
    """Global batch ``index``: ``config.layout`` strata of ``global_batch_size / layout`` samples laid
    end to end (see the module docstring). Deterministic in (seed, index, layout, sizes): every worker
    builds the same global batch and takes its rows with :func:`shard`."""
    w = config.layout
    b = config.global_batch_size // w
    rng = np.random.default_rng([config.seed, index])
    tasks = [f"task-{i}" for i in range(config.num_tasks)]
    avail = {(t, s): 1 << 20 for t in tasks for s in ("online", "offline")}
    plan = AdaptiveSampler(tasks).plan(b, avail, rng)  # cold start: tasks uniform, online share 0.5
    expert = _expert(config)
    cols: dict[str, list[np.ndarray]] = {k: [] for k in ("obs", "actions", "task", "interventions", "source",
                                                          "versions", "rewards")}
    for _ in range(w):
        for (task, source), n in plan.items():
            if n <= 0:
                continue
            ti = tasks.index(task)
            obs = rng.standard_normal((n, config.obs_dim), dtype=np.float32)
            cols["obs"].append(obs)
            cols["actions"].append(np.tanh(obs @ expert[ti]))
            cols["task"].append(np.full(n, ti, np.int64))
            if source == "offline":
                iv = np.ones(n, bool)
                cols["versions"].append(np.full(n, OFFLINE_VERSION, np.int64))
            else:
                iv = np.zeros(n, bool)
                iv[rng.permutation(n)[:round(n * config.intervention_share)]] = True
                cols["versions"].append(rng.integers(0, 8, n).astype(np.int64))
            cols["interventions"].append(iv)
            cols["source"].append(np.full(n, OFFLINE if source == "offline" else ONLINE, np.uint8))
            cols["rewards"].append(rng.random(n, dtype=np.float32))
    return Batch.from_numpy(**{k: np.concatenate(v) for k, v in cols.items()})


def shard(batch: Batch, rank: int, workers: int) -> Batch:
    """Rows ``[rank * b, (rank + 1) * b)`` of a global batch of ``workers * b`` samples."""
    if not 0 <= rank < workers or len(batch) % workers:
        raise InvalidArgument(f"cannot take shard {rank} of {workers} from a batch of {len(batch)}", field="rank",
                              value=rank)
    b = len(batch) // workers
    return batch.take(slice(rank * b, (rank + 1) * b))


def build_algorithm(config: DataParallelConfig, device: torch.device) -> Algorithm:
    """The job's policy (seeded by ``config.seed``) and algorithm, on ``device``."""
    torch.manual_seed(config.seed)
    policy = build_policy(config.policy_factory, config.policy_kwargs, config.obs_dim, config.act_dim, config.num_tasks)
    return make_algorithm(config.algorithm, policy.to(device), config.algorithm_params, device)


def flat_params(module: torch.nn.Module) -> torch.Tensor:
    """All parameters as one flat float32 tensor (parameter order)."""
    return torch.cat([p.detach().reshape(-1).float() for p in module.parameters()])


def weights_digest(module: torch.nn.Module) -> str:
    """sha256 of :func:`flat_params`'s bytes (CPU)."""
    return hashlib.sha256(flat_params(module).cpu().numpy().tobytes()).hexdigest()


# -- the timed loop (both paths) ---------------------------------------------------------------------
def sync_device(device: torch.device) -> None:
    """Wait for ``device``'s queued work (CUDA); a no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_updates(algo: Algorithm, batches: list[Batch], config: DataParallelConfig,
                  verify: Callable[[], None] | None = None) -> tuple[list[float], list[float]]:
    """``warmup_steps`` then ``steps`` calls of ``algo.update`` on ``batches`` (cycled). Returns the
    timed steps' durations and losses. ``verify`` runs every ``verify_every`` steps, untimed."""
    times: list[float] = []
    losses: list[float] = []
    total = config.warmup_steps + config.steps
    for i in range(total):
        batch = batches[i % len(batches)]
        sync_device(algo.device)
        t0 = time.perf_counter()
        out = algo.update(batch)
        sync_device(algo.device)
        dt = time.perf_counter() - t0
        if i >= config.warmup_steps:
            times.append(dt)
            losses.append(float(out.loss))
        if verify is not None and config.verify_every and (i + 1) % config.verify_every == 0:
            verify()
    return times, losses


def run_single_process(config: DataParallelConfig) -> DataParallelResult:
    """The baseline: the same update loop in this process, no Ray Train, no DDP, on the same global
    batches (``num_workers`` only sets their layout), with ``torch_threads`` (default: every usable
    core). Restores this process's thread count."""
    device = torch.device("cuda" if config.device == "cuda" else "cpu")
    threads = config.threads(1)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        algo = build_algorithm(config, device)
        batches = [make_global_batch(config, i).to(device) for i in range(config.batch_pool)]
        times, losses = timed_updates(algo, batches, config)
        state = {k: v.detach().cpu().clone() for k, v in algo.policy.state_dict().items()}
        digest = weights_digest(algo.policy)
    finally:
        torch.set_num_threads(old)
    train_s, gb = float(sum(times)), config.global_batch_size
    return DataParallelResult(
        mode="single_process", num_workers=1, device=device.type, backend=None, global_batch_size=gb,
        per_worker_batch=gb, torch_threads=threads, steps=config.steps, step_times_s=times, train_s=train_s,
        samples_per_s=gb * config.steps / train_s, loss_first=losses[0], loss_last=losses[-1], weights_identical=True,
        weight_checks=0, max_weight_spread=0.0, rank_digests=[digest], final_state=state,
        grad_bytes=sum(p.numel() * p.element_size() for p in algo.policy.parameters()))


# -- the Ray Train runner, importable from here as before --------------------------------------------
_RAY_NAMES = ("RESULT_FILE", "WEIGHTS_FILE", "ray_session", "run_data_parallel")


def __getattr__(name: str) -> Any:
    """``ray_session``, ``run_data_parallel``, ``RESULT_FILE`` and ``WEIGHTS_FILE`` from
    :mod:`learner.data_parallel_ray`, imported on first use (it imports this module, and Ray lazily)."""
    if name in _RAY_NAMES:
        from learner import data_parallel_ray

        return getattr(data_parallel_ray, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
