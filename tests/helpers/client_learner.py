"""A real learner for robot-client tests (the installed wheel, the examples): ``build_learner(...).serve()``
in this process on a free loopback port, with the job's specs given, training kept idle (so the only
new weight versions are the ones a test publishes) and no checkpoint at stop. The caller stops it
with :func:`stop` (only what it started)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fleetloop.weights import state_dict_to_blob

TOKEN = "client-tok"


def start(state_dir: Path, job: str, tasks: list[str], observation_specs: list[dict[str, Any]],
          action_specs: list[dict[str, Any]], chunk_steps: int = 10, max_episode_steps: int = 200):
    """The learner (``impl``: ``.port``, ``.core.ingestor``, ``.core.weights``), robots' token :data:`TOKEN`."""
    from learner.config import LearnerConfig
    from learner.process import build_learner

    cfg = LearnerConfig(job_id=job, host="127.0.0.1", port=0, metrics_port=None, state_dir=state_dir, tasks=tasks,
                        observation_specs=observation_specs, action_specs=action_specs, robot_tokens=[TOKEN],
                        chunk_steps=chunk_steps, max_episode_steps=max_episode_steps, min_online_steps=10 ** 12,
                        max_updates_per_s=0.1, checkpoint_every_s=1e6, device="cpu")
    return build_learner(cfg).serve()


def as_config_specs(specs: list) -> list[dict[str, Any]]:
    """Wire TensorSpecs (``make_spec``) as a job file / LearnerConfig declares them."""
    from fleetloop.codec import WIRE_DTYPES

    return [{"name": s.name, "dtype": np.dtype(WIRE_DTYPES[int(s.dtype)]).name, "shape": [int(d) for d in s.shape],
             "low": list(s.low), "high": list(s.high)} for s in specs]


def stop(impl) -> None:
    """Stop serving (short grace) and the training thread; no checkpoint."""
    impl.stop(checkpoint=False, grace_s=1.0, wait_s=10.0, announce=False)


def publish_policy(impl, seed: int, step: int = 1):
    """Publish a new version of the job's own policy architecture with weights drawn from ``seed``
    (every tensor replaced by seeded normals): returns (VersionInfo, the state dict as numpy arrays)."""
    import torch

    from fleetloop.policies import build_policy

    core = impl.core
    opt = core.cfg.optimisation
    policy = build_policy(opt.policy_factory, opt.policy_kwargs, core.cfg.policy_spec)
    g = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(v.shape, generator=g) * 0.5 for k, v in policy.state_dict().items()}
    info = core.weights.publish(state_dict_to_blob(state), step)
    return info, {k: v.numpy().astype(np.float32) for k, v in state.items()}
