"""``fleetloop experiment releases`` (issue 21): the same job with ``strategy: all`` and ``strategy: canary``.

One :class:`ReleaseRun` is an SOP run (:class:`services.harness.experiment_run.Run`: same robots,
tasks, start policy, scripted operator and robot-step budget) whose learner has the spec's rollout
policy. What differs from the other experiments:

* **evaluated version**: the version the *stable* fleet runs. Periodic evaluation takes the stable
  version (canary) or the version announced to the fleet (all); the final protocol evaluation
  (``final``, ``final_mean``) is of the version the stable fleet ran at the budget. For canary the newest
  trained version (the one training stopped at) gets the protocol evaluation too (``releases.newest``):
  the gap between the two is the price of waiting for evidence, not of worse training.
* ``releases`` in the run record (:func:`release_record`): the learner's release snapshot at the budget
  (stable, candidate, cohorts, history of decisions), counts (candidates, promotions, rollbacks),
  time to promotion (seconds and candidate episodes from a candidate opened to promoted), exposure
  (robot-episodes by the channel of their version when they ended: ``candidate``, ``stable``, ``other``
  (neither: a robot that had not swapped yet); strategy all: every episode ran the newest version,
  which nobody vetted, so its exposure is 1), the fleet's online success (from the learner's episode
  records: autonomous = success without an operator step) over the whole run, the last quarter of it
  and in ``BINS`` bins of robot time, and each decision placed on the robot-time axis.

Robot time on these axes is ``robot minutes per robot``: the steps of the episodes ended so far /
(robots x hz x 60), so the budget ends at ``minutes``. Only episodes that ended before the budget count.
:func:`summarize_releases` turns the run records into the ``releases`` block of ``releases.json``.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Sequence

from services.harness import experiment_metrics as M
from services.harness.experiment_run import Run

BINS = 10
LAST_SHARE = 0.25  # "the last part of the run": its last quarter of robot time


class ReleaseRun(Run):
    """An SOP run judged by what the stable fleet runs (module docstring)."""

    def canary(self) -> bool:
        return self.learner.core.releases.policy.strategy == "canary"

    def fleet_version(self) -> int:
        """The version the stable fleet runs now: stable (canary) or the newest announced one (all)."""
        core = self.learner.core
        stable = core.releases.stable
        if self.canary() and stable is not None:
            return int(stable)
        return int(core.weights.fleet_version().version)

    def eval_snapshot(self) -> tuple[int, bytes]:
        v = self.fleet_version()
        return v, self.learner.core.weights.blob(v)

    def at_stop(self) -> dict[str, Any]:
        core = self.learner.core
        return {"fleet_version": self.fleet_version(), "stop_unix": time.time(), "t0_unix": time.time() - self.now(),
                "releases_snapshot": {**core.releases.snapshot(), "opened_at": core.releases.opened_at},
                "exposure_metric": {ch: core.metrics.release_exposure.labels(core.job, ch)._value.get()
                                    for ch in ("candidate", "stable", "other", "all", "pinned")}}

    def sop(self) -> dict[str, Any]:
        stop = super().sop()
        stop["newest_version"], stop["final_version"] = stop["final_version"], stop["fleet_version"]
        return stop

    def execute(self) -> dict[str, Any]:
        self._newest: dict[str, Any] | None = None
        return super().execute()

    def _record(self, stop: dict[str, Any], final: dict[str, dict], learner_end: dict[str, Any]) -> dict[str, Any]:
        record = super()._record(stop, final, learner_end)
        spec = self.spec
        newest = None
        if self.canary() and stop["newest_version"] != stop["final_version"]:
            from services.harness.evaluation import EvalPool
            path = self.run_dir / "learner" / "weights" / f"v{stop['newest_version']}.safetensors"
            with EvalPool(spec.eval_workers, nice=10) as pool:
                newest = pool.evaluate(path, spec.tasks, spec.eval_trials, policy_factory=spec.policy_factory,
                                       policy_kwargs=spec.policy_kwargs, hz=spec.hz, max_steps=spec.max_episode_steps,
                                       guidance_beta=spec.eval_guidance_beta)
        else:
            newest = final
        episodes = [e if isinstance(e, dict) else vars(e) for e in self.learner.core.episodes_since(0)[1]]
        record["releases"] = release_record(stop, episodes, spec.robots, spec.hz, spec.minutes, spec.tasks,
                                            {"version": stop["newest_version"], "results": newest})
        return record


# -- pure bookkeeping (tested without robots) -------------------------------------------------------
def _rate(eps: Sequence[dict[str, Any]], key: str) -> float | None:
    if not eps:
        return None
    if key == "autonomous_success":
        return sum(e["outcome"] == "success" and int(e["intervention_steps"]) == 0 for e in eps) / len(eps)
    if key == "fleet_success":
        return sum(e["outcome"] == "success" for e in eps) / len(eps)
    steps = sum(int(e["steps"]) for e in eps)
    return sum(int(e["intervention_steps"]) for e in eps) / steps if steps else 0.0


def online_stats(eps: Sequence[dict[str, Any]], tasks: Sequence[str]) -> dict[str, Any]:
    """Online figures of some episodes: autonomous success (mean over the tasks that have episodes, and
    episode-weighted), fleet success (operator help allowed), intervention share of the steps."""
    per_task = {t: _rate([e for e in eps if e["task_id"] == t], "autonomous_success") for t in tasks}
    have = [v for v in per_task.values() if v is not None]
    return {"episodes": len(eps), "autonomous_success": sum(have) / len(have) if have else None,
            "autonomous_success_episodes": _rate(eps, "autonomous_success"),
            "fleet_success": _rate(eps, "fleet_success"), "intervention_share": _rate(eps, "intervention_share"),
            "per_task": per_task}


def _windows(history: list[dict[str, Any]], snap: dict[str, Any], stop_unix: float) -> list[tuple[int, float, float, str]]:
    """(candidate, opened_at, closed_at, outcome) of every candidate window; the open one ends at the budget."""
    out = [(int(h["candidate"]), float(h["opened_at"] or 0.0), float(h["decided_at"]), h["decision"]) for h in history]
    if snap.get("candidate") is not None:
        opened = snap.get("opened_at") or max((w[2] for w in out), default=0.0)
        out.append((int(snap["candidate"]), float(opened), stop_unix, "open"))
    return out


def channel_of(e: dict[str, Any], windows: list[tuple[int, float, float, str]], stables: list[tuple[float, int]],
               strategy: str) -> tuple[str, str | None]:
    """(channel, outcome of its candidate window) of an episode: ``all`` (strategy all), ``candidate``
    (it ran a candidate while that candidate's window was open), ``stable`` (the stable version of that
    moment) or ``other``."""
    if strategy != "canary":
        return "all", None
    v, t = int(e["behavior_version"]), float(e["time"])
    for cand, opened, closed, outcome in windows:
        if v == cand and opened <= t <= closed + 1e-6:
            return "candidate", outcome
    stable = next((s for at, s in reversed(stables) if at <= t), stables[0][1] if stables else None)
    return ("stable" if v == stable else "other"), None


def _ms(vals: Sequence[float]) -> dict[str, Any]:
    return {"n": len(vals), "median": statistics.median(vals) if vals else None,
            "mean": statistics.fmean(vals) if vals else None}


def release_record(stop: dict[str, Any], episodes: list[dict[str, Any]], robots: int, hz: float, minutes: float,
                   tasks: Sequence[str], newest: dict[str, Any]) -> dict[str, Any]:
    """The ``releases`` block of a run record (module docstring)."""
    snap, stop_unix, t0 = stop["releases_snapshot"], float(stop["stop_unix"]), float(stop["t0_unix"])
    strategy, history = snap["strategy"], [h for h in snap["history"] if h["decided_at"] <= stop_unix]
    eps = sorted((e for e in episodes if float(e["time"]) <= stop_unix), key=lambda e: float(e["time"]))
    scale = robots * hz * 60.0
    cum, xs = 0, []
    for e in eps:
        cum += int(e["steps"])
        xs.append(cum / scale)

    def x_at(unix: float) -> float:
        return max((x for x, e in zip(xs, eps) if float(e["time"]) <= unix), default=0.0)

    windows = _windows(history, snap, stop_unix)
    first_stable = history[0]["stable"] if history else snap.get("stable")
    stables = [(t0 - 1e9, first_stable)] + [(float(h["decided_at"]), int(h["candidate"])) for h in history
                                            if h["decision"] == "promoted"]
    canary = set(snap["cohorts"]["canary"])
    chans = [channel_of(e, windows, stables, strategy) for e in eps]
    exposure = {ch: sum(c == ch for c, _ in chans) for ch in ("candidate", "stable", "other", "all")}
    exposure["rolled_back_candidates"] = sum(c == "candidate" and o == "rolled_back" for c, o in chans)
    total = len(eps)
    exposure["total"] = total
    exposure["candidate_share"] = ((exposure["candidate"] if strategy == "canary" else exposure["all"]) / total
                                   if total else None)
    exposure["rolled_back_share"] = exposure["rolled_back_candidates"] / total if total else None
    promoted = [h for h in history if h["decision"] == "promoted"]
    end_x = xs[-1] if xs else 0.0
    last_from = end_x * (1.0 - LAST_SHARE)
    width = max(minutes, end_x) / BINS
    bins = []
    for i in range(BINS):
        lo, hi = i * width, (i + 1) * width
        inside = [e for x, e in zip(xs, eps) if lo < x <= hi or (i == 0 and x == 0)]
        row = {"x0": lo, "x1": hi, **{k: v for k, v in online_stats(inside, tasks).items() if k != "per_task"}}
        if strategy == "canary":
            row["canary"] = _rate([e for e in inside if e["actor_id"] in canary], "autonomous_success")
            row["stable_cohort"] = _rate([e for e in inside if e["actor_id"] not in canary], "autonomous_success")
        bins.append(row)
    last = [e for x, e in zip(xs, eps) if x > last_from]
    stable_promoted_at = next((float(h["decided_at"]) for h in reversed(promoted)
                               if int(h["candidate"]) == int(stop["fleet_version"])), t0)
    return {
        "strategy": strategy, "policy": snap["policy"], "cohorts": snap["cohorts"],
        "fleet_version": stop["fleet_version"], "newest_version": newest["version"],
        "stable_at_budget": snap.get("stable"), "candidate_at_budget": snap.get("candidate"),
        "versions_behind": int(newest["version"]) - int(stop["fleet_version"]),
        "fleet_version_age_s": stop_unix - stable_promoted_at if strategy == "canary" else 0.0,
        "newest": {"results": newest["results"],
                   "mean": M.mean_over_tasks({t: r["success_rate"] for t, r in (newest["results"] or {}).items()})},
        "candidates": len(windows), "decisions": len(history),
        "promotions": len(promoted), "rollbacks": sum(h["decision"] == "rolled_back" for h in history),
        "aborted": sum(h["decision"] == "aborted" for h in history),
        "time_to_promotion_s": _ms([float(h["decided_at"]) - float(h["opened_at"]) for h in promoted if h["opened_at"]]),
        "time_to_rollback_s": _ms([float(h["decided_at"]) - float(h["opened_at"]) for h in history
                                   if h["decision"] == "rolled_back" and h["opened_at"]]),
        "episodes_to_decision": _ms([float(h["episodes"]["canary"]) for h in history]),
        "robot_minutes_to_promotion": _ms([x_at(float(h["decided_at"])) - x_at(float(h["opened_at"]))
                                           for h in promoted if h["opened_at"]]),
        "exposure": exposure, "exposure_metric": stop.get("exposure_metric"),
        "online": online_stats(eps, tasks), "online_last": {"from_robot_minutes": last_from, **online_stats(last, tasks)},
        "online_bins": bins, "robot_minutes_at_budget": end_x,
        "decision_marks": [{"id": h["id"], "candidate": h["candidate"], "stable": h["stable"], "decision": h["decision"],
                            "by": h["by"], "t": float(h["decided_at"]) - t0, "x": x_at(float(h["decided_at"])),
                            "opened_t": float(h["opened_at"] or t0) - t0, "episodes": h["episodes"],
                            "p_not_worse": h.get("p_not_worse"), "reason": h["reason"]} for h in history],
        "history": history,
    }


SUMMARY_FIELDS = {  # releases summary name -> dotted path in a run record
    "final_mean": "final_mean", "newest_mean": "releases.newest.mean", "pretrained_mean": "pretrained_mean",
    "online_autonomous_success": "releases.online.autonomous_success",
    "online_last_autonomous_success": "releases.online_last.autonomous_success",
    "online_last_fleet_success": "releases.online_last.fleet_success",
    "online_last_intervention_share": "releases.online_last.intervention_share",
    "candidates": "releases.candidates", "promotions": "releases.promotions", "rollbacks": "releases.rollbacks",
    "exposure_candidate_share": "releases.exposure.candidate_share",
    "exposure_rolled_back_share": "releases.exposure.rolled_back_share",
    "time_to_promotion_median_s": "releases.time_to_promotion_s.median",
    "time_to_promotion_mean_s": "releases.time_to_promotion_s.mean",
    "episodes_to_decision_mean": "releases.episodes_to_decision.mean",
    "versions_behind": "releases.versions_behind", "fleet_version_age_s": "releases.fleet_version_age_s",
    "robot_steps": "usage.robot_steps", "episodes": "usage.episodes", "learner_steps": "usage.learner_steps",
    "intervention_share": "usage.intervention_share", "pace_ratio": "usage.pace_ratio",
}


def summarize_releases(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per strategy: mean/std over seeds of :data:`SUMMARY_FIELDS`, pooled time to promotion, mean online
    bins; paired per-seed differences canary - all; every decision of every run."""
    from services.harness.experiment_metrics import _get, mean_std
    ok = [r for r in records if r.get("status") == "ok" and r.get("releases")]
    by: dict[str, list[dict[str, Any]]] = {}
    for r in ok:
        by.setdefault(r["config"], []).append(r)
    out: dict[str, Any] = {"configs": {}, "paired": {}, "decisions": []}
    for cfg, runs in by.items():
        c = {name: mean_std(_get(r, path) for r in runs) for name, path in SUMMARY_FIELDS.items()}
        pooled = [float(h["decided_at"]) - float(h["opened_at"]) for r in runs for h in r["releases"]["history"]
                  if h["decision"] == "promoted" and h["opened_at"]]
        c["time_to_promotion_pooled_s"] = _ms(pooled)
        c["seeds"] = [r["seed"] for r in runs]
        nb = min(len(r["releases"]["online_bins"]) for r in runs)
        c["online_bins"] = [{"x0": runs[0]["releases"]["online_bins"][i]["x0"], "x1": runs[0]["releases"]["online_bins"][i]["x1"],
                             "autonomous_success": mean_std(r["releases"]["online_bins"][i]["autonomous_success"] for r in runs)}
                            for i in range(nb)]
        out["configs"][cfg] = c
        out["decisions"] += [{"config": cfg, "seed": r["seed"], **m} for r in runs for m in r["releases"]["decision_marks"]]
    if "all" in by and "canary" in by:
        a, k = {r["seed"]: r for r in by["all"]}, {r["seed"]: r for r in by["canary"]}
        seeds = sorted(set(a) & set(k))
        for name in ("final_mean", "online_last_autonomous_success", "online_autonomous_success", "newest_mean"):
            diffs = [None if _get(k[s], SUMMARY_FIELDS[name]) is None or _get(a[s], SUMMARY_FIELDS[name]) is None
                     else _get(k[s], SUMMARY_FIELDS[name]) - _get(a[s], SUMMARY_FIELDS[name]) for s in seeds]
            out["paired"][f"{name}_canary_minus_all"] = {**mean_std(diffs), "seeds": seeds}
    return out
