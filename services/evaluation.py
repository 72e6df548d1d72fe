"""Evaluate a weights file on held-out seeds, spread over worker processes (one task each)."""

from __future__ import annotations

import json
import multiprocessing as mp
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path


def _run_config(tasks: list[str], policy_factory: str, policy_kwargs: dict):
    from fleetloop.v1 import fleetloop_pb2 as pb
    return pb.RunConfig(policy_factory=policy_factory, policy_kwargs_json=json.dumps(policy_kwargs), task_ids=tasks,
                        max_episode_steps=200, inference_json="{}")


def _eval_one(path: str, all_tasks: list[str], task: str, trials: int, max_steps: int, policy_factory: str,
              policy_kwargs: dict, hz: float) -> dict:
    import torch

    torch.set_num_threads(1)
    from actor.envs.metaworld_env import ACT_DIM, OBS_DIM
    from actor.evaluate import evaluate
    from actor.policy_runner import PolicyRunner
    from actor.weight_client import VerifiedWeights
    from fleetloop.weights import load_verified, sha256_hex

    blob = Path(path).read_bytes()
    digest = sha256_hex(blob)
    runner = PolicyRunner(_run_config(all_tasks, policy_factory, policy_kwargs), OBS_DIM, ACT_DIM)
    runner.load(VerifiedWeights(-1, digest, load_verified(blob, digest), len(blob), 0.0, 0.0))
    return evaluate(runner, [task], trials, max_episode_steps=max_steps, hz=hz)[task]


def evaluate_file(path: Path, tasks: list[str], trials: int, workers: int = 2, max_steps: int = 200,
                  policy_factory: str = "fleetloop.policies:mlp_policy", policy_kwargs: dict | None = None,
                  hz: float = 30.0) -> dict[str, dict]:
    """Per-task success rate, mean length and episodes/hour of the policy in ``path`` (no operator)."""
    ctx = mp.get_context("spawn")
    with ProcessPoolExecutor(max_workers=max(1, min(workers, len(tasks))), mp_context=ctx) as pool:
        futures = {t: pool.submit(_eval_one, str(path), tasks, t, trials, max_steps, policy_factory, policy_kwargs or {}, hz)
                   for t in tasks}
        return {t: f.result() for t, f in futures.items()}
