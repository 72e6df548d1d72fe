"""Offline pretraining: ``fleetloop pretrain`` (behaviour cloning, or RECAP) and RECAP's learner start-up.

Uses the same pieces as the online learner (offline ReplayStore buffers, the uniform per-task mix,
the algorithm plug-ins), so the pretrained policy and the online phase share one code path.

- :func:`pretrain` with ``algorithm="hg_dagger"`` (default): behaviour cloning (HG-DAgger on
  demonstration frames is plain BC). Output: a safetensors file written atomically, plus its sha256.
- :func:`pretrain` with ``algorithm="recap"``: the value function is pretrained on the demos' Monte-Carlo
  returns (plus ``value_datasets``), then the indicator-conditioned policy is trained with RECAP
  itself on the demos (all forced positive, ``indicator_dropout`` of them 'unknown'), so both the
  positive and the unconditional token are trained. Writes the policy to ``out`` (metadata
  ``algorithm: recap``) and the value function to :func:`value_weights_path` ``(out)``.
- :func:`prepare_recap`: the same two steps at a fresh learner's start-up (no checkpoint), on the
  learner's own algorithm and replay store; :func:`load_initial_weights` lets a RECAP job start from
  a plain BC file (its weights are *lifted* into the conditioned layout, the indicator's input
  columns zero, so the lifted policy acts exactly like the BC policy for every token until trained).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from torch import nn

from fleetloop.dataset import atomic_write, iter_episodes, observation_specs, read_manifest
from fleetloop.errors import FailedPrecondition, InvalidArgument
from fleetloop.logs import event, get_logger
from fleetloop.policies import DEFAULT_FACTORY, build_policy
from fleetloop.specs import PolicySpec, TensorInfo
from fleetloop.weights import sha256_hex, state_dict_to_blob
from learner.algorithms import make_algorithm
from learner.algorithms.base import Algorithm
from learner.algorithms.value import ValueEpisode, pretrain_value
from learner.batch import OFFLINE, Batch
from learner.replay import ReplayStore

log = get_logger("learner.pretrain")
RECAP_FACTORY = "fleetloop.policies:recap_mlp_policy"


def value_weights_path(policy_path: Path) -> Path:
    """Where :func:`pretrain` (RECAP) writes the value function beside the policy file ``X.safetensors``:
    ``X.value.safetensors``."""
    p = Path(policy_path)
    return p.with_name(p.name.removesuffix(".safetensors") + ".value.safetensors")


def offline_batch(replay: ReplayStore, tasks: list[str], batch_size: int, rng: np.random.Generator) -> Batch:
    """``batch_size`` demonstration frames, equal share per task (remainder to the first tasks)."""
    per_task = [batch_size // len(tasks) + (1 if i < batch_size % len(tasks) else 0) for i in range(len(tasks))]
    parts = [(i, OFFLINE, replay.sample(t, "offline", n, rng)) for i, (t, n) in enumerate(zip(tasks, per_task)) if n]
    return Batch.from_parts(parts)


def load_initial_weights(policy: nn.Module, path: Path) -> dict[str, str]:
    """Load ``path`` (safetensors) into ``policy``; returns the file's metadata.

    A conditioned policy (RECAP) given an *unconditioned* state dict of the same MLP (a BC file) gets
    it lifted: every tensor copied, the first layer's extra indicator-embedding input columns set to
    zero, the embedding kept as initialised. Any other mismatch raises as ``load_state_dict`` does."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as fh:
        meta = dict(fh.metadata() or {})
    state = load_file(str(path))
    if getattr(policy, "conditioned", False) and not any(k.startswith("cond_embed") for k in state):
        state = lift_unconditioned(policy, state)
        meta["lifted"] = "true"
    policy.load_state_dict(state)
    return meta


def lift_unconditioned(policy: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict for the conditioned ``policy`` from an unconditioned one (see :func:`load_initial_weights`)."""
    target = policy.state_dict()
    embed = getattr(policy, "cond_embed", None)
    cond_dim = int(embed.embedding_dim) if embed is not None else 0
    out = {k: v.detach().clone() for k, v in target.items()}
    for k, v in state.items():
        if k not in target:
            raise InvalidArgument(f"initial weights have {k!r}, unknown to the conditioned policy", field="initial_weights", value=k)
        want = target[k]
        if v.shape == want.shape:
            out[k] = v.clone()
        elif v.dim() == 2 and want.dim() == 2 and v.shape[0] == want.shape[0] and v.shape[1] + cond_dim == want.shape[1]:
            out[k] = torch.zeros_like(want)  # first layer: [obs | one-hot task | indicator embedding] inputs
            out[k][:, : v.shape[1]] = v
        else:
            raise InvalidArgument(f"initial weights {k!r} have shape {tuple(v.shape)}, the policy needs {tuple(want.shape)}",
                                  field="initial_weights", value=k)
    return out


def value_episodes(datasets: Iterable[Path | str], tasks: list[str], max_len: int) -> list[ValueEpisode]:
    """Every episode of ``tasks`` in ``datasets`` as value-pretraining episodes (outcome from each manifest)."""
    index = {t: i for i, t in enumerate(tasks)}
    return [ValueEpisode.from_demo(ep, index, max_len) for d in datasets for ep in iter_episodes(d, tasks=tasks)]


def _pretrain_value(alg: Any, episodes: list[ValueEpisode], steps: int, batch_size: int, seed: int) -> float:
    """Fit ``alg.value`` on ``episodes`` (in place, whatever its mode); returns the mean loss of the last 50 steps."""
    c = alg.config
    alg.value.requires_grad_(True)
    losses = pretrain_value(alg.value, episodes, steps=steps, batch_size=batch_size, lr=c.value_lr,
                            fail_penalty=c.fail_penalty, timeout_as=c.timeout_as, projection=c.projection, seed=seed,
                            device=alg.device)
    alg.set_value_mode(c.value_mode)  # frozen again (no grad) or back to training mode
    return float(np.mean(losses[-50:])) if losses else float("nan")


def _pretrain_policy(alg: Algorithm, replay: ReplayStore, tasks: list[str], steps: int, batch_size: int,
                     rng: np.random.Generator) -> list[float]:
    losses = []
    for _ in range(int(steps)):
        losses.append(alg.update(offline_batch(replay, tasks, batch_size, rng).to(alg.device)).loss)
    return losses


def prepare_recap(alg: Any, replay: ReplayStore, tasks: list[str], offline_dataset: Path | None, batch_size: int,
                  pretrain_policy: bool, initial_meta: dict[str, str], seed: int = 0) -> dict[str, Any]:
    """RECAP start-up of a fresh learner (no checkpoint): make V and the positive token meaningful.

    Value: ``value_weights`` if set, else ``value_pretrain_steps`` offline steps on the job's demos
    plus ``value_datasets``; a frozen V with neither raises FailedPrecondition (its advantages would
    be noise forever). Policy (only with ``pretrain_policy``: no weights published yet): unless the
    initial weights were already RECAP-pretrained, ``policy_pretrain_steps`` RECAP updates on the
    demos in ``replay``; then the optimizer and step counter restart, so online training starts as
    from a pretrained file. Returns what was done (also logged as ``recap_prepared``)."""
    from safetensors.torch import load_file

    c, t0 = alg.config, time.monotonic()
    info: dict[str, Any] = {"value": "none", "policy_steps": 0}
    datasets = ([offline_dataset] if offline_dataset is not None else []) + [Path(d) for d in c.value_datasets]
    if c.value_weights:
        alg.load_value_state_dict(load_file(c.value_weights))
        info["value"] = f"loaded {c.value_weights}"
    elif c.value_pretrain_steps > 0 and datasets:
        episodes = value_episodes(datasets, tasks, c.max_episode_steps)
        info["value_loss"] = _pretrain_value(alg, episodes, c.value_pretrain_steps, batch_size, seed)
        info["value"] = f"pretrained {c.value_pretrain_steps} steps on {len(episodes)} episodes"
    elif c.value_mode == "frozen":
        raise FailedPrecondition("RECAP with value_mode 'frozen' needs algorithm_params.value_weights or demos "
                                 "(offline_dataset / value_datasets) and value_pretrain_steps > 0 to pretrain it",
                                 field="algorithm_params.value_weights", value=None)
    has_demos = all(replay.size(t, "offline") > 0 for t in tasks)
    if pretrain_policy and c.policy_pretrain_steps > 0 and has_demos and initial_meta.get("algorithm") != "recap":
        losses = _pretrain_policy(alg, replay, tasks, c.policy_pretrain_steps, batch_size, np.random.default_rng(seed))
        alg.optimizer, alg.step = alg.make_optimizer(), 0
        info.update(policy_steps=c.policy_pretrain_steps, policy_loss=float(np.mean(losses[-50:])))
    info["seconds"] = time.monotonic() - t0
    event(log, "recap_prepared", **info)
    return info


def pretrain(dataset: Path, tasks: list[str], out: Path, steps: int = 3000, batch_size: int = 256, lr: float = 1e-3,
             policy_factory: str = DEFAULT_FACTORY, policy_kwargs: dict[str, Any] | None = None,
             seed: int = 0, progress: bool = True, algorithm: str = "hg_dagger",
             algorithm_params: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train ``steps`` policy steps on the demos of ``tasks`` (equal share per task); write ``out``.

    ``algorithm="recap"``: the default policy factory becomes ``recap_mlp_policy``; the value function
    is pretrained first (``algorithm_params`` are RecapConfig fields: ``value_pretrain_steps``,
    ``value_datasets``, ...) and written to :func:`value_weights_path` ``(out)`` (``value_out`` in the
    result); the policy file's metadata says ``algorithm: recap``."""
    if algorithm not in ("hg_dagger", "recap"):
        raise InvalidArgument(f"pretrain supports 'hg_dagger' and 'recap', got {algorithm!r}", field="algorithm", value=algorithm)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    manifest = read_manifest(dataset)
    act_dim = int(manifest["act_dim"])
    spec = PolicySpec(tuple(observation_specs(manifest)), (TensorInfo("action", "float32", (act_dim,)),), tuple(tasks))
    if algorithm == "recap" and policy_factory == DEFAULT_FACTORY and not (policy_kwargs or {}).get("conditioned"):
        policy_factory = RECAP_FACTORY
    policy = build_policy(policy_factory, policy_kwargs or {}, spec)
    params = {"lr": lr, **(algorithm_params or {})}
    algo = make_algorithm(algorithm, policy, params, "cpu")
    targets = algo.episode_targets if getattr(algo, "needs_episode_targets", False) else None
    replay = ReplayStore(tasks, spec.observations, act_dim, episode_targets=targets)
    for ep in iter_episodes(dataset, tasks=tasks):
        replay.add_offline(ep.task_id, ep.obs, ep.actions, ep.rewards, ep.interventions, outcome=ep.outcome)
    missing = [t for t in tasks if replay.size(t, "offline") == 0]
    if missing:
        raise InvalidArgument(f"dataset {dataset} has no demos for tasks {missing}", field="tasks", value=missing)
    t0 = time.monotonic()
    extra: dict[str, Any] = {}
    if algorithm == "recap":
        c = algo.config
        episodes = value_episodes([dataset, *c.value_datasets], tasks, c.max_episode_steps)
        extra["value_loss"] = _pretrain_value(algo, episodes, c.value_pretrain_steps, batch_size, seed)
        value_out = value_weights_path(Path(out))
        atomic_write(value_out, state_dict_to_blob(algo.value.state_dict(), metadata={"fleetloop": "recap_value"}))
        extra["value_out"] = str(value_out)
    losses: list[float] = []
    bar = _progress(progress, steps)
    for step in range(steps):
        result = algo.update(offline_batch(replay, tasks, batch_size, rng))
        losses.append(result.loss)
        if bar is not None and (step % 50 == 0 or step == steps - 1):
            bar[0].update(bar[1], completed=step + 1, description=f"pretrain loss {np.mean(losses[-50:]):.4f}")
    if bar is not None:
        bar[0].stop()
    meta = {"fleetloop": "pretrained", "tasks": ",".join(tasks), "algorithm": algorithm, "policy_factory": policy_factory}
    blob = state_dict_to_blob(algo.policy_state_dict(), metadata=meta)
    atomic_write(Path(out), blob)
    info = {"out": str(out), "sha256": sha256_hex(blob), "steps": steps, "final_loss": float(np.mean(losses[-50:])) if losses else None,
            "seconds": time.monotonic() - t0, "demo_steps": {t: replay.size(t, "offline") for t in tasks},
            "algorithm": algorithm, "policy_factory": policy_factory, **extra}
    event(log, "pretrained", **{k: v for k, v in info.items() if k != "demo_steps"})
    return info


def _progress(enabled: bool, total: int):
    if not enabled:
        return None
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
    bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"), TimeRemainingColumn())
    bar.start()
    return bar, bar.add_task("pretrain", total=total)
