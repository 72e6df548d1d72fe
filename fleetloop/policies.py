"""Policy architecture plug-ins.

A job names its policy as ``"module:function"`` plus keyword arguments (JSON). The function is a
*factory*::

    factory(obs_dim: int, act_dim: int, num_tasks: int, **kwargs) -> Policy

and a ``Policy`` is a ``torch.nn.Module`` with

    forward(obs: FloatTensor[B, obs_dim], task: LongTensor[B], cond: LongTensor[B] | None) -> FloatTensor[B, act_dim]

returning the action (deterministic mean, in the action space's [-1, 1] range). ``cond`` is an
optional per-sample conditioning token (RECAP's advantage indicator: 0 = none/unconditional,
1 = negative, 2 = positive); policies that ignore it accept ``None``. The learner and every actor
build the same architecture from the same name and kwargs (sent in the handshake's RunConfig), so
a state dict from one loads into the other. A VLA replaces this by naming another factory.
"""

from __future__ import annotations

import json
from typing import Any, Callable

import torch
from torch import nn

from fleetloop.errors import InvalidArgument
from fleetloop.plugins import import_callable

DEFAULT_FACTORY = "fleetloop.policies:mlp_policy"

COND_NONE, COND_NEGATIVE, COND_POSITIVE = 0, 1, 2


class MLPPolicy(nn.Module):
    """Multi-task MLP for low-dimensional state observations.

    Input: observation, one-hot task id, and (if ``conditioned``) a learned embedding of the
    conditioning token. Output: tanh-squashed action. Small enough to train at thousands of
    samples per second on one CPU core.
    """

    def __init__(
        self, obs_dim: int, act_dim: int, num_tasks: int, hidden: tuple[int, ...] = (256, 256),
        conditioned: bool = False, cond_dim: int = 8,
    ) -> None:
        super().__init__()
        self.obs_dim, self.act_dim, self.num_tasks = obs_dim, act_dim, num_tasks
        self.conditioned = conditioned
        in_dim = obs_dim + num_tasks + (cond_dim if conditioned else 0)
        self.cond_embed = nn.Embedding(3, cond_dim) if conditioned else None
        layers: list[nn.Module] = []
        for width in hidden:
            layers += [nn.Linear(in_dim, width), nn.ReLU()]
            in_dim = width
        layers.append(nn.Linear(in_dim, act_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, obs: torch.Tensor, task: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        parts = [obs, nn.functional.one_hot(task.long(), self.num_tasks).to(obs.dtype)]
        if self.cond_embed is not None:
            if cond is None:
                cond = torch.zeros(obs.shape[0], dtype=torch.long, device=obs.device)
            parts.append(self.cond_embed(cond.long()))
        return torch.tanh(self.net(torch.cat(parts, dim=-1)))


def mlp_policy(obs_dim: int, act_dim: int, num_tasks: int, hidden: list[int] | tuple[int, ...] = (256, 256),
               conditioned: bool = False) -> MLPPolicy:
    """Factory for :class:`MLPPolicy` (the default policy)."""
    return MLPPolicy(obs_dim, act_dim, num_tasks, tuple(int(h) for h in hidden), conditioned=conditioned)


def recap_mlp_policy(obs_dim: int, act_dim: int, num_tasks: int, hidden: list[int] | tuple[int, ...] = (256, 256),
                     cond_dim: int = 8) -> MLPPolicy:
    """Factory for RECAP: an :class:`MLPPolicy` conditioned on the advantage indicator (``cond``:
    :data:`COND_NONE` = unknown/unconditional, :data:`COND_NEGATIVE`, :data:`COND_POSITIVE`), fed as a
    learned ``cond_dim``-wide embedding beside the observation and one-hot task."""
    if int(cond_dim) < 1:
        raise InvalidArgument(f"cond_dim must be >= 1, got {cond_dim}", field="policy_kwargs.cond_dim", value=cond_dim)
    return MLPPolicy(obs_dim, act_dim, num_tasks, tuple(int(h) for h in hidden), conditioned=True, cond_dim=int(cond_dim))


def cfg_mix(uncond: torch.Tensor, cond: torch.Tensor, beta: float,
            low: float | None = None, high: float | None = None) -> torch.Tensor:
    """Classifier-free guidance on deterministic action outputs: ``uncond + beta * (cond - uncond)``.

    ``beta = 0`` gives the unconditional action, ``beta = 1`` the conditional one, and the result is
    linear in ``beta`` (``beta > 1`` extrapolates past the conditional action, away from the
    unconditional one). For a policy that outputs action *means* this mixes means, the deterministic
    analogue of mixing scores/log-probabilities. Optionally clamped to ``[low, high]`` (the action
    range: extrapolation can leave it)."""
    out = uncond + float(beta) * (cond - uncond)
    if low is not None or high is not None:
        out = torch.clamp(out, min=low, max=high)
    return out


@torch.no_grad()
def guided_action(policy: nn.Module, obs: torch.Tensor, task: torch.Tensor, beta: float = 1.0,
                  low: float | None = -1.0, high: float | None = 1.0) -> torch.Tensor:
    """Inference for an indicator-conditioned policy: :func:`cfg_mix` of ``policy(obs, task,
    COND_NONE)`` and ``policy(obs, task, COND_POSITIVE)`` with ``beta``, clamped to [low, high]. At
    ``beta == 1`` only the conditional forward pass runs. A policy without ``conditioned`` just runs."""
    if not getattr(policy, "conditioned", False):
        return policy(obs, task, None)
    pos = policy(obs, task, torch.full((obs.shape[0],), COND_POSITIVE, dtype=torch.long, device=obs.device))
    if float(beta) == 1.0:
        return pos if low is None and high is None else torch.clamp(pos, min=low, max=high)
    unc = policy(obs, task, torch.full((obs.shape[0],), COND_NONE, dtype=torch.long, device=obs.device))
    return cfg_mix(unc, pos, beta, low, high)


def resolve_factory(name: str) -> Callable[..., nn.Module]:
    """Import ``"module:function"``; InvalidArgument naming the value if it cannot be found."""
    return import_callable(name, field="policy_factory", what="policy factory")


def build_policy(factory: str, kwargs: dict[str, Any] | str | None, obs_dim: int, act_dim: int, num_tasks: int) -> nn.Module:
    """Build a policy from a factory name and kwargs (dict or JSON string)."""
    if isinstance(kwargs, str):
        kwargs = json.loads(kwargs) if kwargs else {}
    return resolve_factory(factory)(obs_dim, act_dim, num_tasks, **(kwargs or {}))
