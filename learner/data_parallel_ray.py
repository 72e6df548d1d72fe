"""The data-parallel learner update on W Ray Train workers with DDP (the Ray half of :mod:`learner.data_parallel`).

:func:`run_data_parallel` runs a :class:`~learner.data_parallel.DataParallelConfig` on ``num_workers``
Ray Train workers (``TorchTrainer``, ``ScalingConfig(num_workers=W, use_gpu=...)``; process group gloo
on the CPU, NCCL on CUDA) and returns rank 0's :class:`~learner.data_parallel.DataParallelResult`.
Every worker (:func:`_worker_loop`) builds the same policy and global batches, takes its stratified
shard (:func:`~learner.data_parallel.shard`), wraps the policy in ``DistributedDataParallel`` (also at
W = 1, so one code path) and runs the shared timed loop (:func:`~learner.data_parallel.timed_updates`):
DDP all-reduces (averages) the gradients during backward, and every worker takes the same optimizer
step. :func:`ray_session` connects to Ray or starts a private local one.

Invariants (stated in :mod:`learner.data_parallel`): the ranks' weights are checked identical every
``verify_every`` steps and at the end (max minus min of every parameter across ranks, all-reduced,
must be 0), and each rank's final weights digest is reported. Profiling (:func:`_profile`) and the
stand-alone all-reduce timing (:func:`_allreduce_time`) run after the final check, untimed.

Ray ships :func:`_worker_loop` to its workers by reference (this module's path), so it stays a
module-level function; Ray, Ray Train, torch.distributed and safetensors are imported inside the
functions that use them, so importing this module does not import Ray.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import tempfile
import time
import uuid
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from fleetloop.errors import InvalidArgument
from learner.algorithms import Algorithm
from learner.batch import Batch
from learner.data_parallel import (DataParallelConfig, DataParallelResult, build_algorithm, flat_params,
                                   make_global_batch, shard, sync_device, timed_updates, usable_cores, weights_digest)

RESULT_FILE = "result.json"
WEIGHTS_FILE = "policy.safetensors"


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
            sync_device(algo.device)
            t0 = time.perf_counter()
            algo.update(batches[i % len(batches)])
            sync_device(algo.device)
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
            sync_device(algo.device)
            t0 = time.perf_counter()
            algo.update(batches[i % len(batches)])
            sync_device(algo.device)
            local.append(time.perf_counter() - t0)
    return {"synced_step_s": statistics.median(synced), "compute_step_s": statistics.median(local), "profile_top": top}


def _allreduce_time(model: torch.nn.Module, reps: int, device: torch.device) -> float:
    """Median time of ``reps`` all-reduces (sum) of one flat buffer the size of the gradients."""
    import torch.distributed as dist

    buf = torch.zeros(sum(p.numel() for p in model.parameters()), dtype=torch.float32, device=device)
    dist.barrier()
    times = []
    for _ in range(reps):
        sync_device(device)
        t0 = time.perf_counter()
        dist.all_reduce(buf)
        sync_device(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
