"""Staleness gate (DESIGN invariant 3): the bound, and what happens to data past it.

**Staleness** of an online sample = learner version at training time minus the behaviour policy
version that produced it. Offline demonstrations were produced by no policy of this run: their
staleness is reported as 0 and they are never dropped or down-weighted. Staleness below 0 (an
actor claims a version newer than the learner's, e.g. after the learner resumed from an older
checkpoint) is reported as is and treated as *past the bound* with reason ``future_version``: the
learner cannot vouch for the policy that produced it.

**Expert labels do not go stale**: with ``admit_expert`` (default), intervention frames (the human's
action) and offline demos are always admitted at full weight; only autonomous frames are gated.

Policy past the bound (``staleness > bound``) for autonomous frames:

- ``drop``: the sample is removed (``keep`` False, weight 0);
- ``downweight``: kept with weight ``downweight_factor ** (staleness - bound)`` (so 1 step past the
  bound gets ``factor``, 2 steps ``factor**2``, ...); ``future_version`` samples are still dropped;
- ``admit``: kept at weight 1 (staleness is still measured and exported).

The gate runs twice. At ingest (:meth:`StalenessGate.at_ingest`, per chunk) it refuses chunks that
could never be trained on, so they do not take buffer space: staleness only grows after ingest, so a
chunk past the bound under ``drop`` would be dropped at training anyway. At training
(:meth:`StalenessGate.at_training`, per sample) it applies the rule above with the current version.
Counters of both are in :meth:`StalenessGate.stats`. Not thread-safe by itself: callers that share
one gate between the ingest and training threads only race on counters (plain ints).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

OFFLINE = 1  # source code of offline samples (learner.batch.OFFLINE)


class StalenessConfig(BaseModel):
    """Per-algorithm staleness bound and policy (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")

    bound: int = Field(8, ge=0, le=1_000_000, description="Largest staleness (learner version - behaviour version) trained on at full weight.")
    policy: Literal["drop", "downweight", "admit"] = Field(
        "drop", description="What happens to autonomous frames past the bound: drop them, down-weight them, or admit them.")
    downweight_factor: float = Field(0.5, gt=0.0, le=1.0, description="Policy 'downweight': weight = factor ** (staleness - bound) past the bound.")
    admit_expert: bool = Field(True, description="Intervention frames and offline demos are always admitted at full weight (expert labels do not go stale).")


@dataclass(frozen=True)
class Decision:
    """Outcome of :meth:`StalenessGate.at_ingest` for one chunk.

    ``admit``: store the chunk. ``expert_only``: the chunk is past the bound and only its expert
    (intervention) frames are useful; the caller may store just those (storing all is also correct:
    the training-time gate drops the rest). ``reason``: ``fresh``, ``expert``, ``stale_admitted``,
    ``stale_downweighted``, ``stale_expert_only`` (admitted), ``stale`` or ``future_version`` (dropped).
    """

    admit: bool
    reason: str
    staleness: int
    expert_only: bool = False


class StalenessGate:
    """Applies a :class:`StalenessConfig` at ingest (per chunk) and at training (per sample)."""

    def __init__(self, config: StalenessConfig | None = None) -> None:
        self.config = config or StalenessConfig()
        self._ingest: dict[str, int] = {}
        self._ingest_dropped_steps = 0
        self._train: dict[str, int] = {"seen": 0, "dropped_stale": 0, "dropped_future_version": 0, "downweighted": 0,
                                       "admitted_past_bound": 0, "expert_past_bound": 0}
        self._last = {"max": 0, "mean": 0.0}

    def at_ingest(
        self,
        learner_version: int,
        behavior_version: int,
        has_autonomous_steps: bool,
        has_expert_steps: bool | None = None,
        num_steps: int = 0,
    ) -> Decision:
        """Admit or drop one online chunk produced by ``behavior_version``.

        ``has_expert_steps`` None (not told) is treated as "may hold expert frames": with
        ``admit_expert`` a stale mixed chunk is then admitted (``expert_only``) rather than risk
        losing human corrections. ``num_steps`` only feeds the dropped-steps counter.
        """
        cfg = self.config
        s = int(learner_version) - int(behavior_version)
        if 0 <= s <= cfg.bound:
            d = Decision(True, "fresh", s)
        elif not has_autonomous_steps and cfg.admit_expert:
            d = Decision(True, "expert", s)
        elif s >= 0 and cfg.policy == "admit":
            d = Decision(True, "stale_admitted", s)
        elif s >= 0 and cfg.policy == "downweight":
            d = Decision(True, "stale_downweighted", s)
        elif cfg.admit_expert and has_expert_steps is not False:
            d = Decision(True, "stale_expert_only", s, expert_only=True)
        else:
            d = Decision(False, "future_version" if s < 0 else "stale", s)
        self._ingest[d.reason] = self._ingest.get(d.reason, 0) + 1
        if not d.admit:
            self._ingest_dropped_steps += int(num_steps)
        return d

    def at_training(
        self,
        learner_version: int,
        versions: np.ndarray,
        interventions: np.ndarray,
        source: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Gate N sampled steps. Returns ``(keep [N] bool, weights [N] float32, staleness [N] int64)``.

        ``weights`` is 0 wherever ``keep`` is False. ``staleness`` is 0 for offline samples and
        ``learner_version - versions`` (possibly negative) for online ones.
        """
        cfg = self.config
        versions = np.asarray(versions, dtype=np.int64)
        offline = np.asarray(source) == OFFLINE
        expert = offline | np.asarray(interventions, dtype=bool) if cfg.admit_expert else offline
        staleness = np.where(offline, 0, int(learner_version) - versions).astype(np.int64)
        future = staleness < 0
        over = (staleness > cfg.bound) | future
        gated = over & ~expert
        keep = np.ones(staleness.shape, dtype=bool)
        weights = np.ones(staleness.shape, dtype=np.float32)
        if cfg.policy == "drop":
            keep &= ~gated
        elif cfg.policy == "downweight":
            keep &= ~(gated & future)
            dw = gated & ~future
            weights[dw] = np.power(cfg.downweight_factor, (staleness[dw] - cfg.bound).astype(np.float64)).astype(np.float32)
            self._train["downweighted"] += int(dw.sum())
        else:  # admit
            keep &= ~(gated & future)
            self._train["admitted_past_bound"] += int((gated & ~future).sum())
        weights[~keep] = 0.0
        dropped = ~keep
        self._train["seen"] += int(staleness.size)
        self._train["dropped_future_version"] += int((dropped & future).sum())
        self._train["dropped_stale"] += int((dropped & ~future).sum())
        self._train["expert_past_bound"] += int((over & expert & ~offline).sum())
        online_kept = staleness[keep & ~offline]
        self._last = {"max": int(online_kept.max()) if online_kept.size else 0,
                      "mean": float(online_kept.mean()) if online_kept.size else 0.0}
        return keep, weights, staleness

    def stats(self) -> dict[str, object]:
        """JSON-serialisable counters: ``bound``, ``policy``, ``ingest_chunks`` (by decision reason),
        ``ingest_dropped_steps``, ``train_samples`` (seen / dropped_stale / dropped_future_version /
        downweighted / admitted_past_bound / expert_past_bound) and the last batch's online staleness
        ``last_max`` / ``last_mean``."""
        return {
            "bound": self.config.bound,
            "policy": self.config.policy,
            "ingest_chunks": dict(self._ingest),
            "ingest_dropped_steps": self._ingest_dropped_steps,
            "train_samples": dict(self._train),
            "last_max": self._last["max"],
            "last_mean": self._last["mean"],
        }
