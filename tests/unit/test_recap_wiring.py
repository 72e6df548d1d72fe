"""RECAP wiring: the replay store's per-row episode target columns (success, failure/timeout, running,
demo, interleaved and evicted episodes), the batch and learner assembly paths, RECAP start-up
pretraining, BC-weight lifting, and the actor's classifier-free guidance settings.

Observations encode (step index, episode number) in their first two entries, so every check can see
that a row's columns and its bootstrap observation belong to that row's own episode."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from actor.policy_runner import PolicyRunner
from fleetloop.client.weight_client import VerifiedWeights
from fleetloop.codec import encode as encode_array
from fleetloop.dataset import DemoEpisode, DemoWriter
from fleetloop.errors import FailedPrecondition, InvalidArgument
from fleetloop.policies import COND_NONE, COND_POSITIVE, cfg_mix, mlp_policy, recap_mlp_policy
from fleetloop.v1 import fleetloop_pb2 as pb
from learner.algorithms import make_algorithm
from learner.algorithms.recap import REQUIRED_EXTRA
from learner.algorithms.value import episode_targets
from learner.batch import OFFLINE, ONLINE, Batch
from learner.config import LearnerConfig
from learner.core import LearnerCore
from learner.pretrain import lift_unconditioned, load_initial_weights, pretrain, value_weights_path
from learner.replay import FIELDS, TARGET_COLUMNS, ReplayStore
from learner.staleness import StalenessConfig

OBS, ACT, MAX_LEN, N = 6, 2, 20, 4


def targets_fn(length, outcome):
    return episode_targets(length, outcome, MAX_LEN, N)


def ep_obs(first, t, ep, dim=OBS):
    obs = np.zeros((t, dim), np.float32)
    obs[:, 0] = np.arange(first, first + t)
    obs[:, 1] = ep
    return obs


def add(store, task, ep, first, t, key=None, version=0, inter=False):
    store.add_online(task, ep_obs(first, t, ep), np.zeros((t, ACT), np.float32), np.zeros(t, np.float32),
                     np.full(t, inter), behavior_version=version, episode_key=ep if key is None else key, first_step=first)


def all_rows(store, task, source="online", n=4000, seed=0):
    return store.sample(task, source, n, np.random.default_rng(seed))


def rows_where(out, sel):
    """The rows ``sel`` of a replay sample (``obs`` is a dict of tensors)."""
    return {k: ({n: a[sel] for n, a in v.items()} if isinstance(v, dict) else v[sel]) for k, v in out.items()}


def check_rows(out, outcome, length):
    """Every sampled row of episode-encoded obs matches episode_targets(length, outcome) at its step."""
    want = targets_fn(length, outcome)
    obs, nxt = out["obs"]["state"], out["recap_next_obs.state"]
    step = obs[:, 0].astype(int)
    for k in TARGET_COLUMNS:
        np.testing.assert_allclose(out[k], want[k][step], err_msg=k)
    boot = out["recap_adv_valid"] & (out["recap_bootstrap"] > 0)
    np.testing.assert_array_equal(nxt[boot, 0].astype(int), want["recap_next_step"][step[boot]])
    np.testing.assert_array_equal(nxt[:, 1], obs[:, 1])  # same episode
    np.testing.assert_array_equal(nxt[~boot], obs[~boot])  # no bootstrap: own row


# -- replay columns ----------------------------------------------------------------------------------
@pytest.mark.parametrize("outcome, length", [("success", 13), ("failure", 9), ("timeout", MAX_LEN)])
def test_online_episode_unknown_until_its_outcome_then_labelled(outcome, length):
    s = ReplayStore(["a"], OBS, ACT, online_capacity=500, episode_targets=targets_fn)
    add(s, "a", 1, 0, 5)
    add(s, "a", 1, 5, length - 5)
    out = all_rows(s, "a")
    assert set(out) == set(FIELDS) | set(TARGET_COLUMNS) | {"recap_next_obs.state"}
    assert set(out["obs"]) == {"state"}
    assert not out["recap_adv_valid"].any() and not out["recap_value_mask"].any()  # running: unknown
    assert s.open_episodes("a") == 1
    assert s.end_episode("a", 1, outcome, length) == length
    assert s.open_episodes("a") == 0
    out = all_rows(s, "a")
    check_rows(out, outcome, length)
    assert out["recap_value_mask"].all() and out["recap_adv_valid"].all()  # terminal (timeout as failure)
    if outcome == "success":
        assert out["recap_mc_return"].max() == 0.0 and out["recap_mc_return"].min() > -0.5
    else:
        assert out["recap_mc_return"].max() <= -0.5


def test_running_episode_stays_unknown_beside_finished_ones():
    s = ReplayStore(["a"], OBS, ACT, online_capacity=500, episode_targets=targets_fn)
    add(s, "a", 1, 0, 10)
    add(s, "a", 2, 0, 12)   # still running
    s.end_episode("a", 1, "success", 10)
    out = all_rows(s, "a")
    run = out["obs"]["state"][:, 1] == 2
    assert run.any() and (~run).any()
    assert not out["recap_adv_valid"][run].any() and not out["recap_value_mask"][run].any()
    check_rows(rows_where(out, ~run), "success", 10)


def test_aborted_episode_is_bootstrapped_not_a_value_target():
    s = ReplayStore(["a"], OBS, ACT, online_capacity=500, episode_targets=targets_fn)
    add(s, "a", 3, 0, 8)
    s.end_episode("a", 3, "aborted", 8)
    out = all_rows(s, "a")
    check_rows(out, "aborted", 8)
    assert not out["recap_value_mask"].any()
    last = out["obs"]["state"][:, 0] == 7
    assert not out["recap_adv_valid"][last].any()  # empty window at the last stored step


def test_interleaved_episodes_get_their_own_bootstrap_rows():
    s = ReplayStore(["a"], OBS, ACT, online_capacity=500, episode_targets=targets_fn)
    for first in range(0, 12, 3):  # two robots on the same task: chunks alternate in the ring
        add(s, "a", 1, first, 3)
        add(s, "a", 2, first, 3)
    s.end_episode("a", 1, "success", 12)
    s.end_episode("a", 2, "timeout", 12)
    out = all_rows(s, "a")
    for ep, outcome in ((1, "success"), (2, "timeout")):
        sel = out["obs"]["state"][:, 1] == ep
        check_rows(rows_where(out, sel), outcome, 12)


def test_eviction_before_the_end_labels_only_live_rows_and_never_overwrites():
    s = ReplayStore(["a"], OBS, ACT, online_capacity=20, episode_targets=targets_fn)
    add(s, "a", 1, 0, 15)
    add(s, "a", 2, 0, 10)   # evicts steps 0..4 of episode 1
    add(s, "a", 1, 15, 3)   # evicts more of episode 1
    assert s.end_episode("a", 1, "success", 18) == 10  # steps 8..17 still stored
    out = all_rows(s, "a")
    two = out["obs"]["state"][:, 1] == 2
    assert not out["recap_adv_valid"][two].any()  # episode 2's rows untouched (still running)
    check_rows(rows_where(out, ~two), "success", 18)


def test_missing_bootstrap_step_means_no_advantage():
    s = ReplayStore(["a"], OBS, ACT, online_capacity=500, episode_targets=targets_fn)
    add(s, "a", 1, 0, 5)
    add(s, "a", 1, 10, 10)  # steps 5..9 dropped at ingest (e.g. stale autonomous frames)
    s.end_episode("a", 1, "failure", 20)
    out = all_rows(s, "a")
    step = out["obs"]["state"][:, 0].astype(int)
    want = targets_fn(20, "failure")
    gap = np.isin(want["recap_next_step"][step], np.arange(5, 10))
    assert gap.any() and not out["recap_adv_valid"][gap].any()
    assert out["recap_value_mask"].all()  # the MC return needs no other row
    ok = ~gap
    np.testing.assert_array_equal(out["recap_adv_valid"][ok], want["recap_adv_valid"][step[ok]])


def test_absurd_step_index_is_not_tracked():
    s = ReplayStore(["a"], OBS, ACT, online_capacity=50, episode_targets=targets_fn)
    add(s, "a", 1, 10**12, 3)  # a buggy actor's first_step: no giant allocation, rows stay unknown
    assert s.open_episodes("a") == 0 and s.end_episode("a", 1, "success", 3) == 0
    assert not all_rows(s, "a")["recap_adv_valid"].any()


def test_demos_labelled_from_their_outcome_and_unknown_without_one():
    s = ReplayStore(["a", "b"], OBS, ACT, offline_capacity=100, episode_targets=targets_fn)
    s.add_offline("a", ep_obs(0, 11, 7), np.zeros((11, ACT), np.float32), np.zeros(11, np.float32), np.ones(11, bool),
                  outcome="success")
    s.add_offline("b", ep_obs(0, 6, 8), np.zeros((6, ACT), np.float32), np.zeros(6, np.float32), np.ones(6, bool))
    check_rows(all_rows(s, "a", "offline"), "success", 11)
    assert not all_rows(s, "b", "offline")["recap_adv_valid"].any()


def test_store_without_targets_is_unchanged():
    s = ReplayStore(["a"], OBS, ACT, online_capacity=50)
    add(s, "a", 1, 0, 10)
    assert s.end_episode("a", 1, "success", 10) == 0
    assert set(all_rows(s, "a")) == set(FIELDS)
    assert s.open_episodes("a") == 0


# -- assembly ----------------------------------------------------------------------------------------
def test_batch_from_parts_carries_extra_columns_and_refuses_mixed_ones():
    s = ReplayStore(["a"], OBS, ACT, online_capacity=50, offline_capacity=50, episode_targets=targets_fn)
    add(s, "a", 1, 0, 10)
    s.end_episode("a", 1, "success", 10)
    s.add_offline("a", ep_obs(0, 5, 9), np.zeros((5, ACT), np.float32), np.zeros(5, np.float32), np.ones(5, bool),
                  outcome="success")
    rng = np.random.default_rng(0)
    b = Batch.from_parts([(0, ONLINE, s.sample("a", "online", 7, rng)), (0, OFFLINE, s.sample("a", "offline", 3, rng))])
    assert set(REQUIRED_EXTRA) - {"recap_next_obs"} <= set(b.extra) and len(b) == 10
    assert set(b.extra_obs("recap_next_obs")) == set(b.obs) == {"state"}  # observation-valued: one entry per tensor
    assert b.extra["recap_next_obs.state"].shape == (10, OBS) and b.extra["recap_adv_valid"].dtype == torch.bool
    plain = ReplayStore(["a"], OBS, ACT, online_capacity=50)
    add(plain, "a", 1, 0, 4)
    with pytest.raises(InvalidArgument, match="extra columns"):
        Batch.from_parts([(0, ONLINE, s.sample("a", "online", 2, rng)), (0, ONLINE, plain.sample("a", "online", 2, rng))])


def chunk_pb(job, episode, seq, first, n, ep_no, version=0, end=None, inter=0):
    c = pb.EpisodeChunk(job_id=job, actor_id="r1", episode_id=episode, seq=seq, task_id="reach-v3",
                        behavior_version=version, first_step=first)
    c.observations["state"].CopyFrom(encode_array(ep_obs(first, n, ep_no, 39)))
    c.actions["action"].CopyFrom(encode_array(np.full((n, 4), 0.1, np.float32)))
    c.rewards.CopyFrom(encode_array(np.zeros(n, np.float32)))
    c.interventions.CopyFrom(encode_array(np.arange(n) < inter))
    if end is not None:
        c.end.outcome = end
    return c


def write_demos(root, tasks, n=2, length=30, seed=0):
    rng = np.random.default_rng(seed)
    w = DemoWriter(root, 39, 4)
    for task in tasks:
        for i in range(n):
            obs = rng.normal(size=(length, 39)).astype(np.float32)
            acts = np.tanh(obs[:, :4] * 0.5).astype(np.float32)  # a learnable expert
            w.add(DemoEpisode(f"{task}-{i}", task, obs, acts, np.zeros(length, np.float32), np.ones(length, bool), "success"))
    return root


def recap_core(tmp_path, **kw):
    demos = write_demos(tmp_path / "core_demos", ["reach-v3"])
    params = {"value_pretrain_steps": 30, "policy_pretrain_steps": 20, "n_step": 5, **kw.pop("params", {})}
    cfg = LearnerConfig(job_id="rw", state_dir=tmp_path / "l", tasks=["reach-v3"], batch_size=64, algorithm="recap",
                        policy_factory="fleetloop.policies:recap_mlp_policy", algorithm_params=params,
                        offline_dataset=demos, max_episode_steps=50, **kw)
    return LearnerCore(cfg)


def test_learner_assembles_recap_columns_through_the_staleness_gate(tmp_path):
    core = recap_core(tmp_path, staleness=StalenessConfig(bound=0, policy="drop"))
    assert core.recap_startup["policy_steps"] == 20 and "pretrained" in core.recap_startup["value"]
    core.ingestor.ingest(chunk_pb("rw", "old", 0, 0, 30, 1, version=0, end=pb.SUCCESS), 100, core.version)
    core.publish()  # version 1: episode "old" (v0, autonomous) is now stale past bound 0
    core.ingestor.ingest(chunk_pb("rw", "new", 0, 0, 20, 2, version=1), 100, core.version)
    core.ingestor.ingest(chunk_pb("rw", "new", 1, 20, 20, 2, version=1, end=pb.TIMEOUT), 100, core.version)
    with core.ingestor.lock:
        assert core._sync_episode_ends() == 2
    rng = np.random.default_rng(0)
    parts = [("reach-v3", "online", core.replay.sample("reach-v3", "online", 200, rng)),
             ("reach-v3", "offline", core.replay.sample("reach-v3", "offline", 50, rng))]
    batch, groups = core._assemble(parts, core.version)
    kept_online = batch.obs["state"][batch.source == ONLINE]
    assert (kept_online[:, 1] == 2).all()  # the stale episode was dropped, columns went with it
    assert len(batch) == 50 + int((parts[0][2]["obs"]["state"][:, 1] == 2).sum())
    ex = {k: v.numpy() for k, v in batch.extra.items()}
    online = batch.source.numpy() == ONLINE
    want = episode_targets(40, "timeout", 50, 5)
    step = batch.obs["state"].numpy()[online, 0].astype(int)
    np.testing.assert_allclose(ex["recap_mc_return"][online], want["recap_mc_return"][step])
    boot = ex["recap_adv_valid"] & (ex["recap_bootstrap"] > 0) & online
    np.testing.assert_array_equal(ex["recap_next_obs.state"][boot, 0].astype(int),
                                  want["recap_next_step"][batch.obs["state"].numpy()[boot, 0].astype(int)])
    assert ex["recap_adv_valid"][~online].all()  # demos: labelled from the manifest outcome
    out = core.train_step()
    assert out is not None and out["skipped"] == 0.0 and np.isfinite(out["loss"])
    core.stop(checkpoint=False)


def test_learner_trains_recap_with_frozen_value_and_sends_positive_share(tmp_path):
    core = recap_core(tmp_path, params={"positive_fraction": 0.3, "indicator_dropout": 0.0})
    v0 = {k: v.clone() for k, v in core.algorithm.value.state_dict().items()}
    for e in range(6):
        for seq in range(2):
            end = (pb.SUCCESS if e % 2 else pb.TIMEOUT) if seq == 1 else None
            core.ingestor.ingest(chunk_pb("rw", f"ep{e}", seq, seq * 25, 25, e, end=end), 100, core.version)
    shares = [core.train_step()["positive_share"] for _ in range(30)]
    assert abs(np.mean(shares[10:]) - 0.3) < 0.08, shares
    for k, v in core.algorithm.value.state_dict().items():
        assert torch.equal(v, v0[k]), k  # frozen
    assert core.status()["train_stats"]["forced_share"] > 0  # demos are forced positive
    core.stop(checkpoint=False)


def test_frozen_value_without_weights_or_demos_is_refused(tmp_path):
    cfg = LearnerConfig(job_id="rw", state_dir=tmp_path / "l", tasks=["reach-v3"], algorithm="recap",
                        policy_factory="fleetloop.policies:recap_mlp_policy")
    with pytest.raises(FailedPrecondition, match="value_weights"):
        LearnerCore(cfg)
    cfg = cfg.model_copy(update={"optimisation": cfg.optimisation.model_copy(update={"algorithm_params": {"value_mode": "refit"}}),
                                 "state_dir": tmp_path / "l2"})
    core = LearnerCore(cfg)  # refit learns V online: allowed
    assert core.recap_startup["value"] == "none"
    core.stop(checkpoint=False)


# -- pretraining and initial weights -----------------------------------------------------------------
def test_bc_weights_are_lifted_into_the_conditioned_policy(tmp_path):
    torch.manual_seed(0)
    bc = mlp_policy(39, 4, 2)
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in bc.state_dict().items()}, str(tmp_path / "bc.safetensors"))
    rp = recap_mlp_policy(39, 4, 2)
    meta = load_initial_weights(rp, tmp_path / "bc.safetensors")
    assert meta["lifted"] == "true"
    obs, task = torch.randn(5, 39), torch.tensor([0, 1, 0, 1, 1])
    for cond in (COND_NONE, COND_POSITIVE):
        torch.testing.assert_close(rp(obs, task, torch.full((5,), cond)), bc(obs, task))
    with pytest.raises(InvalidArgument, match="shape"):
        lift_unconditioned(recap_mlp_policy(39, 4, 3), bc.state_dict())


def test_recap_pretrain_trains_the_positive_token_and_writes_the_value(tmp_path):
    demos = write_demos(tmp_path / "demos", ["reach-v3"])
    out = tmp_path / "p.safetensors"
    info = pretrain(demos, ["reach-v3"], out, steps=300, batch_size=64, progress=False, algorithm="recap",
                    algorithm_params={"value_pretrain_steps": 50, "n_step": 5})
    assert info["policy_factory"].endswith("recap_mlp_policy") and value_weights_path(out).exists()
    policy = recap_mlp_policy(39, 4, 1)
    assert load_initial_weights(policy, out)["algorithm"] == "recap"
    from fleetloop.dataset import iter_episodes
    ep = next(iter_episodes(demos))
    obs, task = torch.from_numpy(ep.obs), torch.zeros(len(ep), dtype=torch.long)
    with torch.no_grad():
        pos = policy(obs, task, torch.full((len(ep),), COND_POSITIVE))
        untrained = recap_mlp_policy(39, 4, 1)(obs, task, torch.full((len(ep),), COND_POSITIVE))
    target = torch.from_numpy(ep.actions)
    assert (pos - target).pow(2).mean() < 0.25 * (untrained - target).pow(2).mean()
    # the learner starts from these files without pretraining again
    core = recap_core(tmp_path, initial_weights=out, params={"value_weights": str(value_weights_path(out))})
    assert core.recap_startup["policy_steps"] == 0 and core.recap_startup["value"].startswith("loaded")
    core.stop(checkpoint=False)


# -- actor side ---------------------------------------------------------------------------------------
def run_config(factory, inference):
    return pb.RunConfig(policy_factory=factory, policy_kwargs_json="{}", task_ids=["a", "b"], max_episode_steps=10,
                        inference_json=json.dumps(inference))


def test_policy_runner_applies_guidance_from_inference_json_and_overrides():
    torch.manual_seed(0)
    policy = recap_mlp_policy(OBS, ACT, 2)
    weights = VerifiedWeights(3, "x", {k: v.clone() for k, v in policy.state_dict().items()}, 0, 0.0, 0.0)
    obs = np.random.default_rng(0).normal(size=OBS).astype(np.float32)
    o, t = torch.from_numpy(obs)[None], torch.tensor([1])
    with torch.no_grad():
        pos = policy(o, t, torch.tensor([COND_POSITIVE]))
        unc = policy(o, t, torch.tensor([COND_NONE]))
    settings = {"guidance_beta": 1.0, "eval_guidance_beta": 2.0, "indicator": "positive"}
    runner = PolicyRunner(run_config("fleetloop.policies:recap_mlp_policy", settings), OBS, ACT)
    runner.load(weights)
    assert runner.guidance == 1.0 and runner.eval_guidance_beta == 2.0
    np.testing.assert_allclose(runner.act(obs, "b"), pos[0].numpy(), rtol=1e-6)
    runner.set_guidance(runner.eval_guidance_beta)
    np.testing.assert_allclose(runner.act(obs, "b"), cfg_mix(unc, pos, 2.0, -1, 1)[0].numpy(), rtol=1e-6)
    assert runner.guided_actions == 2
    ev = PolicyRunner(run_config("fleetloop.policies:recap_mlp_policy", settings), OBS, ACT, guidance_beta=0.0)
    ev.load(weights)
    np.testing.assert_allclose(ev.act(obs, "b"), unc[0].numpy(), rtol=1e-6)
    with pytest.raises(ValueError):
        ev.set_guidance(-1.0)
    plain = PolicyRunner(run_config("fleetloop.policies:mlp_policy", {}), OBS, ACT)
    plain.act(obs, "a")
    assert plain.guided_actions == 0 and plain.guidance == 1.0
