"""PolicyRunner: builds the job's policy from the RunConfig and runs it for one robot.

The architecture comes from the handshake (factory name + kwargs + task list), so actor and learner
agree by construction; ``load`` takes only digest-verified weights (``VerifiedWeights``).
Inference is single-observation, no grad, CPU by default (robots run locally).
"""

from __future__ import annotations

import json

import numpy as np
import torch

from actor.weight_client import VerifiedWeights
from fleetloop.policies import COND_POSITIVE, build_policy


class PolicyRunner:
    """Deterministic action for (obs, task) under the loaded version."""

    def __init__(self, run_config, obs_dim: int, act_dim: int, device: str = "cpu") -> None:
        self.task_ids = list(run_config.task_ids)
        self.task_index = {t: i for i, t in enumerate(self.task_ids)}
        self.device = torch.device(device)
        self.policy = build_policy(run_config.policy_factory, json.loads(run_config.policy_kwargs_json or "{}"),
                                   obs_dim, act_dim, len(self.task_ids)).to(self.device).eval()
        inference = json.loads(run_config.inference_json or "{}")
        self.guidance = float(inference.get("guidance_beta", 1.0))
        self.conditioned = bool(getattr(self.policy, "conditioned", False))
        self.version = -1

    def load(self, weights: VerifiedWeights) -> None:
        """Swap in a verified version (call only between episodes)."""
        self.policy.load_state_dict(weights.state_dict)
        self.version = weights.version

    @torch.no_grad()
    def act(self, obs: np.ndarray, task_id: str) -> np.ndarray:
        """Action for one observation: float32 [act_dim]. With a conditioned policy, classifier-free
        guidance mixes the positive-conditioned and unconditional outputs with ``guidance_beta``."""
        o = torch.as_tensor(np.asarray(obs, np.float32), device=self.device).unsqueeze(0)
        t = torch.tensor([self.task_index[task_id]], device=self.device)
        if not self.conditioned:
            return self.policy(o, t).squeeze(0).cpu().numpy()
        pos = self.policy(o, t, torch.tensor([COND_POSITIVE], device=self.device))
        if self.guidance == 1.0:
            return pos.squeeze(0).cpu().numpy()
        unc = self.policy(o, t, torch.tensor([0], device=self.device))
        return torch.clamp(unc + self.guidance * (pos - unc), -1, 1).squeeze(0).cpu().numpy()
