"""The Meta-World robot actor: env + operator + policy, on the FleetClient runtime.

One loop per robot process. Per episode: swap to the newest verified policy (between episodes
only), pick the next task (round robin over the robot's tasks), reset with a fresh seed, and let
the policy drive while the operator may take over; every step is recorded with its intervention
flag. ``hz`` paces the loop to wall-clock time like a real controller (0 = as fast as possible).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from actor.envs.base import RobotEnv
from actor.metrics import ActorMetrics
from actor.operators import NoOperator, Operator
from actor.policy_runner import PolicyRunner
from fleetloop.client.runtime import FleetClient
from fleetloop.logs import event, get_logger

log = get_logger("actor.robot")


@dataclass
class RobotStats:
    """What one robot did."""

    episodes: int = 0
    steps: int = 0
    intervention_steps: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    versions_run: list[int] = field(default_factory=list)


def run_episode(env: RobotEnv, runner: PolicyRunner, operator: Operator, task_id: str, seed: int | None,
                recorder=None, hz: float = 0.0) -> tuple[str, int, int]:
    """Run one episode; record steps to ``recorder`` if given. Returns (outcome, steps, intervention steps)."""
    obs = env.reset(seed)
    operator.reset(env)
    period = 1.0 / hz if hz > 0 else 0.0
    next_t = time.monotonic()
    steps = inter = 0
    outcome = "timeout"
    for t in range(env.max_episode_steps):
        decision = operator.decide(obs, runner.act(obs, task_id), t)
        res = env.step(decision.action)
        if recorder is not None:
            recorder.record(obs, np.asarray(decision.action, np.float32), res.reward, decision.intervened)
        steps += 1
        inter += int(decision.intervened)
        obs = res.obs
        if period:
            next_t += period
            delay = next_t - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        if res.done:
            outcome = res.outcome or "timeout"
            break
    return outcome, steps, inter


def run_robot(client: FleetClient, runner: PolicyRunner, envs: dict[str, RobotEnv],
              make_operator: Callable[[RobotEnv], Operator] | None, seed: int, deadline: float | None = None,
              max_episodes: int | None = None, hz: float = 0.0, metrics: ActorMetrics | None = None,
              should_stop: Callable[[], bool] = lambda: False) -> RobotStats:
    """Drive episodes until ``deadline`` (monotonic), ``max_episodes``, ``should_stop()`` or the
    learner announcing that the job is stopping (checked between episodes)."""
    stats = RobotStats()
    operators = {t: (make_operator(env) if make_operator else NoOperator()) for t, env in envs.items()}
    rng = np.random.default_rng(seed)
    tasks = list(envs)
    if client.current is not None:
        runner.load(client.current)
    i = 0
    while not should_stop() and not client.job_stopping and (deadline is None or time.monotonic() < deadline) and \
            (max_episodes is None or stats.episodes < max_episodes):
        new = client.swap_if_ready()
        if new is not None:
            runner.load(new)
            if metrics:
                metrics.swaps.labels(client.actor_id).inc()
                metrics.swap_delay.labels(client.actor_id).observe(max(0.0, time.time() - new.announced_at))
        task = tasks[i % len(tasks)]
        i += 1
        rec = client.begin_episode(task)
        outcome, steps, inter = run_episode(envs[task], runner, operators[task], task, int(rng.integers(10**9 - 1)), rec, hz)
        rec.end(outcome)
        stats.episodes += 1
        stats.steps += steps
        stats.intervention_steps += inter
        stats.outcomes[outcome] = stats.outcomes.get(outcome, 0) + 1
        if not stats.versions_run or stats.versions_run[-1] != runner.version:
            stats.versions_run.append(runner.version)
        if metrics:
            a = client.actor_id
            metrics.steps.labels(a, task).inc(steps)
            metrics.intervention_steps.labels(a, task).inc(inter)
            metrics.episodes.labels(a, task, outcome).inc()
            metrics.version.labels(a).set(runner.version)
            metrics.learner_version.labels(a).set(client.learner_version)
            metrics.spool_chunks.labels(a).set(len(client.spool))
        event(log, "episode", level=10, job=client.job_id, actor=client.actor_id, version=runner.version, task=task,
              outcome=outcome, steps=steps, interventions=inter)
    return stats
