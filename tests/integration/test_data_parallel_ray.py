"""Data-parallel learner update on real Ray Train workers (TorchTrainer, DDP): 2 gloo workers keep
identical weights and end where 1 worker and the single-process loop end on the same global batches;
the learner-scaling bench writes its JSON document; the NCCL path on a CUDA machine.

One Ray session for the whole test session (``ray_cluster`` in tests/conftest.py, 2 CPUs); Ray
Train start-up is slow on a loaded machine, hence the generous timeouts. No wall-clock assertions.
"""

import argparse
import json
import math

import pytest
import torch

from learner.data_parallel import DataParallelConfig, run_data_parallel, run_single_process

pytestmark = pytest.mark.timeout(900)

SMALL = dict(global_batch_size=64, steps=10, warmup_steps=2, batch_pool=3, strata=2, verify_every=2, profile_steps=2,
             allreduce_reps=2, policy_kwargs={"hidden": [32, 32]})


def _max_diff(a, b):
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_two_gloo_workers_identical_weights_and_same_result_as_one(ray_cluster):
    two = run_data_parallel(DataParallelConfig(num_workers=2, **SMALL))
    assert two.mode == "ray_train" and two.num_workers == 2 and two.backend == "gloo" and two.per_worker_batch == 32
    assert two.torch_threads >= 1
    assert two.weights_identical and two.max_weight_spread == 0.0
    assert two.weight_checks == 6 + 1  # every 2 of 12 steps, and once at the end
    assert len(two.rank_digests) == 2 and len(set(two.rank_digests)) == 1
    assert len(two.step_times_s) == 10 and two.samples_per_s > 0 and two.train_s > 0
    assert two.compute_step_s and two.synced_step_s and two.allreduce_s and two.grad_bytes > 0
    assert two.profile_top and all(len(t) == 3 for t in two.profile_top)
    assert math.isfinite(two.loss_last)

    one = run_data_parallel(DataParallelConfig(num_workers=1, **SMALL))
    assert one.num_workers == 1 and one.weights_identical and one.per_worker_batch == 64
    base = run_single_process(DataParallelConfig(num_workers=1, **SMALL))
    # same initial weights (seed), same global batches, same steps: equal up to float summation order
    assert _max_diff(two.final_state, one.final_state) < 1e-4
    assert _max_diff(two.final_state, base.final_state) < 1e-4
    assert _max_diff(one.final_state, base.final_state) < 1e-4
    assert two.loss_first == pytest.approx(base.loss_first, rel=1e-4)


def test_learner_scaling_bench_writes_its_document(ray_cluster, tmp_path, capsys):
    from bench.learner_scaling import main

    out = tmp_path / "nested" / "learner_scaling.json"
    args = argparse.Namespace(out=str(out), workers="1,2", batch=64, steps=4, warmup=1, device="cpu", hidden="32,32",
                              profile_steps=2, seed=0)
    assert main(args) == 0
    doc = json.loads(out.read_text())
    assert doc["bench"] == "learner-scaling" and doc["command"].startswith("fleetloop bench learner-scaling")
    assert doc["machine"]["cpus_usable"] >= 1 and doc["machine"]["packages"]["torch"]
    assert doc["wall_s"] > 0 and doc["config"]["workers"] == [1, 2] and doc["config"]["ray"]
    assert doc["rows"]
    for r in doc["rows"]:
        assert {"metric", "unit", "actors", "fleetloop", "raw_grpc", "ratio", "better", "note"} <= set(r)
        for key in ("fleetloop", "raw_grpc", "ratio"):
            assert isinstance(r[key], (int, float)) and math.isfinite(r[key]) and r[key] > 0, (r["metric"], key)
    assert len(doc["goals"]) == 2
    for g in doc["goals"]:
        assert g["unit"] == "ratio" and g["target"] > 0 and g["measured"] > 0 and isinstance(g["met"], bool)
        assert g["limit"]
    assert doc["profile"]["what"] and doc["profile"]["top"]
    plot = doc["plots"]["samples_per_s_vs_workers"]
    assert plot["x"] == [1, 2] and all(len(v) == 2 for v in plot["series"].values())
    assert all(v < 1e-4 for v in doc["weight_diff_vs_baseline"].values())
    assert "samples/s" in capsys.readouterr().out


@pytest.mark.gpu
def test_nccl_path_on_cuda(ray_cluster):
    if not ray_cluster.cluster_resources().get("GPU"):
        pytest.skip("the test Ray session has no GPU resource")
    workers = min(2, torch.cuda.device_count())
    cfg = DataParallelConfig(num_workers=workers, device="cuda", **{**SMALL, "strata": 2})
    res = run_data_parallel(cfg)
    assert res.backend == "nccl" and res.device == "cuda" and res.weights_identical
    base = run_single_process(cfg)
    assert _max_diff(res.final_state, base.final_state) < 1e-3
