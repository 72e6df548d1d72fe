"""The pure :class:`Algorithm` interface (no I/O, no threads) and the algorithm registry.

An algorithm owns the policy's parameters and its optimizer, and turns one :class:`Batch` into one
gradient step: ``theta <- G(theta, batch)`` (SOP's plug-in point). The learner around it decides
*what* to sample (asking :meth:`Algorithm.eligible`), gates it for staleness (with
:meth:`Algorithm.default_staleness` unless the job overrides it), calls :meth:`Algorithm.update`,
feeds :attr:`UpdateResult.per_sample_loss` back to the sampler, and publishes
:meth:`Algorithm.policy_state_dict` every K steps.

Adding an algorithm: subclass :class:`Algorithm`, set ``name`` and ``Config`` (a pydantic model with
``extra='forbid'``), decorate with :func:`register`, and import the module in
``learner/algorithms/__init__.py``.
"""

from __future__ import annotations

import abc
import copy
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Mapping

import numpy as np
import torch
from pydantic import BaseModel, ValidationError
from torch import nn

from fleetloop.errors import InvalidArgument
from learner.batch import Batch
from learner.staleness import StalenessConfig


@dataclass
class UpdateResult:
    """What one :meth:`Algorithm.update` reports.

    ``loss``: the scalar that was minimised (weighted, masked). ``per_sample_loss``: float32 [N], the
    *unweighted* loss of every sample of the batch in batch order, including samples that did not
    contribute to the gradient (masked out or weight 0), so the learner can average it per
    (task, source) for the sampler. ``stats``: extra scalars for metrics (names without prefix).
    """

    loss: float
    per_sample_loss: np.ndarray
    stats: dict[str, float] = field(default_factory=dict)


class Algorithm(abc.ABC):
    """Base class. Subclasses implement :meth:`update` and may override :meth:`eligible` and
    :meth:`default_staleness`.

    Invariants: ``policy`` lives on ``device``; ``step`` counts optimizer steps taken (updates that
    had nothing to train on do not count); :meth:`state_dict` round-trips through
    :meth:`load_state_dict` exactly (policy, optimizer, step).
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type[BaseModel]] = BaseModel

    def __init__(self, policy: nn.Module, config: BaseModel, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.policy = policy.to(self.device)
        self.config = config
        self.step = 0
        self.optimizer = self.make_optimizer()

    @abc.abstractmethod
    def make_optimizer(self) -> torch.optim.Optimizer:
        """Build the optimizer over ``self.policy``'s parameters (called once by ``__init__``)."""

    @abc.abstractmethod
    def update(self, batch: Batch) -> UpdateResult:
        """One gradient step on ``batch`` (already on ``self.device``); respects ``batch.weights``."""

    def eligible(self, source: Literal["online", "offline"]) -> dict[str, Any]:
        """Keyword arguments for ``ReplayStore.size`` / ``sample`` telling which frames of ``source``
        to draw (default: all frames: ``{"interventions_only": False}``)."""
        if source not in ("online", "offline"):
            raise InvalidArgument(f"source must be 'online' or 'offline', got {source!r}", field="source", value=source)
        return {"interventions_only": False}

    def default_staleness(self) -> StalenessConfig:
        """The algorithm's staleness bound and policy (the job may override it)."""
        return StalenessConfig()

    def policy_state_dict(self) -> dict[str, torch.Tensor]:
        """Detached, contiguous CPU copies of the policy weights, for publishing."""
        return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in self.policy.state_dict().items()}

    def state_dict(self) -> dict[str, Any]:
        """Everything to resume: ``policy``, ``optimizer``, ``step``, and ``name``/``config`` for checks.

        A snapshot on the CPU: no tensor is shared with the live model or optimizer, so later updates
        do not change it (it can be written out asynchronously)."""
        return {
            "name": self.name,
            "config": self.config.model_dump(mode="json"),
            "policy": self.policy_state_dict(),
            "optimizer": _cpu_copy(self.optimizer.state_dict()),
            "step": self.step,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output. InvalidArgument if it belongs to another algorithm."""
        if state.get("name", self.name) != self.name:
            raise InvalidArgument(f"checkpoint is for algorithm {state.get('name')!r}, not {self.name!r}",
                                  field="algorithm", value=state.get("name"))
        self.policy.load_state_dict(state["policy"])
        self.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))  # never alias the caller's tensors
        self.step = int(state.get("step", 0))


def _cpu_copy(obj: Any) -> Any:
    """Deep copy of nested dicts/lists with every tensor cloned to the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu_copy(v) for v in obj)
    return copy.deepcopy(obj)


ALGORITHMS: dict[str, type[Algorithm]] = {}


def register(cls: type[Algorithm]) -> type[Algorithm]:
    """Class decorator adding ``cls`` to :data:`ALGORITHMS` under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    ALGORITHMS[cls.name] = cls
    return cls


def make_algorithm(name: str, policy: nn.Module, params: Mapping[str, Any] | None, device: torch.device | str = "cpu") -> Algorithm:
    """Build the algorithm ``name`` with config ``params``.

    InvalidArgument naming the value for an unknown name, and naming the field (e.g.
    ``algorithm_params.lr``) for a bad or unknown parameter.
    """
    cls = ALGORITHMS.get(name)
    if cls is None:
        raise InvalidArgument(f"unknown algorithm {name!r}; known: {sorted(ALGORITHMS)}", field="algorithm", value=name)
    try:
        config = cls.Config.model_validate(dict(params or {}))
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        raise InvalidArgument(f"algorithm_params.{loc} for {name!r}: {err['msg']} (got {err.get('input')!r})",
                              field=f"algorithm_params.{loc}", value=err.get("input")) from None
    return cls(policy, config, device)
