"""Record scripted-expert demonstrations into the shared offline dataset (``fleetloop-demos/v1``).

:func:`record_demos` runs each task's scripted expert on randomised layouts and writes only
successful episodes through :class:`fleetloop.dataset.DemoWriter`. With ``action_noise > 0``
the *executed* action is ``clip(expert + N(0, action_noise^2), -1, 1)`` and that executed action is
the stored label (so stored (obs, action) pairs are exactly what happened; the noise widens the
visited state distribution, which makes behaviour cloning more robust). Every step is flagged as
an intervention (a demonstration is all expert).

Seeds: attempt ``i`` of a task uses layout seed ``seed * SEED_STRIDE + i`` (and noise from a
generator seeded by the same number), so recording is reproducible and the seeds used lie in
``[seed * SEED_STRIDE, seed * SEED_STRIDE + max_attempts)``. Evaluate on seeds outside that range.
"""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path

import numpy as np

from actor.envs import make_env
from actor.envs.base import ExpertEnv
from actor.envs.metaworld_env import ACT_DIM, OBS_DIM, available_tasks
from fleetloop.dataset import DemoEpisode, DemoWriter, atomic_write
from fleetloop.errors import InvalidArgument

SEED_STRIDE = 1_000_000


def run_expert_episode(env: ExpertEnv, seed: int, action_noise: float = 0.0) -> tuple[DemoEpisode, bool]:
    """Run one expert episode on layout ``seed``; return (episode, success).

    The episode arrays hold obs before each step, executed actions, rewards and all-True
    interventions; it ends at the first success or at ``env.max_episode_steps``.
    """
    rng = np.random.default_rng(seed)
    obs = env.reset(seed=seed)
    obs_l, act_l, rew_l = [], [], []
    success = False
    for _ in range(env.max_episode_steps):
        action = env.expert_action(obs)
        if action_noise > 0:
            action = action + rng.normal(0.0, action_noise, size=action.shape)
        action = np.clip(action, -1.0, 1.0).astype(np.float32)
        result = env.step(action)
        obs_l.append(obs)
        act_l.append(action)
        rew_l.append(result.reward)
        obs = result.obs
        if result.done:
            success = result.success
            break
    t = len(obs_l)
    if isinstance(obs_l[0], dict):  # named tensors (cameras + proprioception): each kept in its own dtype
        stacked = {k: np.stack([o[k] for o in obs_l]) for k in obs_l[0]}
    else:
        stacked = np.stack(obs_l).astype(np.float32)
    episode = DemoEpisode(
        episode_id=uuid.uuid4().hex, task_id=env.task_id,
        obs=stacked, actions=np.stack(act_l).astype(np.float32),
        rewards=np.asarray(rew_l, dtype=np.float32), interventions=np.ones(t, dtype=np.bool_),
        outcome="success" if success else "timeout", seed=int(seed))
    return episode, success


def record_demos(
    tasks: list[str],
    episodes_per_task: int,
    out_dir: str | Path,
    seed: int = 0,
    action_noise: float = 0.1,
    max_episode_steps: int = 200,
    progress: bool = True,
    max_attempts_factor: int = 5,
    view: dict | None = None,
) -> dict[str, int]:
    """Write ``episodes_per_task`` successful expert episodes per task to ``out_dir``.

    Failed attempts are discarded and another seed is tried, up to
    ``max_attempts_factor * episodes_per_task`` attempts per task (a task that stays short is
    reported in the returned counts, not raised). Appends to an existing compatible dataset.
    ``view``: the robot's observation options (``observations="pixels"``, ``cameras``,
    ``image_size``): the dataset then stores the camera frames (format v2).
    Returns ``{task: episodes written}``. Unknown tasks raise InvalidArgument before anything is
    written.
    """
    if episodes_per_task < 0:
        raise InvalidArgument(f"episodes_per_task {episodes_per_task} must be >= 0",
                              field="episodes_per_task", value=episodes_per_task)
    if action_noise < 0:
        raise InvalidArgument(f"action_noise {action_noise} must be >= 0", field="action_noise", value=action_noise)
    unknown = [task for task in tasks if task not in available_tasks("MT50")]
    if unknown:
        raise InvalidArgument(f"unknown task(s) {unknown}", field="tasks", value=unknown)
    envs: dict[str, ExpertEnv] = {
        task: make_env(task, seed=seed, max_episode_steps=max_episode_steps, **(view or {})) for task in tasks}
    if (view or {}).get("observations", "state") == "pixels":
        from fleetloop.presets import metaworld_specs
        writer = DemoWriter(out_dir, metaworld_specs(**view)[0], ACT_DIM)  # the robot's own specs (v2 dataset)
    else:
        writer = DemoWriter(out_dir, OBS_DIM, ACT_DIM)
    counts = {task: 0 for task in tasks}
    max_attempts = max(1, max_attempts_factor) * episodes_per_task
    bar, bar_task = _progress_bar(progress, len(tasks) * episodes_per_task)
    try:
        for task, env in envs.items():
            for attempt in range(max_attempts):
                if counts[task] >= episodes_per_task:
                    break
                episode, ok = run_expert_episode(env, seed * SEED_STRIDE + attempt, action_noise)
                if not ok:
                    continue
                writer.add(episode)
                counts[task] += 1
                if bar is not None:
                    bar.update(bar_task, advance=1, description=f"demos {task}")
            if counts[task] < episodes_per_task:
                print(f"warning: {task}: only {counts[task]}/{episodes_per_task} successful demos "
                      f"in {max_attempts} attempts", file=sys.stderr)
    finally:
        if bar is not None:
            bar.stop()
        for env in envs.values():
            env.close()
    manifest = Path(out_dir) / "manifest.json"
    if not manifest.exists():  # nothing written: still leave a valid, empty dataset
        atomic_write(manifest, json.dumps(writer.manifest, indent=1).encode())
    return counts


def _progress_bar(enabled: bool, total: int):  # type: ignore[no-untyped-def]
    """A started rich progress bar and its task id, or (None, None)."""
    if not enabled:
        return None, None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    bar.start()
    return bar, bar.add_task("demos", total=total)
