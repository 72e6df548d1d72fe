"""Policy architecture plug-ins (the full contract, with an example: docs/POLICIES.md).

A job names its policy as ``"module:function"`` plus keyword arguments (JSON). The function is a
*factory*, marked with :func:`policy_factory`::

    @policy_factory
    def factory(spec: PolicySpec, **kwargs) -> Policy

``spec`` (:class:`fleetloop.specs.PolicySpec`) names the job's observation tensors (state vectors,
uint8 ``[H, W, C]`` cameras), its flat action width and bounds, and its tasks. A ``Policy`` is a
``torch.nn.Module`` with

    forward(obs: dict[str, Tensor], task: LongTensor[B], cond: LongTensor[B] | None) -> FloatTensor[B, act_dim]

``obs`` holds every observation tensor of the job, batched ``[B, *shape]`` in its spec dtype
(images stay uint8: the policy normalises them, and augments them in ``train()`` mode if it wants).
It returns the action (deterministic mean, in the action space's [-1, 1] range). ``cond`` is an
optional per-sample conditioning token (RECAP's advantage indicator: 0 = none/unconditional,
1 = negative, 2 = positive); policies that ignore it accept ``None``. The learner and every actor
build the same architecture from the same name, kwargs and specs (the handshake sends all three),
so a state dict from one loads into the other.

An *unmarked* factory is the older form ``factory(obs_dim, act_dim, num_tasks, **kwargs)`` whose
module takes one flat float tensor: :func:`build_policy` still builds it, passing the width of the
vector observations (:func:`fleetloop.specs.flatten_vectors`), and lets its module accept the dict.
"""

from __future__ import annotations

import json
from typing import Any, Callable

import torch
from torch import nn

from fleetloop.errors import InvalidArgument
from fleetloop.plugins import import_callable
from fleetloop.specs import PolicySpec, batch_size_of, flatten_vectors

_MARK = "__fleetloop_policy_spec__"

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
        self.spec: PolicySpec | None = None  # set by the factory: which tensors of a dict observation it reads

    def forward(self, obs, task: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """``obs``: a dict of observation tensors (the vector ones are read, flattened in spec
        order) or one flat float tensor ``[B, obs_dim]``."""
        obs = flatten_vectors(obs, self.spec)
        parts = [obs, nn.functional.one_hot(task.long(), self.num_tasks).to(obs.dtype)]
        if self.cond_embed is not None:
            if cond is None:
                cond = torch.zeros(obs.shape[0], dtype=torch.long, device=obs.device)
            parts.append(self.cond_embed(cond.long()))
        return torch.tanh(self.net(torch.cat(parts, dim=-1)))


def policy_factory(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Mark ``fn`` as a factory of the current form ``fn(spec: PolicySpec, **kwargs)``."""
    setattr(fn, _MARK, True)
    return fn


def _spec_args(args: tuple) -> tuple[PolicySpec, tuple[int, int, int]]:
    """``(spec)`` or the legacy ``(obs_dim, act_dim, num_tasks)`` -> (spec, dims)."""
    if len(args) == 1 and isinstance(args[0], PolicySpec):
        spec = args[0]
        return spec, (spec.vector_dim, spec.act_dim, spec.num_tasks)
    if len(args) == 3:
        spec = PolicySpec.flat(*(int(a) for a in args))
        return spec, (spec.vector_dim, spec.act_dim, spec.num_tasks)
    raise InvalidArgument(f"a policy factory takes (spec) or (obs_dim, act_dim, num_tasks), got {len(args)} arguments",
                          field="policy_factory", value=len(args))


@policy_factory
def mlp_policy(*args, hidden: list[int] | tuple[int, ...] = (256, 256), conditioned: bool = False) -> MLPPolicy:
    """Factory for :class:`MLPPolicy` (the default policy): reads the job's vector observations
    (images, if any, are ignored). Call as ``mlp_policy(spec)`` or ``mlp_policy(obs_dim, act_dim, num_tasks)``."""
    spec, (obs_dim, act_dim, num_tasks) = _spec_args(args)
    if obs_dim < 1:
        raise InvalidArgument("mlp_policy needs at least one non-image observation tensor; the job declares only "
                              f"images {[o.name for o in spec.images]} (use fleetloop.vision:visuomotor_policy)",
                              field="policy_factory", value="fleetloop.policies:mlp_policy")
    policy = MLPPolicy(obs_dim, act_dim, num_tasks, tuple(int(h) for h in hidden), conditioned=conditioned)
    policy.spec = spec
    return policy


@policy_factory
def recap_mlp_policy(*args, hidden: list[int] | tuple[int, ...] = (256, 256), cond_dim: int = 8) -> MLPPolicy:
    """Factory for RECAP: an :class:`MLPPolicy` conditioned on the advantage indicator (``cond``:
    :data:`COND_NONE` = unknown/unconditional, :data:`COND_NEGATIVE`, :data:`COND_POSITIVE`), fed as a
    learned ``cond_dim``-wide embedding beside the observation and one-hot task."""
    if int(cond_dim) < 1:
        raise InvalidArgument(f"cond_dim must be >= 1, got {cond_dim}", field="policy_kwargs.cond_dim", value=cond_dim)
    spec, (obs_dim, act_dim, num_tasks) = _spec_args(args)
    policy = MLPPolicy(obs_dim, act_dim, num_tasks, tuple(int(h) for h in hidden), conditioned=True, cond_dim=int(cond_dim))
    policy.spec = spec
    return policy


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
    n = batch_size_of(obs)
    pos = policy(obs, task, torch.full((n,), COND_POSITIVE, dtype=torch.long, device=task.device))
    if float(beta) == 1.0:
        return pos if low is None and high is None else torch.clamp(pos, min=low, max=high)
    unc = policy(obs, task, torch.full((n,), COND_NONE, dtype=torch.long, device=task.device))
    return cfg_mix(unc, pos, beta, low, high)


def resolve_factory(name: str) -> Callable[..., nn.Module]:
    """Import ``"module:function"``; InvalidArgument naming the value if it cannot be found."""
    return import_callable(name, field="policy_factory", what="policy factory")


def build_policy(factory: str, kwargs: dict[str, Any] | str | None, *spec_or_dims) -> nn.Module:
    """Build a policy from a factory name, its kwargs (dict or JSON string) and the job's
    :class:`PolicySpec` (or the legacy ``obs_dim, act_dim, num_tasks``). An unmarked (older) factory
    is called with ``(spec.vector_dim, spec.act_dim, spec.num_tasks)`` and its module is made to
    accept dict observations (their vector tensors, flattened in spec order); its state-dict keys
    are unchanged."""
    if isinstance(kwargs, str):
        kwargs = json.loads(kwargs) if kwargs else {}
    spec, dims = _spec_args(tuple(spec_or_dims))
    fn = resolve_factory(factory)
    if getattr(fn, _MARK, False):
        return fn(spec, **(kwargs or {}))
    if spec.images:
        raise InvalidArgument(f"policy factory {factory!r} takes (obs_dim, act_dim, num_tasks) and cannot read the job's "
                              f"camera tensors {[o.name for o in spec.images]}; mark a dict-observation factory with "
                              "@fleetloop.policies.policy_factory (docs/POLICIES.md)", field="policy_factory", value=factory)
    return accept_dicts(fn(*dims, **(kwargs or {})), spec)


_DICT_CLASSES: dict[type, type] = {}


class _DictInput:
    """Mixin put in front of a flat-input policy class by :func:`accept_dicts`."""

    _flat_spec: PolicySpec

    def forward(self, obs, *args, **kwargs):
        if not isinstance(obs, torch.Tensor):
            obs = flatten_vectors(obs, self._flat_spec)
        return super().forward(obs, *args, **kwargs)  # type: ignore[misc]


def accept_dicts(module: nn.Module, spec: PolicySpec) -> nn.Module:
    """Let a flat-input policy module take dict observations: its ``forward`` flattens the vector
    tensors of ``spec`` first (a bare tensor passes through). Same object, same state-dict keys
    (its class becomes a subclass that adds only this; deepcopy keeps working)."""
    cls = type(module)
    if not issubclass(cls, _DictInput):
        if cls not in _DICT_CLASSES:
            _DICT_CLASSES[cls] = type(cls.__name__, (_DictInput, cls), {"__module__": cls.__module__})
        module.__class__ = _DICT_CLASSES[cls]
    module._flat_spec = spec
    return module
