"""``fleetloop pretrain``: behaviour-clone the initial policy from an offline demo dataset.

Uses the same pieces as the online learner (offline ReplayStore buffers, the uniform per-task mix,
the HG-DAgger algorithm, which on demonstration frames is plain behaviour cloning), so the
pretrained policy and the online phase share one code path. Output: a safetensors file written
atomically, plus its sha256.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fleetloop.dataset import atomic_write, iter_episodes, read_manifest
from fleetloop.errors import InvalidArgument
from fleetloop.logs import event, get_logger
from fleetloop.policies import build_policy
from fleetloop.weights import sha256_hex, state_dict_to_blob
from learner.algorithms import make_algorithm
from learner.batch import Batch
from learner.replay import ReplayStore

log = get_logger("learner.pretrain")


def pretrain(dataset: Path, tasks: list[str], out: Path, steps: int = 3000, batch_size: int = 256, lr: float = 1e-3,
             policy_factory: str = "fleetloop.policies:mlp_policy", policy_kwargs: dict[str, Any] | None = None,
             seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """Train ``steps`` BC steps on the demos of ``tasks`` (equal share per task); write ``out``."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    manifest = read_manifest(dataset)
    obs_dim, act_dim = int(manifest["obs_dim"]), int(manifest["act_dim"])
    replay = ReplayStore(tasks, obs_dim, act_dim)
    for ep in iter_episodes(dataset, tasks=tasks):
        replay.add_offline(ep.task_id, ep.obs, ep.actions, ep.rewards, ep.interventions)
    missing = [t for t in tasks if replay.size(t, "offline") == 0]
    if missing:
        raise InvalidArgument(f"dataset {dataset} has no demos for tasks {missing}", field="tasks", value=missing)
    policy = build_policy(policy_factory, policy_kwargs or {}, obs_dim, act_dim, len(tasks))
    algo = make_algorithm("hg_dagger", policy, {"lr": lr}, "cpu")
    per_task = [batch_size // len(tasks) + (1 if i < batch_size % len(tasks) else 0) for i in range(len(tasks))]
    t0 = time.monotonic()
    losses: list[float] = []
    bar = _progress(progress, steps)
    for step in range(steps):
        parts = [(i, 1, replay.sample(t, "offline", n, rng)) for i, (t, n) in enumerate(zip(tasks, per_task)) if n]
        result = algo.update(Batch.from_parts(parts))
        losses.append(result.loss)
        if bar is not None and (step % 50 == 0 or step == steps - 1):
            bar[0].update(bar[1], completed=step + 1, description=f"pretrain loss {np.mean(losses[-50:]):.4f}")
    if bar is not None:
        bar[0].stop()
    blob = state_dict_to_blob(algo.policy_state_dict(), metadata={"fleetloop": "pretrained", "tasks": ",".join(tasks)})
    atomic_write(Path(out), blob)
    info = {"out": str(out), "sha256": sha256_hex(blob), "steps": steps, "final_loss": float(np.mean(losses[-50:])),
            "seconds": time.monotonic() - t0, "demo_steps": {t: replay.size(t, "offline") for t in tasks}}
    event(log, "pretrained", **{k: v for k, v in info.items() if k != "demo_steps"})
    return info


def _progress(enabled: bool, total: int):
    if not enabled:
        return None
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
    bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"), TimeRemainingColumn())
    bar.start()
    return bar, bar.add_task("pretrain", total=total)
