"""The evaluation protocol with real processes: `fleetloop eval` end to end on real Meta-World, and
periodic and deferred evaluation in a process pool that never reaches the learner (real learner,
real gRPC). The pure parts are in tests/unit/test_evaluation.py."""

from __future__ import annotations

import json

import pytest

from learner.weight_store import WeightStore
from services.harness.evaluation import EvalPool, PeriodicEvaluator, read_policy_file
from tests.helpers.policy_weights import policy_blob, published_state_dir

RECAP = "fleetloop.policies:recap_mlp_policy"


@pytest.fixture()
def state_dir(tmp_path):
    return published_state_dir(tmp_path)


@pytest.mark.timeout(240)
def test_fleetloop_eval_by_version_with_guidance_beta(tmp_path, capsys):
    """`fleetloop eval --state-dir --version` rebuilds the job's (RECAP, conditioned) policy from its
    policy.json and passes --guidance-beta to the policy runner."""
    from services.cli import main
    from services.harness.experiment_fleet import write_policy_file

    state = tmp_path / "state"
    WeightStore(state / "weights").publish(policy_blob(RECAP), learner_step=0)
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
    from services.harness.experiment_fleet import LocalLearner

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
    blobs = [policy_blob(seed=s) for s in range(6)]
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
    blob = policy_blob(seed=1)
    with EvalPool(1) as pool:
        ev = PeriodicEvaluator(pool, lambda: (7, blob), tmp_path / "snaps", ["reach-v3"], trials=1, interval_s=0.0,
                               eval_kwargs={"max_steps": 10}, deferred=True, target=1.01)
        for t in range(3):
            ev.poll(float(t))
        series = ev.finish()
    assert [p["t"] for p in series] == [0.0, 1.0, 2.0] and [p["reused"] for p in series] == [False, True, True]
    assert ev.skipped == 0 and ev.episodes == 1


