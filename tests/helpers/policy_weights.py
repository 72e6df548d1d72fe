"""Policy weight blobs and a learner state folder holding published versions, for the evaluation
tests of both tiers (no process, socket or simulator)."""

from __future__ import annotations

from pathlib import Path

import torch

from fleetloop.policies import build_policy
from fleetloop.weights import state_dict_to_blob
from learner.weight_store import WeightStore

MLP = "fleetloop.policies:mlp_policy"


def policy_blob(factory: str = MLP, seed: int = 0, tasks: int = 1) -> bytes:
    """safetensors bytes of a freshly initialised Meta-World-shaped policy (39 -> 4) seeded ``seed``."""
    torch.manual_seed(seed)
    return state_dict_to_blob(build_policy(factory, {}, 39, 4, tasks).state_dict())


def published_state_dir(tmp_path: Path, versions: int = 3) -> Path:
    """``tmp_path/state`` with ``versions`` published versions (seeds 0.., learner step 10 x version)."""
    store = WeightStore(tmp_path / "state" / "weights")
    for seed in range(versions):
        store.publish(policy_blob(seed=seed), learner_step=seed * 10)
    return tmp_path / "state"
