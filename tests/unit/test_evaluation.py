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
