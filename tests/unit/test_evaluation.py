"""The evaluation protocol's pure parts: which weights (version, checkpoint, file) are evaluated, and
the deferred search over snapshots (a scripted pool: no process, no simulator). `fleetloop eval` on
real Meta-World and the process pool are in tests/integration/test_evaluation_pool.py."""

from __future__ import annotations

import pytest
import torch

from fleetloop.errors import IntegrityError, InvalidArgument, NotFound
from fleetloop.policies import build_policy
from services.harness.evaluation import PeriodicEvaluator, resolve_weights
from tests.helpers.policy_weights import MLP, policy_blob, published_state_dir


@pytest.fixture()
def state_dir(tmp_path):
    return published_state_dir(tmp_path)


def test_version_from_a_state_dir(state_dir):
    assert resolve_weights(state_dir=state_dir, version=1) == state_dir / "weights" / "v1.safetensors"
    assert resolve_weights(state_dir=state_dir, version="latest").name == "v2.safetensors"
    with pytest.raises(NotFound, match="version 7"):
        resolve_weights(state_dir=state_dir, version=7)


def test_a_version_whose_bytes_do_not_match_the_index_is_refused(state_dir):
    (state_dir / "weights" / "v1.safetensors").write_bytes(policy_blob(seed=9))
    with pytest.raises(IntegrityError, match="sha256"):
        resolve_weights(state_dir=state_dir, version=1)


def test_exactly_one_source(state_dir, tmp_path):
    with pytest.raises(InvalidArgument):
        resolve_weights()
    with pytest.raises(InvalidArgument):
        resolve_weights(weights=tmp_path / "w", version=1, state_dir=state_dir)
    with pytest.raises(InvalidArgument, match="state-dir"):
        resolve_weights(version=1)


def test_policy_from_a_checkpoint(tmp_path):
    from safetensors.torch import load_file

    from learner.algorithms import make_algorithm
    from learner.checkpoint import save_checkpoint

    policy = build_policy(MLP, {}, 39, 4, 2)
    algo = make_algorithm("hg_dagger", policy, {}, "cpu")
    save_checkpoint(tmp_path / "checkpoints", 5, {"algorithm": algo.state_dict(), "step": 5})
    save_checkpoint(tmp_path / "checkpoints", 9, {"algorithm": algo.state_dict(), "step": 9})
    newest = resolve_weights(checkpoint=tmp_path, scratch=tmp_path / "out")
    one = resolve_weights(checkpoint=tmp_path / "checkpoints" / "ckpt-000000000005", scratch=tmp_path / "out")
    assert newest.name == "checkpoint-step9.safetensors" and one.name == "checkpoint-step5.safetensors"
    got = load_file(str(newest))
    assert set(got) == set(policy.state_dict()) and all(torch.equal(got[k], v) for k, v in policy.state_dict().items())
    with pytest.raises(NotFound):
        resolve_weights(checkpoint=tmp_path / "out", scratch=tmp_path / "x")


class _ScriptedPool:
    """Stands in for EvalPool in the search-plan test only: the success of snapshot ``v<N>`` is
    ``means[N]`` (real evaluations cannot be steered to cross a target at a chosen snapshot)."""

    def __init__(self, means):
        self.means, self.asked = means, []

    def submit(self, path, tasks, trials, **_):
        from concurrent.futures import Future
        version = int(path.stem[1:])
        self.asked.append(version)
        out = {}
        for t in tasks:
            f = Future()
            f.set_result({"success_rate": self.means[version], "mean_length": 10.0, "episodes_per_hour": 1.0, "trials": trials})
            out[t] = f
        return out


@pytest.mark.parametrize("stride, asked, ttt", [
    (1, [0, 1, 2, 3, 4, 5, 6, 9, 11], 6.0),        # every snapshot to the first hit (6), then a curve: 9 and the last
    (3, [0, 3, 6, 4, 5, 9, 11], 6.0),              # coarse 0, 3, 6 (hit); the gap 4, 5 has none; curve 9, 11
    (4, [0, 4, 8, 5, 6, 9, 11], 6.0),              # coarse hit at 8; refining 5, 6 finds 6 and stops; curve 9, 11
])
def test_deferred_search_finds_the_first_snapshot_reaching_the_target(tmp_path, stride, asked, ttt):
    from services.harness.experiment_metrics import time_to_target
    means = [0.5, 0.6, 0.6, 0.7, 0.7, 0.75, 0.8, 0.7, 0.85, 0.9, 0.9, 0.95]  # 7 dips below after the first hit
    blobs = {v: policy_blob(seed=0) for v in range(len(means))}
    pool = _ScriptedPool(means)
    current = {"v": 0}
    ev = PeriodicEvaluator(pool, lambda: (current["v"], blobs[current["v"]]), tmp_path / "snaps", ["reach-v3"], trials=1,
                           interval_s=1.0, deferred=True, target=0.8, curve_points_after=2, coarse_stride=stride)
    for v in range(len(means)):
        current["v"] = v
        ev.poll(float(v))
    assert pool.asked == []
    series = ev.finish()
    assert pool.asked == asked and ev.skipped == len(means) - len(asked)
    assert time_to_target(series) == ttt and [p["t"] for p in series] == sorted(float(v) for v in asked)


def test_deferred_search_without_a_hit_evaluates_the_coarse_grid_and_the_last(tmp_path):
    pool = _ScriptedPool([0.1] * 8)
    blob = policy_blob()
    current = {"v": 0}
    ev = PeriodicEvaluator(pool, lambda: (current["v"], blob), tmp_path / "snaps", ["reach-v3"], trials=1, interval_s=1.0,
                           deferred=True, target=0.8, coarse_stride=3)
    for v in range(8):
        current["v"] = v
        ev.poll(float(v))
    ev.finish()
    assert pool.asked == [0, 3, 6, 7] and ev.skipped == 4
