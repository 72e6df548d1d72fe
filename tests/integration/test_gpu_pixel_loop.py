"""Pixel learner on CUDA (skipped without a GPU): the visuomotor policy trains on two camera tensors
plus proprioception on the GPU, under bf16 autocast, with channels_last conv weights, pinned batches
copied non-blocking, and publishes CPU safetensors a robot-side (CPU, fp32) runner loads and runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from actor.policy_runner import PolicyRunner
from fleetloop.client.weight_client import VerifiedWeights
from fleetloop import wire_settings
from fleetloop.presets import metaworld_specs
from fleetloop.weights import load_verified
from learner.api import LearnerHooks
from learner.config import LearnerConfig
from learner.core import LearnerCore

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(300)]
TASK, SIZE, STEPS = "drawer-open-v3", 32, 40


def test_cuda_pixel_learner_trains_in_bf16_channels_last_and_publishes(tmp_path):
    obs_specs, act_specs = metaworld_specs("pixels", ["corner3", "gripperPOV"], SIZE)
    seen: dict[str, object] = {}

    def on_update(batch, seconds):  # what the update actually received
        seen.update(device=batch.device.type, cam=batch.obs["corner3"].dtype)

    cfg = LearnerConfig(state_dir=tmp_path, tasks=[TASK], device="cuda", observation_specs=obs_specs,
                        action_specs=act_specs, flow={"memory_budget_mb": 256},
                        optimisation={"policy_factory": "fleetloop.vision:visuomotor_policy", "batch_size": 64,
                                      "publish_every": 10, "mixed_precision": "auto"})
    core = LearnerCore(cfg, hooks=LearnerHooks(on_update=on_update))
    core.algorithm.policy.register_forward_hook(lambda m, i, out: seen.update(out=out.dtype) if m.training else None)
    assert core.device.type == "cuda"
    convs = [m for m in core.algorithm.policy.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    rng = np.random.default_rng(0)
    n = 256
    obs = {"proprio": rng.standard_normal((n, 8)).astype(np.float32),
           "corner3": rng.integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8),
           "gripperPOV": rng.integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)}
    actions = np.tanh(obs["corner3"].reshape(n, -1)[:, :4].astype(np.float32) / 64 - 2)  # learnable from pixels
    core.replay.add_online(TASK, obs, actions, np.zeros(n, np.float32), np.ones(n, bool), 0, 0, 0)
    losses = [core.train_step()["loss"] for _ in range(STEPS)]
    assert all(np.isfinite(losses)) and np.mean(losses[-5:]) < np.mean(losses[:5]), losses
    assert seen == {"device": "cuda", "cam": torch.uint8, "out": torch.bfloat16}  # autocast bf16 in the update
    latest = core.weights.latest
    assert latest.version >= 2
    state = load_verified(core.weights.blob(latest.version), latest.sha256)
    assert all(t.device.type == "cpu" and t.dtype == torch.float32 for t in state.values())
    run = wire_settings.run_config(policy_factory=cfg.optimisation.policy_factory, policy_kwargs={}, task_ids=[TASK])
    runner = PolicyRunner(run, obs_specs, act_specs)  # the robot: CPU, fp32
    runner.load(VerifiedWeights(latest.version, latest.sha256, state, 0, 0.0, 0.0))
    action = runner.act({k: v[0] for k, v in obs.items()}, TASK)
    assert action.shape == (4,) and np.isfinite(action).all()
    core.stop(checkpoint=True)
