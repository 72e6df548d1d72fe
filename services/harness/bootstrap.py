"""Offline start of a simulated job: scripted demonstrations, then a behaviour-cloned policy.

Shared by ``fleetloop demo`` and the launcher (JobSpec ``bootstrap``). Demonstrations already in
``demos_dir`` are reused (only missing tasks are recorded); the pretrained weights are written
atomically to ``weights_path``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from fleetloop.dataset import task_counts


def bootstrap_offline(tasks: list[str], demos_dir: Path, weights_path: Path, demos_per_task: int, pretrain_steps: int,
                      seed: int = 0, progress: Callable[[str], None] = lambda _m: None, view: dict | None = None,
                      policy_factory: str | None = None, policy_kwargs: dict[str, Any] | None = None,
                      batch_size: int = 256) -> tuple[Path, Path]:
    """Record missing demos, behaviour-clone the initial policy; returns (demos_dir, weights_path).

    ``view``: the robots' observation options (pixels: the demos store camera frames); the policy
    (``policy_factory``/``policy_kwargs``, default the MLP) is pretrained with ``batch_size``."""
    from actor.demos import record_demos
    from learner.pretrain import pretrain

    have = task_counts(demos_dir)
    missing = [t for t in tasks if have.get(t, 0) < demos_per_task]
    if missing:
        progress(f"recording {demos_per_task} scripted demonstrations for {', '.join(missing)} -> {demos_dir}")
        record_demos(missing, demos_per_task, demos_dir, seed=seed, view=view)
    else:
        progress(f"demonstrations found in {demos_dir}")
    progress(f"behaviour-cloning the initial policy ({pretrain_steps} steps) -> {weights_path}")
    weights_path.parent.mkdir(parents=True, exist_ok=True)
    policy = {"policy_factory": policy_factory} if policy_factory else {}
    pretrain(demos_dir, tasks, weights_path, steps=pretrain_steps, seed=seed, batch_size=batch_size,
             policy_kwargs=policy_kwargs, **policy)
    return demos_dir, weights_path
