"""Data-parallel learner update: the real algorithm step run on W Ray Train workers with DDP.

:func:`run_data_parallel` runs the learner's algorithm update (HG-DAgger by default, on the robot
policy network built by :func:`fleetloop.policies.build_policy`) on ``num_workers`` Ray Train
workers (``TorchTrainer``, ``ScalingConfig(num_workers=W, use_gpu=...)``; process group gloo on the
CPU, NCCL on CUDA). On every worker the policy is wrapped in ``DistributedDataParallel`` (also at
W = 1, so one code path), each worker draws its shard of every global batch, DDP all-reduces (averages)
the gradients during backward, and every worker takes the same optimizer step.
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
import json
import os
import shutil
import statistics
import tempfile
import time
import uuid
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from fleetloop.errors import InvalidArgument
from fleetloop.policies import build_policy
from learner.algorithms import Algorithm, make_algorithm
from learner.batch import OFFLINE, OFFLINE_VERSION, ONLINE, Batch
from learner.sampler import AdaptiveSampler

RESULT_FILE = "result.json"
WEIGHTS_FILE = "policy.safetensors"


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
    take = slice(rank * b, (rank + 1) * b)
    fields = ("obs", "actions", "task", "interventions", "source", "versions", "rewards", "weights")
    return Batch(**{f: getattr(batch, f)[take].contiguous() for f in fields},
                 extra={k: v[take].contiguous() for k, v in batch.extra.items()})


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
def _sync(device: torch.device) -> None:
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
        _sync(algo.device)
        t0 = time.perf_counter()
        out = algo.update(batch)
        _sync(algo.device)
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


# -- Ray Train ---------------------------------------------------------------------------------------
@contextmanager
def ray_session(num_cpus: int | None = None) -> Iterator[None]:
    """Use the connected Ray, or start a private local one (no dashboard, short temp dir) and shut
    down only that one on exit. Workers run at nice 0 (Ray's default 15 would handicap them against
    the baseline in the driver)."""
    import ray

    if ray.is_initialized():
        yield
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_worker_niceness", "0")
    temp = tempfile.mkdtemp(prefix="flray-")  # TMPDIR (else /tmp): keep it short, Ray puts sockets there
    ray.init(num_cpus=num_cpus or usable_cores(), include_dashboard=False, _temp_dir=temp, configure_logging=False,
             log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


def run_data_parallel(config: DataParallelConfig, storage_path: str | os.PathLike | None = None) -> DataParallelResult:
    """Run ``config`` on ``num_workers`` Ray Train workers (see the module docstring) and return
    what rank 0 reported. Connects to Ray through :func:`ray_session` if not yet connected.
    ``storage_path``: where Ray Train persists the run (default: a temp folder, removed after).
    Raises Ray Train's error (with the worker's traceback) if a worker fails; InvalidArgument for
    CUDA asked without a GPU."""
    if config.device == "cuda" and not torch.cuda.is_available():
        raise InvalidArgument("device 'cuda' asked for but CUDA is not available", field="device", value=config.device)
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    own_storage = storage_path is None
    store = Path(tempfile.mkdtemp(prefix="fleetloop-dp-")) if own_storage else Path(storage_path)
    try:
        with ray_session():
            resources = {"CPU": config.cpus_per_worker, **({"GPU": 1} if config.device == "cuda" else {})}
            trainer = TorchTrainer(
                _worker_loop, train_loop_config=config.model_dump(mode="json"),
                torch_config=TorchConfig(backend=config.dist_backend),
                scaling_config=ScalingConfig(num_workers=config.num_workers, use_gpu=config.device == "cuda",
                                             resources_per_worker=resources),
                run_config=RunConfig(name=f"fleetloop-dp-{uuid.uuid4().hex[:8]}", storage_path=str(store)))
            t0 = time.perf_counter()
            result = trainer.fit()
            fit_s = time.perf_counter() - t0
            if result.checkpoint is None:
                raise RuntimeError(f"Ray Train run ended without rank 0's result (error: {result.error!r})")
            with result.checkpoint.as_directory() as folder:
                doc = json.loads((Path(folder) / RESULT_FILE).read_text())
                from safetensors.torch import load_file
                state = load_file(str(Path(folder) / WEIGHTS_FILE))
    finally:
        if own_storage:
            shutil.rmtree(store, ignore_errors=True)
    doc["setup_s"] = fit_s - doc["train_s"]
    return DataParallelResult(**doc, final_state=state)


def _worker_loop(cfg: dict[str, Any]) -> None:
    """Ray Train's ``train_loop_per_worker``: build, wrap in DDP, train the timed steps, check weights,
    profile, and (rank 0) report the result and final weights as a checkpoint."""
    import ray.train
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    config = DataParallelConfig.model_validate(cfg)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    threads = config.threads(ctx.get_local_world_size())
    torch.set_num_threads(threads)
    if config.device == "cuda":
        from ray.train.torch import get_device
        device = get_device()
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    algo = build_algorithm(config, device)
    model = algo.policy
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                  gradient_as_bucket_view=config.gradient_as_bucket_view,
                                  static_graph=config.static_graph)
    algo.policy = ddp  # update() calls self.policy(...) and clips self.policy.parameters(): same tensors
    batches = [shard(make_global_batch(config, i), rank, world).to(device) for i in range(config.batch_pool)]
    checks = {"n": 0, "spread": 0.0}

    def verify() -> None:  # max - min of every parameter across ranks: 0 when identical
        hi, lo = flat_params(model), flat_params(model)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        checks["n"] += 1
        checks["spread"] = max(checks["spread"], float((hi - lo).abs().max().item()))

    dist.barrier()
    times, losses = timed_updates(algo, batches, config, verify)
    verify()
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, {"train_s": float(sum(times)), "digest": weights_digest(model),
                                      "loss_first": losses[0], "loss_last": losses[-1]})
    state = {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}
    prof = _profile(algo, ddp, batches, config, rank) if config.profile_steps else {}
    allreduce_s = _allreduce_time(model, config.allreduce_reps, device) if config.allreduce_reps else None
    train_s = max(g["train_s"] for g in gathered)
    doc = {
        "mode": "ray_train", "num_workers": world, "device": device.type, "backend": config.dist_backend,
        "global_batch_size": config.global_batch_size, "per_worker_batch": config.per_worker_batch,
        "torch_threads": threads, "steps": config.steps, "step_times_s": times, "train_s": train_s,
        "samples_per_s": config.global_batch_size * config.steps / train_s,
        "loss_first": float(np.mean([g["loss_first"] for g in gathered])),
        "loss_last": float(np.mean([g["loss_last"] for g in gathered])),
        "weights_identical": checks["spread"] == 0.0 and len({g["digest"] for g in gathered}) == 1,
        "weight_checks": checks["n"], "max_weight_spread": checks["spread"],
        "rank_digests": [g["digest"] for g in gathered], "allreduce_s": allreduce_s,
        "grad_bytes": sum(p.numel() * p.element_size() for p in model.parameters()), **prof}
    with tempfile.TemporaryDirectory(prefix="fleetloop-dp-ckpt-") as folder:
        checkpoint = None
        if rank == 0:
            from safetensors.torch import save_file
            save_file(state, str(Path(folder) / WEIGHTS_FILE))
            (Path(folder) / RESULT_FILE).write_text(json.dumps(doc))
            checkpoint = ray.train.Checkpoint.from_directory(folder)
        ray.train.report({"samples_per_s": doc["samples_per_s"], "weights_identical": doc["weights_identical"]},
                         checkpoint=checkpoint)


def _profile(algo: Algorithm, ddp: Any, batches: list[Batch], config: DataParallelConfig, rank: int) -> dict[str, Any]:
    """After the timed window: ``profile_steps`` synced steps (rank 0 under torch.profiler, every rank
    timed), then as many with DDP's ``no_sync`` (local gradients only: compute without all-reduce;
    the ranks' weights diverge from here, so this runs after the final check)."""
    from torch.profiler import ProfilerActivity, profile

    n = config.profile_steps
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if algo.device.type == "cuda" else [])
    synced: list[float] = []
    with profile(activities=acts) if rank == 0 else nullcontext() as prof:
        for i in range(n):
            _sync(algo.device)
            t0 = time.perf_counter()
            algo.update(batches[i % len(batches)])
            _sync(algo.device)
            synced.append(time.perf_counter() - t0)
    top: list[list[Any]] = []
    if prof is not None:
        events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
        total = sum(e.self_cpu_time_total for e in events) or 1.0
        for e in sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:12]:
            top.append([e.key, e.self_cpu_time_total / 1e6, e.self_cpu_time_total / total])
    local: list[float] = []
    for i in range(n):
        with ddp.no_sync():
            _sync(algo.device)
            t0 = time.perf_counter()
            algo.update(batches[i % len(batches)])
            _sync(algo.device)
            local.append(time.perf_counter() - t0)
    return {"synced_step_s": statistics.median(synced), "compute_step_s": statistics.median(local), "profile_top": top}


def _allreduce_time(model: torch.nn.Module, reps: int, device: torch.device) -> float:
    """Median time of ``reps`` all-reduces (sum) of one flat buffer the size of the gradients."""
    import torch.distributed as dist

    buf = torch.zeros(sum(p.numel() for p in model.parameters()), dtype=torch.float32, device=device)
    dist.barrier()
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        dist.all_reduce(buf)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
