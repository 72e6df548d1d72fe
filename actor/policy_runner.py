"""PolicyRunner: builds the job's policy from the RunConfig and runs it for one robot.

The architecture comes from the handshake (factory name + kwargs + task list) and the job's tensor
specs (the robot's own, which the handshake checked equal to the job's), so actor and learner
agree by construction; ``load`` takes only digest-verified weights (``VerifiedWeights``).
Inference is single-observation, no grad, CPU by default (robots run locally).

Inference settings come from the RunConfig's typed ``inference`` (``inference_json`` from a learner
before it; see :mod:`fleetloop.wire_settings`; the learner fills it from the algorithm; RECAP: ``{"guidance_beta": b, "eval_guidance_beta": e, "indicator": "positive"}``). An
indicator-conditioned policy is asked for the positive indicator and mixed with its unconditional
output by classifier-free guidance (:func:`fleetloop.policies.guided_action`):
``a = a_uncond + beta * (a_pos - a_uncond)``, clamped to [-1, 1]; at beta 1 (fleet rollouts) only
the positive pass runs. An evaluation harness overrides beta with the ``guidance_beta`` argument or
:meth:`PolicyRunner.set_guidance` (``eval_guidance_beta`` holds the learner's suggestion).
"""

from __future__ import annotations

import time
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from fleetloop.client.weight_client import VerifiedWeights
from fleetloop import wire_settings
from fleetloop.policies import build_policy, guided_action
from fleetloop.specs import DEFAULT_ACTION_NAME, PolicySpec, as_infos


class PolicyRunner:
    """Deterministic action for (obs, task) under the loaded version.

    ``guidance``: the CFG beta in use (``guidance_beta`` argument, else the RunConfig's, else 1.0).
    ``guided_actions`` counts actions computed through guidance (conditioned policies only)."""

    def __init__(self, run_config, observations: "int | Sequence[Any]", actions: "int | Sequence[Any]",
                 device: str = "cpu", guidance_beta: float | None = None) -> None:
        """``observations``/``actions``: the job's tensor specs (wire TensorSpecs, SpecModels or
        dicts), or widths for one float32 ``state``/``action`` vector each."""
        self.task_ids = list(run_config.task_ids)
        self.task_index = {t: i for i, t in enumerate(self.task_ids)}
        self.device = torch.device(device)
        self.spec = PolicySpec.from_specs(as_infos(observations), as_infos(actions, DEFAULT_ACTION_NAME),
                                          self.task_ids)
        self.policy = build_policy(run_config.policy_factory, wire_settings.policy_kwargs(run_config),
                                   self.spec).to(self.device).eval()
        self.inference = wire_settings.inference(run_config)
        self.eval_guidance_beta = float(self.inference.get("eval_guidance_beta", self.inference.get("guidance_beta", 1.0)))
        self.conditioned = bool(getattr(self.policy, "conditioned", False))
        self.guidance = 1.0
        self.set_guidance(guidance_beta if guidance_beta is not None else float(self.inference.get("guidance_beta", 1.0)))
        self.guided_actions = 0
        self.version = -1
        self.installed_at: float | None = None
        self.installs = 0

    def set_guidance(self, beta: float) -> None:
        """Use CFG ``beta`` from the next action on (0 = unconditional, 1 = positive-conditioned, > 1 sharper)."""
        beta = float(beta)
        if not np.isfinite(beta) or beta < 0:
            raise ValueError(f"guidance beta must be finite and >= 0, got {beta}")
        self.guidance = beta

    def load(self, weights: VerifiedWeights) -> None:
        """Swap in a verified version (call only between episodes). Afterwards ``installed_at``
        (``time.monotonic()``) is when this version became the one :meth:`act` uses (the end of the
        "published -> running on the robot" latency) and ``installs`` counts the swaps."""
        state = weights.state_dict
        if getattr(weights, "tensor_format", "torch") == "numpy":  # a client made with weights_format="numpy"
            state = {k: torch.from_numpy(v) for k, v in state.items()}
        self.policy.load_state_dict(state)
        self.version = weights.version
        self.installed_at = time.monotonic()
        self.installs += 1

    @torch.no_grad()
    def act(self, obs: "Mapping[str, np.ndarray] | np.ndarray", task_id: str) -> np.ndarray:
        """Action for one observation -- a mapping of the job's tensor names to per-step arrays, or
        one array when the job has a single observation tensor --: float32 [act_dim]. With a
        conditioned policy, classifier-free guidance mixes the positive-conditioned and
        unconditional outputs with ``guidance``."""
        o = self._batch_of_one(obs)
        t = torch.tensor([self.task_index[task_id]], device=self.device)
        if not self.conditioned:
            return self.policy(o, t).squeeze(0).cpu().numpy()
        self.guided_actions += 1
        return guided_action(self.policy, o, t, self.guidance).squeeze(0).cpu().numpy()

    def _batch_of_one(self, obs: "Mapping[str, np.ndarray] | np.ndarray") -> dict[str, torch.Tensor]:
        if not isinstance(obs, Mapping):
            if len(self.spec.observations) != 1:
                raise ValueError(f"this job observes {[o.name for o in self.spec.observations]}: pass a mapping")
            obs = {self.spec.observations[0].name: obs}
        return {o.name: torch.as_tensor(np.asarray(obs[o.name], dtype=o.dtype), device=self.device).unsqueeze(0)
                for o in self.spec.observations}
