"""RECAP's pure pieces: value targets, bins, N-step advantages, thresholds, forced positives,
indicator dropout, CFG mixing, frozen vs refit value, and end-to-end updates."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetloop.errors import InvalidArgument
from fleetloop.policies import COND_NEGATIVE, COND_NONE, COND_POSITIVE, cfg_mix, guided_action, mlp_policy, recap_mlp_policy
from learner.algorithms import ALGORITHMS, RecapAlgorithm, make_algorithm
from learner.algorithms.recap import REQUIRED_EXTRA, ThresholdTracker, assign_indicators, drop_indicators, forced_positive
from learner.algorithms.value import (DistributionalValue, ValueEpisode, bin_centers, episode_rewards, episode_targets,
                                      gather_next_obs, mc_returns, normalised_returns, normaliser, nstep_advantages,
                                      pretrain_value, project)
from learner.batch import OFFLINE, ONLINE, Batch

OBS, ACT, TASKS = 6, 3, 2


# -- rewards, returns, normalisation ----------------------------------------------------------------
def test_returns_and_normalisation_hand_computed():
    # max_len 10, C_fail = -10, Z = 20
    assert normaliser(10, 1.0) == 20.0
    assert episode_rewards(4, "success", 10).tolist() == [-1, -1, -1, 0]
    assert mc_returns(np.array([-1.0, -1, -1, 0])).tolist() == [-3, -2, -1, 0]
    np.testing.assert_allclose(normalised_returns(4, "success", 10), [-0.15, -0.10, -0.05, 0.0], atol=1e-7)
    assert episode_rewards(3, "failure", 10).tolist() == [-1, -1, -10]
    np.testing.assert_allclose(normalised_returns(3, "failure", 10), [-0.60, -0.55, -0.50], atol=1e-7)
    # timeout: failure by default, truncated on request (no penalty, not a value target)
    assert episode_rewards(10, "timeout", 10)[-1] == -10
    assert episode_rewards(10, "timeout", 10, timeout_as="truncated")[-1] == -1
    assert not episode_targets(10, "timeout", 10, 3, timeout_as="truncated")["recap_value_mask"].any()
    assert episode_targets(10, "timeout", 10, 3)["recap_value_mask"].all()
    # the worst possible episode stays in [-1, 0]
    worst = normalised_returns(10, "failure", 10)
    assert worst.min() >= -1.0 and worst.max() <= 0.0
    with pytest.raises(InvalidArgument, match="outcome"):
        episode_rewards(3, "exploded", 10)


@pytest.mark.parametrize("how", ["two_hot", "one_hot"])
def test_bin_projection_sums_to_one_and_expectation(how):
    targets = torch.tensor([-1.0, -0.6, -0.55, -0.123456, -0.0025, 0.0, 0.3, -1.7])
    p = project(targets, 201, how)
    assert p.shape == (8, 201)
    torch.testing.assert_close(p.sum(dim=1), torch.ones(8))
    assert (p >= 0).all()
    expect = p @ bin_centers(201)
    clipped = targets.clamp(-1, 0)
    if how == "two_hot":
        torch.testing.assert_close(expect, clipped, atol=1e-6, rtol=0)
    else:
        assert (expect - clipped).abs().max() <= 0.0025 + 1e-6  # half a bin


def test_value_expectation_in_range_and_pretraining_fits_returns():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    eps = []
    for i in range(12):  # the observation encodes progress and outcome: V can learn the return exactly
        t_len = int(rng.integers(5, 20))
        outcome = "success" if i % 3 else "failure"
        obs = np.zeros((t_len, OBS), np.float32)
        obs[:, 0] = np.arange(t_len) / 20.0
        obs[:, 1] = t_len / 20.0
        obs[:, 2] = outcome == "success"
        eps.append(ValueEpisode(obs, i % TASKS, outcome, 20))
    value = DistributionalValue(OBS, TASKS, (64, 64), 201)
    losses = pretrain_value(value, eps, steps=300, batch_size=128, lr=3e-3)
    assert np.mean(losses[-20:]) < 0.7 * np.mean(losses[:20])
    ep = eps[1]
    v = value.value(torch.from_numpy(ep.obs), torch.full((len(ep.obs),), ep.task)).detach().numpy()
    assert (v >= -1).all() and (v <= 0).all()
    np.testing.assert_allclose(v, normalised_returns(len(ep.obs), ep.outcome, 20), atol=0.08)


# -- N-step advantages -------------------------------------------------------------------------------
def test_nstep_with_episode_end_inside_window():
    # success episode of 5 steps, N = 3, max_len 10 -> Z = 20, r/Z = [-.05, -.05, -.05, -.05, 0]
    tg = episode_targets(5, "success", 10, 3)
    np.testing.assert_allclose(tg["recap_nstep_reward"], [-0.15, -0.15, -0.10, -0.05, 0.0], atol=1e-7)
    assert tg["recap_next_step"].tolist() == [3, 4, -1, -1, -1]
    assert tg["recap_bootstrap"].tolist() == [1, 1, 0, 0, 0]
    assert tg["recap_adv_valid"].all()
    values = np.array([-0.3, -0.2, -0.1, -0.05, -0.01])
    adv = nstep_advantages(tg, values)
    np.testing.assert_allclose(adv, [-0.15 - 0.05 + 0.3, -0.15 - 0.01 + 0.2, -0.10 + 0.1, -0.05 + 0.05, 0.0 + 0.01],
                               atol=1e-6)
    # failure: the penalty is inside the window of the last frames
    tf = episode_targets(4, "failure", 10, 2)
    np.testing.assert_allclose(tf["recap_nstep_reward"], [-0.10, -0.10, -0.55, -0.50], atol=1e-6)
    assert tf["recap_bootstrap"].tolist() == [1, 1, 0, 0]
    assert tf["recap_next_step"].tolist() == [2, 3, -1, -1]
    # truncated: window shortened to the last stored observation, then bootstrapped; last frame unknown
    tt = episode_targets(5, "aborted", 10, 3)
    assert tt["recap_next_step"].tolist() == [3, 4, 4, 4, -1]
    assert tt["recap_bootstrap"].tolist() == [1, 1, 1, 1, 0]
    assert tt["recap_adv_valid"].tolist() == [True, True, True, True, False]
    np.testing.assert_allclose(tt["recap_nstep_reward"], [-0.15, -0.15, -0.10, -0.05, 0.0], atol=1e-7)
    # running: only frames with their full window stored are valid
    tr = episode_targets(5, None, 10, 3)
    assert tr["recap_adv_valid"].tolist() == [True, True, False, False, False]
    obs = np.arange(5, dtype=np.float32)[:, None].repeat(OBS, 1)
    assert gather_next_obs(obs, tg["recap_next_step"])[:, 0].tolist() == [3, 4, 2, 3, 4]


def test_batch_advantages_match_episode_advantages():
    alg = make()
    t_len = 9
    obs = np.random.default_rng(1).standard_normal((t_len, OBS)).astype(np.float32)
    tg = alg.episode_targets(t_len, "success", max_len=12)
    b = batch_from_episode(obs, tg, task=1)
    with torch.no_grad():
        v = alg.value.value(torch.from_numpy(obs), torch.ones(t_len, dtype=torch.long)).numpy()
    np.testing.assert_allclose(alg.advantages(b).numpy(), nstep_advantages(tg, v), atol=1e-5)


# -- threshold ---------------------------------------------------------------------------------------
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), frac=st.floats(0.1, 0.9), dist=st.sampled_from(["normal", "uniform", "exponential"]),
       scale=st.floats(1e-3, 10.0), loc=st.floats(-5.0, 5.0), batch=st.integers(8, 128), window=st.integers(256, 2048))
def test_threshold_gives_target_positive_share(seed, frac, dist, scale, loc, batch, window):
    rng = np.random.default_rng(seed)
    tracker = ThresholdTracker(frac, window)
    draw = {"normal": rng.normal, "uniform": lambda loc, scale, size: rng.uniform(loc, loc + scale, size),
            "exponential": lambda loc, scale, size: loc + rng.exponential(scale, size)}[dist]
    positives = total = 0
    for i in range(6000 // batch):
        adv = draw(loc, scale, batch)
        tracker.add(0, adv)
        eps = tracker.threshold(0)
        if i * batch >= window:  # after the window first fills
            positives += int((adv > eps).sum())
            total += batch
        kept = tracker.values(0)
        assert abs(float((kept > eps).mean()) - frac) <= 1.0 / len(kept) + 1e-9  # exact on the window
    assert total > 0 and abs(positives / total - frac) < 0.07


def test_threshold_per_task_window_and_state_roundtrip():
    tr = ThresholdTracker(0.25, 100)
    tr.add(0, np.arange(1000.0))
    tr.add(1, -np.arange(10.0))
    assert sorted(tr.values(0)) == list(np.arange(900.0, 1000.0))
    assert tr.threshold(0) == pytest.approx(np.quantile(np.arange(900.0, 1000.0), 0.75))
    assert tr.threshold(2) is None
    tr2 = ThresholdTracker(0.25, 100)
    tr2.load_state_dict(tr.state_dict())
    assert tr2.threshold(0) == tr.threshold(0) and tr2.threshold(1) == tr.threshold(1)
    tr.add(0, [5000.0]); tr2.add(0, [5000.0])  # noqa: E702
    assert tr2.threshold(0) == tr.threshold(0)
    with pytest.raises(InvalidArgument):
        tr.add(0, [float("nan")])


# -- indicators --------------------------------------------------------------------------------------
def test_forced_positives_for_interventions_and_demos():
    iv = torch.tensor([True, False, True, False, False])
    src = torch.tensor([ONLINE, ONLINE, OFFLINE, OFFLINE, ONLINE], dtype=torch.uint8)
    assert forced_positive(iv, src).tolist() == [True, False, True, True, False]
    assert forced_positive(iv, src, force_interventions=False).tolist() == [False, False, True, True, False]
    assert forced_positive(iv, src, force_demos=False).tolist() == [True, False, False, False, False]
    adv = torch.tensor([-5.0, 1.0, -5.0, -5.0, -1.0])
    valid = torch.tensor([True, True, True, True, False])
    ind = assign_indicators(adv, torch.zeros(5), valid, forced_positive(iv, src))
    assert ind.tolist() == [COND_POSITIVE, COND_POSITIVE, COND_POSITIVE, COND_POSITIVE, COND_NONE]
    ind = assign_indicators(adv, torch.zeros(5), valid, torch.zeros(5, dtype=torch.bool))
    assert ind.tolist() == [COND_NEGATIVE, COND_POSITIVE, COND_NEGATIVE, COND_NEGATIVE, COND_NONE]


def test_algorithm_labels_force_positive_whatever_the_advantage():
    alg = make({"indicator_dropout": 0.0})
    b = random_batch(400, seed=3)
    lab = alg.label(b)
    forced = (b.interventions & (b.source == ONLINE)) | (b.source == OFFLINE)
    assert forced.any() and (lab["indicator"][forced] == COND_POSITIVE).all()
    free = ~forced & b.extra["recap_adv_valid"]
    share = (lab["indicator"][free] == COND_POSITIVE).float().mean().item()
    assert abs(share - alg.config.positive_fraction) < 0.05
    assert (lab["indicator"][~b.extra["recap_adv_valid"] & ~forced] == COND_NONE).all()


def test_indicator_dropout_rate_and_unknown_token():
    g = torch.Generator().manual_seed(0)
    tokens = torch.tensor([COND_POSITIVE, COND_NEGATIVE]).repeat(50_000)
    out = drop_indicators(tokens, 0.3, g)
    dropped = out != tokens
    assert abs(dropped.float().mean().item() - 0.3) < 0.01
    assert (out[dropped] == COND_NONE).all() and (out[~dropped] == tokens[~dropped]).all()
    assert torch.equal(drop_indicators(tokens, 0.0, g), tokens)


# -- CFG ---------------------------------------------------------------------------------------------
def test_cfg_mixing_endpoints_and_linearity():
    torch.manual_seed(0)
    u, c = torch.randn(16, ACT), torch.randn(16, ACT)
    torch.testing.assert_close(cfg_mix(u, c, 0.0), u)
    torch.testing.assert_close(cfg_mix(u, c, 1.0), c)
    for beta in (0.5, 1.5, 2.5):
        torch.testing.assert_close(cfg_mix(u, c, beta), u + beta * (c - u))
        torch.testing.assert_close(cfg_mix(u, c, beta) - cfg_mix(u, c, beta - 0.5), 0.5 * (c - u))
    assert cfg_mix(u * 10, c * 10, 2.5, -1.0, 1.0).abs().max() <= 1.0
    policy = recap_mlp_policy(OBS, ACT, TASKS, hidden=[16])
    obs, task = torch.randn(4, OBS), torch.tensor([0, 1, 0, 1])
    with torch.no_grad():
        pos = policy(obs, task, torch.full((4,), COND_POSITIVE))
        unc = policy(obs, task, torch.full((4,), COND_NONE))
    torch.testing.assert_close(guided_action(policy, obs, task, 1.0), pos)
    torch.testing.assert_close(guided_action(policy, obs, task, 0.0), unc)
    torch.testing.assert_close(guided_action(policy, obs, task, 2.0), torch.clamp(2 * pos - unc, -1, 1))


# -- the algorithm -----------------------------------------------------------------------------------
def test_registry_config_and_policy_checks():
    assert ALGORITHMS["recap"] is RecapAlgorithm
    alg = make()
    assert alg.eligible("online") == {"interventions_only": False} == alg.eligible("offline")
    assert alg.default_staleness().policy == "admit"
    assert alg.inference() == {"guidance_beta": 1.0}
    assert make({"eval_guidance_beta": 2.0}).inference(evaluation=True) == {"guidance_beta": 2.0}
    for bad in ({"positive_fraction": 1.5}, {"indicator_dropout": 1.0}, {"num_bins": 1}, {"value_mode": "x"},
                {"betas": [0.9, 1.0]}, {"value_hidden": [0]}, {"nope": 1}):
        with pytest.raises(InvalidArgument, match=r"algorithm_params\."):
            make(bad)
    with pytest.raises(InvalidArgument, match="conditioned"):
        make_algorithm("recap", mlp_policy(OBS, ACT, TASKS), {}, "cpu")
    b = random_batch(8)
    del b.extra["recap_next_obs"]
    with pytest.raises(InvalidArgument, match="recap_next_obs"):
        alg.update(b)


def test_frozen_value_does_not_change_refit_does():
    b = random_batch(256, seed=1)
    frozen = make({"value_mode": "frozen"})
    before = [p.detach().clone() for p in frozen.value.parameters()]
    for _ in range(3):
        frozen.update(b)
    assert all(torch.equal(a, p) for a, p in zip(before, frozen.value.parameters()))
    assert all(not p.requires_grad for p in frozen.value.parameters())
    refit = make({"value_mode": "refit", "value_lr": 1e-2})
    before = [p.detach().clone() for p in refit.value.parameters()]
    r = refit.update(b)
    assert "value_loss" in r.stats
    assert any(not torch.equal(a, p) for a, p in zip(before, refit.value.parameters()))


def test_update_lowers_loss_and_reports_per_sample_loss():
    alg = make({"lr": 3e-3, "value_mode": "refit"})
    b = random_batch(256, seed=2)
    first = [alg.update(b) for _ in range(5)]
    for _ in range(60):
        last = alg.update(b)
    assert last.per_sample_loss.shape == (256,) and last.per_sample_loss.dtype == np.float32
    assert np.isfinite(last.per_sample_loss).all()
    assert last.loss < 0.5 * np.mean([r.loss for r in first])
    assert alg.step == 65 and last.stats["skipped"] == 0.0
    assert abs(last.stats["dropped_share"] / (1 - last.stats["unknown_share"] + 1e-9) - 0.3) < 0.15


def test_state_dict_roundtrip(tmp_path):
    from learner.checkpoint import load_latest, save_checkpoint
    a = make({"value_mode": "refit"})
    b = random_batch(64)
    a.update(b)
    save_checkpoint(tmp_path, a.step, {"algorithm": a.state_dict()})  # no pickle: tensors + JSON only
    state = load_latest(tmp_path)[1]["algorithm"]
    c = make({"value_mode": "refit"}, seed=5)
    c.load_state_dict(state)
    assert c.step == a.step
    assert all(torch.equal(x, y) for x, y in zip(a.value.parameters(), c.value.parameters()))
    assert c.thresholds.threshold(0) == a.thresholds.threshold(0)
    ra, rc = a.update(b), c.update(b)
    assert math.isclose(ra.loss, rc.loss, rel_tol=1e-5)


# -- helpers -----------------------------------------------------------------------------------------
def make(params=None, seed=0) -> RecapAlgorithm:
    torch.manual_seed(seed)
    return make_algorithm("recap", recap_mlp_policy(OBS, ACT, TASKS, hidden=[32, 32]),
                          {"value_hidden": [32, 32], "n_step": 3, "max_episode_steps": 20, **(params or {})}, "cpu")


def batch_from_episode(obs: np.ndarray, tg: dict, task: int) -> Batch:
    n = len(obs)
    extra = {k: tg[k] for k in REQUIRED_EXTRA if k in tg}
    extra["recap_next_obs"] = gather_next_obs(obs, tg["recap_next_step"])
    return Batch.from_numpy(obs=obs, actions=np.zeros((n, ACT), np.float32), task=np.full(n, task),
                            interventions=np.zeros(n, bool), source=np.full(n, ONLINE, np.uint8),
                            versions=np.zeros(n, np.int64), rewards=np.zeros(n, np.float32), extra=extra)


def random_batch(n: int = 64, seed: int = 0) -> Batch:
    """Random episodes (mixed outcomes, sources, interventions) cut into one batch of n frames."""
    rng = np.random.default_rng(seed)
    w_map = np.random.default_rng(123).standard_normal((OBS, ACT)).astype(np.float32) * 0.5
    cols: dict[str, list] = {k: [] for k in ("obs", "task", "iv", "src", *REQUIRED_EXTRA)}
    size = 0
    while size < n:
        t_len = int(rng.integers(3, 20))
        outcome = str(rng.choice(["success", "failure", "timeout", "aborted"]))
        obs = rng.standard_normal((t_len, OBS)).astype(np.float32)
        tg = episode_targets(t_len, outcome, 20, 3)
        src = OFFLINE if rng.random() < 0.2 else ONLINE
        cols["obs"].append(obs)
        cols["task"].append(np.full(t_len, rng.integers(0, TASKS)))
        cols["iv"].append(rng.random(t_len) < (1.0 if src == OFFLINE else 0.15))
        cols["src"].append(np.full(t_len, src, np.uint8))
        for k in REQUIRED_EXTRA:
            cols[k].append(gather_next_obs(obs, tg["recap_next_step"]) if k == "recap_next_obs" else tg[k])
        size += t_len
    cat = {k: np.concatenate(v)[:n] for k, v in cols.items()}
    actions = np.tanh(cat["obs"] @ w_map).astype(np.float32)
    return Batch.from_numpy(obs=cat["obs"], actions=actions, task=cat["task"], interventions=cat["iv"], source=cat["src"],
                            versions=np.zeros(n, np.int64), rewards=np.zeros(n, np.float32),
                            extra={k: cat[k] for k in REQUIRED_EXTRA})


@pytest.mark.gpu
def test_update_on_cuda_matches_contract():
    torch.manual_seed(0)
    alg = make_algorithm("recap", recap_mlp_policy(OBS, ACT, TASKS, hidden=[32, 32]),
                         {"value_hidden": [32], "n_step": 3, "value_mode": "refit"}, "cuda")
    b = random_batch(128).to("cuda")
    first = alg.update(b)
    for _ in range(30):
        last = alg.update(b)
    assert last.loss < first.loss and last.per_sample_loss.shape == (128,)
    assert all(p.is_cuda for p in alg.value.parameters())
    state = alg.state_dict()
    assert all(not v.is_cuda for v in state["value"].values())
    alg.load_state_dict(state)
    obs, task = b.obs[:4], b.task[:4]
    assert guided_action(alg.policy, obs, task, 2.0).is_cuda
