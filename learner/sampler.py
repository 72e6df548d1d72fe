"""SOP's adaptive sampler: which (task, source) each sample of a learner step comes from.

Two levels (SOP, "The adaptive sampler"):

1. **Task weights are uniform**: each of the M tasks that has any eligible data gets 1/M of the
   batch in expectation, however many steps it has streamed, so a high-throughput task cannot
   dominate.
2. **Within a task**, a share ``w_on`` of its samples is online and ``1 - w_on`` offline::

       w_on = exp(a * l_on) / (exp(a * l_on) + exp(l_off)) = sigmoid(a * l_on - l_off)

   clipped to ``clip = (0.2, 0.8)``, where ``l_on`` / ``l_off`` are the means of the last ``window``
   (W = 200) per-task online / offline losses fed to :meth:`AdaptiveSampler.observe`, and
   ``a = alpha > 1`` tilts the mix towards online data when both losses are equal (default 2.0:
   at l_on = l_off = 0.5 the share is sigmoid(0.5) = 0.62; a rising online loss, i.e. the fleet is
   finding states the policy fits badly, pulls more online samples).

The learner calls :meth:`observe` once per learner step for every (task, source) present in that
step's batch, with the mean unweighted loss of those samples; so the window is the last W
observations of that pair (= the last W learner steps in which the pair was sampled).

**Cold start** (unpublished in SOP; fleetloop's rule, applied in this order per task):

- neither source has eligible data: the task is left out of the plan (weight 0);
- no online data: ``w_on = 0`` (all offline);
- no offline data: ``w_on = 1`` (all online; the clip does not apply when a source is empty);
- fewer than ``min_losses`` losses in either window: ``w_on = 0.5`` clipped to ``clip`` (neutral);
- otherwise the formula above, clipped.

Modes: ``adaptive`` (above), ``fixed`` (``fixed_online_share``, not clipped), ``online_only`` and
``offline_only`` (tasks without data of that source are left out). The empty-source overrides hold in
every mode.

**Allocation** (:meth:`AdaptiveSampler.plan`): the expected count of pair i is
``p_i * batch_size`` with ``p_i = (1/M) * share_i``. ``systematic`` (default) rounds these by
systematic sampling with one uniform offset: every count is the floor or ceiling of its expectation,
its expectation is exact, and counts sum to ``batch_size``; ``multinomial`` draws
``rng.multinomial(batch_size, p)`` (independent per-sample draws, as in the paper, higher variance).
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any, Literal, Mapping

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from fleetloop.errors import InvalidArgument

Key = tuple[str, str]  # (task_id, "online" | "offline")
_SOURCES = ("online", "offline")


class SamplerConfig(BaseModel):
    """Configuration of :class:`AdaptiveSampler` (see the module docstring for the rules)."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["adaptive", "fixed", "online_only", "offline_only"] = Field(
        "adaptive", description="adaptive: SOP loss-driven share; fixed: fixed_online_share; online_only / offline_only: one source.")
    window: int = Field(200, ge=1, le=100_000, description="W: number of recent per-task losses averaged per source (SOP: 200).")
    alpha: float = Field(2.0, gt=1.0, le=100.0, description="a > 1 in w_on = exp(a*l_on)/(exp(a*l_on)+exp(l_off)); unpublished in SOP.")
    clip: tuple[float, float] = Field((0.2, 0.8), description="[low, high] clip of the adaptive online share (SOP: 0.2, 0.8).")
    fixed_online_share: float = Field(0.5, ge=0.0, le=1.0, description="Online share per task in mode 'fixed'.")
    min_losses: int = Field(10, ge=1, description="Losses needed in BOTH windows before the formula is used; until then the share is 0.5 (clipped).")
    allocation: Literal["systematic", "multinomial"] = Field(
        "systematic", description="How expected counts become integers: systematic rounding (low variance) or multinomial draws.")

    @model_validator(mode="after")
    def _check(self) -> "SamplerConfig":
        lo, hi = self.clip
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"clip must satisfy 0 <= low <= high <= 1, got {self.clip}")
        return self


class AdaptiveSampler:
    """Per-task adaptive online/offline mix with uniform task weights (not thread-safe: the training
    loop owns it)."""

    def __init__(self, task_ids: list[str], config: SamplerConfig | None = None) -> None:
        if not task_ids or len(set(task_ids)) != len(task_ids):
            raise InvalidArgument(f"task_ids must be non-empty and unique, got {task_ids}", field="task_ids", value=task_ids)
        self.task_ids = list(task_ids)
        self.config = config or SamplerConfig()
        self._losses: dict[Key, deque[float]] = {(t, s): deque(maxlen=self.config.window) for t in self.task_ids for s in _SOURCES}
        self._available: dict[Key, int] = {k: 0 for k in self._losses}

    def _check_task(self, task: str) -> None:
        if (task, "online") not in self._losses:
            raise InvalidArgument(f"unknown task {task!r}; this job's tasks are {self.task_ids}", field="task", value=task)

    def _check_key(self, key: Key) -> None:
        task, source = key
        self._check_task(task)
        if source not in _SOURCES:
            raise InvalidArgument(f"source must be 'online' or 'offline', got {source!r}", field="source", value=source)

    def mean_loss(self, task: str, source: str) -> float | None:
        """Moving-average loss of (task, source) over its window; None before any observation."""
        self._check_key((task, source))
        d = self._losses[(task, source)]
        return sum(d) / len(d) if d else None

    def online_share(self, task: str, available: Mapping[Key, int] | None = None) -> float:
        """The online share w_on of ``task`` in [0, 1] (cold-start rules in the module docstring).

        ``available`` maps (task, source) to the number of eligible steps; default: the counts last
        passed to :meth:`plan` (none yet = no data, so 0.0).
        """
        self._check_task(task)
        avail = self._available if available is None else available
        has_on = avail.get((task, "online"), 0) > 0
        has_off = avail.get((task, "offline"), 0) > 0
        if not has_on:
            return 0.0
        if not has_off:
            return 1.0
        cfg = self.config
        lo, hi = cfg.clip
        if cfg.mode == "online_only":
            return 1.0
        if cfg.mode == "offline_only":
            return 0.0
        if cfg.mode == "fixed":
            return cfg.fixed_online_share
        on, off = self._losses[(task, "online")], self._losses[(task, "offline")]
        if len(on) < cfg.min_losses or len(off) < cfg.min_losses:
            return min(max(0.5, lo), hi)
        z = cfg.alpha * (sum(on) / len(on)) - sum(off) / len(off)
        w = 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))
        return min(max(w, lo), hi)

    def _eligible(self, task: str, avail: Mapping[Key, int]) -> bool:
        has_on = avail.get((task, "online"), 0) > 0
        has_off = avail.get((task, "offline"), 0) > 0
        mode = self.config.mode
        if mode == "online_only":
            return has_on
        if mode == "offline_only":
            return has_off
        return has_on or has_off

    def plan(self, batch_size: int, available: Mapping[Key, int], rng: np.random.Generator) -> dict[Key, int]:
        """Counts per (task, source), summing exactly to ``batch_size``; only positive counts appear.

        ``available`` gives the eligible steps per (task, source) (e.g. intervention steps only for
        HG-DAgger's online source); a pair with 0 available never gets a count (samples are drawn
        with replacement, so a count may exceed a positive availability). Missing keys count as 0.
        Returns ``{}`` if no task has eligible data. Remembers ``available`` for :meth:`online_share`.
        """
        if batch_size < 0:
            raise InvalidArgument(f"batch_size must be >= 0, got {batch_size}", field="batch_size", value=batch_size)
        for key in available:
            self._check_key(key)
        self._available = {k: int(available.get(k, 0)) for k in self._losses}
        tasks = [t for t in self.task_ids if self._eligible(t, self._available)]
        if not tasks or batch_size == 0:
            return {}
        keys: list[Key] = []
        probs: list[float] = []
        for t in tasks:
            w = self.online_share(t)
            keys += [(t, "online"), (t, "offline")]
            probs += [w / len(tasks), (1.0 - w) / len(tasks)]
        p = np.asarray(probs, dtype=np.float64)
        p /= p.sum()
        if self.config.allocation == "multinomial":
            counts = rng.multinomial(batch_size, p)
        else:
            edges = np.floor(np.concatenate([[0.0], np.cumsum(p) * batch_size]) + rng.random())
            edges[-1] = batch_size  # floor(batch_size + u) with u in [0, 1); guards against cumsum rounding
            counts = np.diff(edges).astype(np.int64)
        return {k: int(c) for k, c in zip(keys, counts) if c > 0}

    def observe(self, task: str, source: str, loss: float) -> None:
        """Record the mean loss of (task, source) samples in one learner step. Non-finite losses are
        refused (InvalidArgument) so one bad step cannot poison the window."""
        self._check_key((task, source))
        loss = float(loss)
        if not math.isfinite(loss):
            raise InvalidArgument(f"loss for {task!r}/{source} must be finite, got {loss}", field="loss", value=loss)
        self._losses[(task, source)].append(loss)

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """Per task: ``online_share``, ``loss_online``, ``loss_offline`` (None before data) and the
        window fill ``n_online`` / ``n_offline``, for metrics and the dashboard."""
        return {
            t: {
                "online_share": self.online_share(t),
                "loss_online": self.mean_loss(t, "online"),
                "loss_offline": self.mean_loss(t, "offline"),
                "n_online": len(self._losses[(t, "online")]),
                "n_offline": len(self._losses[(t, "offline")]),
            }
            for t in self.task_ids
        }

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state: the loss windows per task and source."""
        return {"format": 1, "losses": {t: {s: list(self._losses[(t, s)]) for s in _SOURCES} for t in self.task_ids}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore loss windows (newest ``window`` kept); tasks no longer in the job are ignored."""
        losses = state.get("losses")
        if not isinstance(losses, Mapping):
            raise InvalidArgument("sampler state lacks a 'losses' mapping", field="losses", value=type(losses).__name__)
        for t, per_source in losses.items():
            if (t, "online") not in self._losses:
                continue
            for s in _SOURCES:
                d = self._losses[(t, s)]
                d.clear()
                d.extend(float(x) for x in per_source.get(s, []))
