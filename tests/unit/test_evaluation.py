"""The evaluation protocol: which weights (version, checkpoint, file), `fleetloop eval` end to end on
real Meta-World, and periodic evaluation that never reaches the learner (real learner, real gRPC)."""

from __future__ import annotations

import json

import pytest
import torch

from fleetloop.errors import IntegrityError, InvalidArgument, NotFound
from fleetloop.policies import build_policy
from fleetloop.weights import state_dict_to_blob
from learner.weight_store import WeightStore
from services.evaluation import EvalPool, PeriodicEvaluator, read_policy_file, resolve_weights

MLP = "fleetloop.policies:mlp_policy"
RECAP = "fleetloop.policies:recap_mlp_policy"


def _blob(factory=MLP, seed=0, tasks=1):
    torch.manual_seed(seed)
    return state_dict_to_blob(build_policy(factory, {}, 39, 4, tasks).state_dict())


@pytest.fixture()
def state_dir(tmp_path):
    store = WeightStore(tmp_path / "state" / "weights")
    for seed in range(3):
        store.publish(_blob(seed=seed), learner_step=seed * 10)
    return tmp_path / "state"


def test_version_from_a_state_dir(state_dir):
    assert resolve_weights(state_dir=state_dir, version=1) == state_dir / "weights" / "v1.safetensors"
    assert resolve_weights(state_dir=state_dir, version="latest").name == "v2.safetensors"
    with pytest.raises(NotFound, match="version 7"):
        resolve_weights(state_dir=state_dir, version=7)


def test_a_version_whose_bytes_do_not_match_the_index_is_refused(state_dir):
    (state_dir / "weights" / "v1.safetensors").write_bytes(_blob(seed=9))
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


@pytest.mark.timeout(240)
def test_fleetloop_eval_by_version_with_guidance_beta(tmp_path, capsys):
    """`fleetloop eval --state-dir --version` rebuilds the job's (RECAP, conditioned) policy from its
    policy.json and passes --guidance-beta to the policy runner."""
    from services.cli import main
    from services.experiment_fleet import write_policy_file

    state = tmp_path / "state"
    WeightStore(state / "weights").publish(_blob(RECAP), learner_step=0)
    write_policy_file(state, RECAP, {}, ["reach-v3"])
    assert read_policy_file(state)["policy_factory"] == RECAP
    out = tmp_path / "eval.json"
    rc = main(["eval", "--state-dir", str(state), "--version", "0", "--trials", "2", "--max-steps", "15",
               "--guidance-beta", "1.5", "--workers", "1", "--out", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["policy_factory"] == RECAP and res["guidance_beta"] == 1.5
    r = res["tasks"]["reach-v3"]
    assert r["trials"] == 2 and r["guidance_beta"] == 1.5 and 0.0 <= r["success_rate"] <= 1.0
    assert r["mean_length"] <= 15 and r["episodes_per_hour"] == pytest.approx(3600 / (r["mean_length"] / 30.0))
    assert json.loads(capsys.readouterr().out)["mean_success"] == res["mean_success"]


@pytest.mark.timeout(240)
def test_periodic_evaluation_never_reaches_the_learner(tmp_path):
    """A real learner (core + gRPC server) and periodic evaluations of its versions on worker
    processes: the learner stores no step, sees no episode and no actor; a version evaluated once is
    reused; a new version is evaluated again; points are in time order."""
    from learner.config import LearnerConfig
    from services.experiment_fleet import LocalLearner

    cfg = LearnerConfig(job_id="evaltest", state_dir=tmp_path / "learner", tasks=["reach-v3"], robot_tokens=["t"])
    learner = LocalLearner(cfg, train=False)
    try:
        before = learner.counts()
        with EvalPool(1) as pool:
            ev = PeriodicEvaluator(pool, learner.snapshot, tmp_path / "snaps", ["reach-v3"], trials=2, interval_s=0.0,
                                   eval_kwargs={"max_steps": 20, "hz": 30.0})
            ev.poll(0.0, {"robot_steps": 0})
            ev.finish()
            ev.poll(1.0, {"robot_steps": 0})          # same version: reused, nothing run
            learner.core.publish()
            ev.poll(2.0, {"robot_steps": 0})          # new version: evaluated
            series = ev.finish()
        after = learner.counts()
        assert [p["version"] for p in series] == [0, 0, 1] and [p["reused"] for p in series] == [False, True, False]
        assert [p["t"] for p in series] == [0.0, 1.0, 2.0] and all(0.0 <= p["mean"] <= 1.0 for p in series)
        assert ev.episodes == 4 and (tmp_path / "snaps" / "v1.safetensors").is_file()
        assert after["robot_steps"] == before["robot_steps"] == 0 and after["episodes"] == 0
        assert learner.core.replay.size("reach-v3", "online") == 0 and not learner.servicer.sessions
    finally:
        learner.stop()


@pytest.mark.timeout(240)
def test_deferred_evaluation_snapshots_during_the_run_and_evaluates_after(tmp_path):
    """Deferred mode: polls only copy snapshots (nothing is evaluated while the run goes on); finish()
    evaluates them in time order, every one up to the first that reaches the target, then a sparse
    curve (evenly spaced plus the last), counting the skipped ones."""
    blobs = [_blob(seed=s) for s in range(6)]
    current = {"v": 0}
    with EvalPool(1) as pool:
        ev = PeriodicEvaluator(pool, lambda: (current["v"], blobs[current["v"]]), tmp_path / "snaps", ["reach-v3"],
                               trials=2, interval_s=1.0, eval_kwargs={"max_steps": 10, "hz": 30.0}, deferred=True,
                               target=0.0, curve_points_after=2)
        for t in range(6):
            current["v"] = t
            ev.poll(float(t), {"robot_steps": 100 * t})
            ev.poll(t + 0.5, {"robot_steps": 100 * t + 50})  # not due: no snapshot
            assert ev.series == [] and ev.episodes == 0 and ev._pending is None
        assert sorted(p.name for p in (tmp_path / "snaps").iterdir()) == [f"v{v}.safetensors" for v in range(6)]
        done: list[tuple[int, int]] = []
        series = ev.finish(lambda d, n: done.append((d, n)))
    # target 0.0 is reached by the first snapshot; 5 left, 2 curve points: stride 3 -> snapshots 3 and 5 (the last)
    assert [p["version"] for p in series] == [0, 3, 5] and [p["t"] for p in series] == [0.0, 3.0, 5.0]
    assert [p["robot_steps"] for p in series] == [0, 300, 500] and all(p["deferred"] for p in series)
    assert ev.skipped == 3 and ev.episodes == 6 and done == [(1, 6), (2, 6), (3, 6)]


@pytest.mark.timeout(240)
def test_deferred_evaluation_scans_every_snapshot_until_the_target(tmp_path):
    """An unreachable target: every snapshot is evaluated; a version seen twice is evaluated once."""
    blob = _blob(seed=1)
    with EvalPool(1) as pool:
        ev = PeriodicEvaluator(pool, lambda: (7, blob), tmp_path / "snaps", ["reach-v3"], trials=1, interval_s=0.0,
                               eval_kwargs={"max_steps": 10}, deferred=True, target=1.01)
        for t in range(3):
            ev.poll(float(t))
        series = ev.finish()
    assert [p["t"] for p in series] == [0.0, 1.0, 2.0] and [p["reused"] for p in series] == [False, True, True]
    assert ev.skipped == 0 and ev.episodes == 1


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
    from services.experiment_metrics import time_to_target
    means = [0.5, 0.6, 0.6, 0.7, 0.7, 0.75, 0.8, 0.7, 0.85, 0.9, 0.9, 0.95]  # 7 dips below after the first hit
    blobs = {v: _blob(seed=0) for v in range(len(means))}
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
    blob = _blob()
    current = {"v": 0}
    ev = PeriodicEvaluator(pool, lambda: (current["v"], blob), tmp_path / "snaps", ["reach-v3"], trials=1, interval_s=1.0,
                           deferred=True, target=0.8, coarse_stride=3)
    for v in range(8):
        current["v"] = v
        ev.poll(float(v))
    ev.finish()
    assert pool.asked == [0, 3, 6, 7] and ev.skipped == 4
