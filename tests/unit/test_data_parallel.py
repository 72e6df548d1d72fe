"""learner.data_parallel without Ray: config checks, the stratified batch layout, and the invariant
that makes data parallelism exact (averaging the shards' HG-DAgger gradients gives the gradient of
the whole global batch). The Ray Train runs are in tests/integration/test_data_parallel.py."""

import argparse

import pytest
import torch
from pydantic import ValidationError

from fleetloop.errors import InvalidArgument
from learner.batch import OFFLINE, ONLINE
from learner.data_parallel import (DataParallelConfig, build_algorithm, make_global_batch, run_single_process, shard,
                                   weights_digest)

SMALL = dict(global_batch_size=64, steps=4, warmup_steps=1, batch_pool=2, policy_kwargs={"hidden": [32, 32]})


def test_config_errors_name_field_and_value():
    with pytest.raises(ValidationError, match="global_batch_size 255 must be a multiple of num_workers 2"):
        DataParallelConfig(num_workers=2, global_batch_size=255)
    with pytest.raises(ValidationError, match="strata 3 must be a multiple of num_workers 2"):
        DataParallelConfig(num_workers=2, global_batch_size=96, strata=3)
    with pytest.raises(ValidationError, match="backend 'nccl' needs device 'cuda'"):
        DataParallelConfig(backend="nccl")
    with pytest.raises(ValidationError, match="num_workers"):
        DataParallelConfig(num_workers=0)
    with pytest.raises(ValidationError, match="extra"):
        DataParallelConfig(worker=2)
    cfg = DataParallelConfig(num_workers=2, global_batch_size=64)
    assert cfg.per_worker_batch == 32 and cfg.layout == 2 and cfg.dist_backend == "gloo"
    assert DataParallelConfig(device="cuda").dist_backend == "nccl"
    assert DataParallelConfig(num_workers=2, torch_threads=3).threads(2) == 3


def test_global_batch_is_deterministic_stratified_and_shaped_like_the_learners():
    cfg = DataParallelConfig(num_workers=2, **SMALL)
    a, b = make_global_batch(cfg, 0), make_global_batch(cfg, 0)
    assert len(a) == 64 and set(a.obs) == {"state"} and torch.equal(a.obs["state"], b.obs["state"])
    assert torch.equal(a.interventions, b.interventions)
    assert not torch.equal(a.obs["state"], make_global_batch(cfg, 1).obs["state"])
    a.validate()
    assert a.obs["state"].shape == (64, 39) and a.actions.shape == (64, 4) and a.task.max() < 3
    assert (a.versions[a.source == OFFLINE] == -1).all() and a.interventions[a.source == OFFLINE].all()
    algo = build_algorithm(cfg, torch.device("cpu"))
    shards = [shard(a, r, 2) for r in range(2)]
    assert torch.equal(torch.cat([s.obs["state"] for s in shards]), a.obs["state"])
    # every stratum has the same plan (task, source counts) and the same trainable count
    for field in ("task", "source", "interventions"):
        assert torch.equal(torch.sort(getattr(shards[0], field).long()).values,
                           torch.sort(getattr(shards[1], field).long()).values), field
    counts = [int(algo.trainable_mask(s).sum()) for s in shards]
    assert counts[0] == counts[1] > 0
    assert (shards[0].source == ONLINE).any() and (shards[0].source == OFFLINE).any()
    with pytest.raises(InvalidArgument, match="shard 2 of 2"):
        shard(a, 2, 2)


def test_mean_of_shard_gradients_equals_global_gradient():
    """What DDP computes (average of per-shard gradients) equals the single-process gradient."""
    cfg = DataParallelConfig(num_workers=4, global_batch_size=128, policy_kwargs={"hidden": [32, 32]})
    batch = make_global_batch(cfg, 3)

    def grads(b):
        algo = build_algorithm(cfg, torch.device("cpu"))
        algo.config = algo.config.model_copy(update={"grad_clip": None})
        algo.update(b)
        return [p.grad.clone() for p in algo.policy.parameters()]

    full = grads(batch)
    parts = [grads(shard(batch, r, 4)) for r in range(4)]
    for i, g in enumerate(full):
        avg = sum(p[i] for p in parts) / 4
        torch.testing.assert_close(avg, g, rtol=1e-5, atol=1e-7)


def test_single_process_baseline_trains_and_is_independent_of_worker_count_with_equal_strata():
    two = run_single_process(DataParallelConfig(num_workers=2, torch_threads=1, **SMALL))
    one = run_single_process(DataParallelConfig(num_workers=1, strata=2, torch_threads=1, **SMALL))
    assert two.rank_digests == one.rank_digests  # same global batches, same loop: bit-identical
    assert two.mode == "single_process" and len(two.step_times_s) == 4 and two.samples_per_s > 0
    assert two.grad_bytes > 0 and two.summary()["step_time_median_s"] > 0
    other = run_single_process(DataParallelConfig(num_workers=1, torch_threads=1, **SMALL))  # 1 stratum: other data
    assert other.rank_digests != one.rank_digests
    assert torch.get_num_threads() >= 1


def test_bench_rejects_bad_arguments(capsys):
    from bench.learner_scaling import main

    base = dict(out="unused.json", workers="1,2", batch=256, steps=10, warmup=1, device="cpu", hidden="32",
                profile_steps=0, seed=0)
    for bad, text in ((dict(batch=255), "--batch 255"), (dict(workers="1,x"), "--workers"),
                      (dict(steps=0), "--steps 0"), (dict(hidden="0"), "--hidden")):
        assert main(argparse.Namespace(**{**base, **bad})) == 2
        assert text in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(argparse.Namespace(**{**base, "device": "cuda"})) == 2
        assert "CUDA is not available" in capsys.readouterr().err


def test_digest_changes_with_weights():
    cfg = DataParallelConfig(**SMALL)
    algo = build_algorithm(cfg, torch.device("cpu"))
    d0 = weights_digest(algo.policy)
    assert d0 == weights_digest(build_algorithm(cfg, torch.device("cpu")).policy)
    algo.update(make_global_batch(cfg, 0))
    assert weights_digest(algo.policy) != d0
