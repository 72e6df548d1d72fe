"""A realistic release snapshot in the contract's JSON (docs/notes/issue21-plan.md), as the learner's
control agent writes it under ``fleetloop.redis_keys.releases(job_id)``: a canary rollout of an 8-robot
fleet with v14 as candidate on two robots against stable v12, one earlier automatic rollback (v13)
and one earlier automatic promotion (v12)."""

from __future__ import annotations

import json
import time
from typing import Any

from fleetloop import redis_keys as keys

POLICY = {"strategy": "canary", "canary_fraction": 0.25, "canary_actors": [], "min_episodes": 10, "max_episodes": 60,
          "metrics": ["autonomous_success", "intervention_rate"], "max_regression": 0.1, "confidence": 0.95,
          "retrain_from_stable_on_rollback": True}
CANARY = ["arm-02", "arm-07"]
STABLE = ["arm-01", "arm-03", "arm-04", "arm-05", "arm-06", "arm-08"]
ROLLBACK_REASON = ("autonomous_success of v13 0.41 vs stable v12 0.63 over 12/40 episodes: worse by more than "
                   "max_regression 0.1 with probability 0.98 >= confidence 0.95")
PROMOTE_REASON = ("v12 not worse than stable v11 on autonomous_success (0.66 vs 0.63) and intervention_rate "
                  "(0.08 vs 0.09) with probability 0.97 >= confidence 0.95 after 14/42 episodes")


def cohort(episodes: int, success: float | None, intervention: float | None, length: float | None,
           reward: float | None = None, per_task: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"episodes": episodes, "autonomous_success": success, "intervention_rate": intervention,
            "episode_length": length, "reward": reward, "per_task": per_task or {}}


def snapshot(now: float | None = None) -> dict[str, Any]:
    """The snapshot of the module docstring (times relative to ``now``)."""
    now = time.time() if now is None else now
    return {
        "strategy": "canary", "policy": dict(POLICY), "stable": 12, "candidate": 14,
        "cohorts": {"canary": list(CANARY), "stable": list(STABLE)},
        "evidence": {
            "candidate": cohort(7, 0.714, 0.061, 143.0, per_task={
                "reach-v3": cohort(4, 0.75, 0.05, 120.0), "push-v3": cohort(3, 0.667, 0.074, 173.7)}),
            "stable": cohort(23, 0.652, 0.083, 151.2, per_task={
                "reach-v3": cohort(12, 0.75, 0.06, 128.0), "push-v3": cohort(11, 0.545, 0.104, 176.5)}),
        },
        "history": [
            {"id": 1, "candidate": 12, "stable": 11, "opened_at": now - 1500, "decided_at": now - 1200,
             "decision": "promoted", "by": "auto", "reason": PROMOTE_REASON, "episodes": {"canary": 14, "stable": 42},
             "metrics": {"candidate": cohort(14, 0.66, 0.08, 148.0), "stable": cohort(42, 0.63, 0.09, 150.0)},
             "p_not_worse": 0.97},
            {"id": 2, "candidate": 13, "stable": 12, "opened_at": now - 1100, "decided_at": now - 700,
             "decision": "rolled_back", "by": "auto", "reason": ROLLBACK_REASON, "episodes": {"canary": 12, "stable": 40},
             "metrics": {"candidate": cohort(12, 0.41, 0.19, 182.0), "stable": cohort(40, 0.63, 0.08, 150.5)},
             "p_not_worse": 0.02},
        ],
        "time": now,
    }


def write_snapshot(r, job_id: str, snap: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``snap`` (default :func:`snapshot`) where the learner's control agent writes it; returns it."""
    snap = snapshot() if snap is None else snap
    r.set(keys.releases(job_id), json.dumps(snap))
    return snap
