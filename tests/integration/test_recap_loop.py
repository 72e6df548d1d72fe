"""RECAP end to end: a real learner (in-process, real gRPC on a free loopback port) with algorithm
``recap`` starts from a behaviour-cloned file recorded from real scripted Meta-World demos, lifts it
into the indicator-conditioned policy and pretrains V and the policy at start-up; two simulated
Meta-World robots on the real actor runtime run guided actions for a few episodes each.

Checked: no training step fails, versions are published, the value function is frozen (parameters
unchanged) or refit (changed) per config, the share of positives among advantage-labelled samples is
near ``positive_fraction``, robots get ``inference_json`` with the configured beta and act through
classifier-free guidance."""

from __future__ import annotations

import json
import logging
import threading
import time

import numpy as np
import pytest
import torch

from actor.demos import record_demos
from actor.envs import make_env
from actor.main import robot_specs
from actor.operators import ScriptedExpertOperator
from actor.policy_runner import PolicyRunner
from actor.robot_loop import RobotStats, run_robot
from fleetloop.client.runtime import FleetClient
from learner.config import LearnerConfig
from learner.pretrain import pretrain
from learner.process import build_learner

pytestmark = [pytest.mark.timeout(300)]
TASKS = ["reach-v3", "drawer-open-v3"]
TOKEN = "tok"
TARGET_POSITIVE = 0.35


class GuidedRobot(threading.Thread):
    """A simulated robot on the real runtime that keeps its RunConfig and PolicyRunner for inspection."""

    def __init__(self, target: str, actor_id: str, spool, episodes: int, seed: int) -> None:
        super().__init__(daemon=True, name=actor_id)
        obs, act = robot_specs()
        self.client = FleetClient(target, "demo", actor_id, obs, act, TASKS, credential=TOKEN, spool_dir=str(spool))
        self.episodes, self.seed = episodes, seed
        self.run_config = None
        self.runner: PolicyRunner | None = None
        self.stats: RobotStats | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.run_config = self.client.connect()
            self.runner = PolicyRunner(self.run_config, 39, 4)
            envs = {t: make_env(t, seed=self.seed + i, max_episode_steps=self.run_config.max_episode_steps)
                    for i, t in enumerate(TASKS)}
            self.stats = run_robot(self.client, self.runner, envs, lambda e: ScriptedExpertOperator(e), self.seed,
                                   max_episodes=self.episodes)
        except BaseException as exc:  # surfaced by the test
            self.error = exc


@pytest.fixture(scope="module")
def offline(tmp_path_factory):
    """Real scripted demos (1 per task) and a short BC pretrain of the plain MLP policy."""
    root = tmp_path_factory.mktemp("recap_offline")
    record_demos(TASKS, 1, root / "demos", seed=0, progress=False)
    pretrain(root / "demos", TASKS, root / "bc.safetensors", steps=300, progress=False)
    return root


@pytest.mark.parametrize("value_mode, beta", [("frozen", 1.0), ("refit", 1.5)])
def test_recap_learner_and_guided_fleet(offline, tmp_path, caplog, value_mode, beta):
    params = {"value_mode": value_mode, "guidance_beta": beta, "positive_fraction": TARGET_POSITIVE,
              "value_pretrain_steps": 300, "policy_pretrain_steps": 200, "threshold_window": 1024}
    cfg = LearnerConfig(state_dir=tmp_path / "learner", tasks=TASKS, robot_tokens=[TOKEN], chunk_steps=25,
                        max_updates_per_s=30, publish_every=10, batch_size=128, algorithm="recap",
                        policy_factory="fleetloop.policies:recap_mlp_policy", algorithm_params=params,
                        initial_weights=offline / "bc.safetensors", offline_dataset=offline / "demos")
    caplog.set_level(logging.INFO)
    impl = build_learner(cfg.model_dump_json()).serve()
    try:
        core = impl.core
        assert core.initial_meta.get("lifted") == "true"  # started from the plain BC file
        assert core.recap_startup["policy_steps"] == 200 and "pretrained" in core.recap_startup["value"]
        v_start = {k: v.detach().clone() for k, v in core.algorithm.value.state_dict().items()}
        robots = [GuidedRobot(f"127.0.0.1:{impl.port}", f"r{i}", tmp_path / f"spool{i}", episodes=4, seed=11 + i)
                  for i in range(2)]
        for r in robots:
            r.start()
        shares: list[float] = []
        while any(r.is_alive() for r in robots):
            share = core.last_stats.get("positive_share")
            if share is not None:
                shares.append(share)
            time.sleep(0.1)
        for r in robots:
            assert r.error is None, repr(r.error)
            assert r.client.flush(30)
        deadline = time.monotonic() + 30  # let the learner train on the fleet's data for a few more steps
        steps_then = core.step
        while core.step < steps_then + 20 and time.monotonic() < deadline:
            share = core.last_stats.get("positive_share")
            if share is not None:
                shares.append(share)
            time.sleep(0.1)
        status = core.status()
        # robots: the learner's inference settings arrived and every action went through guidance
        for r in robots:
            assert json.loads(r.run_config.inference_json) == {"guidance_beta": beta, "eval_guidance_beta": 1.0,
                                                               "indicator": "positive"}
            assert r.runner.guidance == beta and r.runner.conditioned
            assert r.runner.guided_actions == r.stats.steps > 0
            assert r.stats.episodes == 4
        # learner: trained without a failed step, published, labelled
        assert "train_step_failed" not in caplog.text
        assert status["version"] >= 2 and status["step"] >= 20
        assert status["episodes_total"] == 8
        online_labelled = core.replay.sample(TASKS[0], "online", 500, np.random.default_rng(0))["recap_adv_valid"].mean()
        assert online_labelled > 0.5  # ended episodes got their columns
        assert len(shares) >= 10
        # the threshold is the (1 - target) quantile of the window of recent advantages (tested exactly in
        # tests/unit/test_recap.py); a training batch here holds only ~5-10 labelled, non-forced samples drawn
        # from all online data (older episodes too), so each step's share is noisy (sd ~0.17) and the mean
        # over the second half sits within ~0.15 of the target, frozen or refit: a 0.1 band for frozen failed
        # most standalone runs, at commit 0831664 too (0.21 seen). A broken threshold gives 0 or 1.
        tolerance = 0.2
        second_half = float(np.mean(shares[len(shares) // 2:]))
        assert abs(second_half - TARGET_POSITIVE) < tolerance, (second_half, shares)
        changed = any(not torch.equal(v, v_start[k]) for k, v in core.algorithm.value.state_dict().items())
        assert changed == (value_mode == "refit")
        if value_mode == "refit":
            assert "value_loss" in status["train_stats"] or status["train_stats"].get("value_skipped") == 1.0
        for r in robots:
            r.client.close(flush_timeout=0)
    finally:
        impl.stop()
