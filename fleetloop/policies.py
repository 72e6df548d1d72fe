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

import importlib
import json
from typing import Any, Callable

import torch
from torch import nn

from fleetloop.errors import InvalidArgument

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


def resolve_factory(name: str) -> Callable[..., nn.Module]:
    """Import ``"module:function"``; InvalidArgument naming the value if it cannot be found."""
    if ":" not in name:
        raise InvalidArgument(f"policy factory {name!r} must look like 'module:function'", field="policy_factory", value=name)
    module_name, func_name = name.split(":", 1)
    try:
        func = getattr(importlib.import_module(module_name), func_name)
    except (ImportError, AttributeError) as exc:
        raise InvalidArgument(f"policy factory {name!r} not importable: {exc}", field="policy_factory", value=name) from exc
    if not callable(func):
        raise InvalidArgument(f"policy factory {name!r} is not callable", field="policy_factory", value=name)
    return func


def build_policy(factory: str, kwargs: dict[str, Any] | str | None, obs_dim: int, act_dim: int, num_tasks: int) -> nn.Module:
    """Build a policy from a factory name and kwargs (dict or JSON string)."""
    if isinstance(kwargs, str):
        kwargs = json.loads(kwargs) if kwargs else {}
    return resolve_factory(factory)(obs_dim, act_dim, num_tasks, **(kwargs or {}))
