"""Helpers for integration tests: robot actors in threads on the real runtime and Meta-World."""

from __future__ import annotations

import threading
import time

from actor.envs import make_env
from actor.main import robot_specs
from actor.operators import ScriptedExpertOperator
from actor.policy_runner import PolicyRunner
from actor.robot_loop import RobotStats, run_robot
from fleetloop.client.runtime import FleetClient


class RobotThread(threading.Thread):
    """A simulated robot on the real runtime (own spool, own gRPC channel) in a thread."""

    def __init__(self, target: str, actor_id: str, tasks: list[str], spool, token: str | None, episodes: int, seed: int = 0,
                 job: str = "demo") -> None:
        super().__init__(daemon=True, name=actor_id)
        obs, act = robot_specs()
        self.client = FleetClient(target, job, actor_id, obs, act, tasks, credential=token, spool_dir=str(spool))
        self.tasks, self.episodes, self.seed = tasks, episodes, seed
        self.stats: RobotStats | None = None
        self.error: BaseException | None = None
        self.stop_flag = threading.Event()

    def run(self) -> None:
        try:
            run = self.client.connect()
            runner = PolicyRunner(run, 39, 4)
            envs = {t: make_env(t, seed=self.seed + i, max_episode_steps=run.max_episode_steps) for i, t in enumerate(self.tasks)}
            self.stats = run_robot(self.client, runner, envs, lambda e: ScriptedExpertOperator(e), self.seed,
                                   max_episodes=self.episodes, should_stop=self.stop_flag.is_set)
        except BaseException as exc:  # surfaced by the test
            self.error = exc


def wait_until(what: str, cond, timeout: float, robots=(), poll_s: float = 0.05) -> None:
    """Poll ``cond`` until true; fail naming ``what`` on timeout, or at once when a robot thread
    (anything with an ``error`` attribute) has failed."""
    deadline = time.monotonic() + timeout
    while not cond():
        errors = [r.error for r in robots if r.error is not None]
        assert not errors, f"robot failed while waiting for {what}: {errors[0]!r}"
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(poll_s)
