"""Bookkeeping of the experiment harness: pure functions, no I/O, no clocks.

Definitions (the evaluation protocol of issue 3, SOP's metrics; ``../shared/research/sop.md``):

* **evaluation series**: points ``{"t", "robot_steps", "version", "mean", "tasks", ...}`` in time
  order; ``t`` is the wall-clock second (since the online phase started) at which the evaluated
  version was *taken* (not when its evaluation finished), ``mean`` the success rate averaged over
  tasks (each task weighs the same).
* **time-to-target**: the ``t`` of the first point whose ``mean >= target`` (0.8); None when no
  point reaches it. The same on the robot-time axis with ``robot_steps / hz``.
* **human effort**: intervention steps and their share of all robot steps.
* **robot time**: robot steps / hz (resets excluded: a reset is not a step). Equal robot time
  between methods means equal robot steps; :func:`budget_check` says whether a run used its budget.
* **summary over seeds**: :func:`mean_std` (sample std, ddof 1; 0 for one value) of every number,
  None values left out and counted.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

TARGET = 0.8


def mean_over_tasks(per_task: Mapping[str, float]) -> float:
    """Unweighted mean of per-task success rates (each task weighs the same); NaN when empty."""
    vals = [float(v) for v in per_task.values()]
    return float(sum(vals) / len(vals)) if vals else math.nan


def time_to_target(series: Sequence[Mapping[str, Any]], target: float = TARGET, key: str = "t") -> float | None:
    """``point[key]`` of the first point (in series order) whose ``mean`` reaches ``target``; None if none.

    The series must be in time order (an unordered one is a bookkeeping bug: ValueError)."""
    last = -math.inf
    for p in series:
        x = float(p[key])
        if x < last:
            raise ValueError(f"evaluation series not in time order at {key}={x} after {last}")
        last = x
        if p.get("mean") is not None and float(p["mean"]) >= target:
            return x
    return None


def robot_seconds(steps: int, hz: float) -> float:
    """Robot time of ``steps`` steps at ``hz`` (resets excluded); 0 when hz is 0 (unpaced)."""
    return steps / hz if hz > 0 else 0.0


def budget_steps(robots: int, hz: float, seconds: float) -> int:
    """Robot-step budget of ``robots`` robots paced at ``hz`` for ``seconds`` of robot time each."""
    if robots < 1 or hz <= 0 or seconds <= 0:
        raise ValueError(f"a robot-step budget needs robots >= 1, hz > 0 and seconds > 0 (got {robots}, {hz}, {seconds})")
    return int(round(robots * hz * seconds))


def intervention_budget(robot_step_budget: int, share: float | None) -> int | None:
    """Fleet-wide cap on intervention (operator) steps: ``share`` of the robot-step budget; None = no cap."""
    if share is None or share <= 0:
        return None
    return int(math.floor(robot_step_budget * share))


def human_effort(steps: int, intervention_steps: int) -> dict[str, float]:
    """Intervention steps and their share of all steps."""
    if intervention_steps < 0 or steps < 0 or intervention_steps > steps:
        raise ValueError(f"intervention steps {intervention_steps} must lie in [0, steps={steps}]")
    return {"intervention_steps": int(intervention_steps), "steps": int(steps),
            "intervention_share": intervention_steps / steps if steps else 0.0}


def budget_check(used_steps: int, budget: int | None, robots: int, max_episode_steps: int, poll_steps: int) -> dict[str, Any]:
    """Did a run use its robot-step budget? A run stops once the fleet's received steps reach the
    budget; it may overshoot by what arrives in one poll (``poll_steps``) plus one chunk per robot
    (at most an episode each). ``ok``: ``budget <= used <= budget + slack``; always ok without a budget."""
    if budget is None:
        return {"budget": None, "used": int(used_steps), "slack": 0, "ok": True, "ratio": None}
    slack = int(robots * max_episode_steps + poll_steps)
    return {"budget": int(budget), "used": int(used_steps), "slack": slack,
            "ok": budget <= used_steps <= budget + slack, "ratio": used_steps / budget if budget else None}


def intervention_check(used: int, cap: int | None, robots: int, max_episode_steps: int, poll_steps: int) -> dict[str, Any]:
    """Did a run stay within its intervention budget (same slack rule as :func:`budget_check`)?"""
    if cap is None:
        return {"cap": None, "used": int(used), "ok": True, "exhausted": False}
    slack = int(robots * max_episode_steps + poll_steps)
    return {"cap": int(cap), "used": int(used), "slack": slack, "ok": used <= cap + slack, "exhausted": used >= cap}


def episodes_per_hour(mean_length: float, hz: float) -> float:
    """Episodes per hour at the robot's pace for a mean episode length (resets excluded)."""
    return 3600.0 / (mean_length / hz) if hz > 0 and mean_length > 0 else 0.0


def fleet_rates(episodes: Iterable[Mapping[str, Any]], tasks: Sequence[str], hz: float) -> dict[str, dict[str, Any]]:
    """Per task, from the learner's episode records (``task_id``, ``outcome``, ``steps``,
    ``intervention_steps``): episodes, steps, human effort, fleet success (with operator help),
    autonomous success (no intervention at all) and episodes per robot-hour at ``hz``."""
    out: dict[str, dict[str, Any]] = {}
    eps = list(episodes)
    for task in tasks:
        mine = [e for e in eps if e["task_id"] == task]
        steps = sum(int(e["steps"]) for e in mine)
        inter = sum(int(e["intervention_steps"]) for e in mine)
        hours = robot_seconds(steps, hz) / 3600.0
        out[task] = {"episodes": len(mine), **human_effort(steps, inter),
                     "fleet_success": sum(e["outcome"] == "success" for e in mine) / len(mine) if mine else 0.0,
                     "autonomous_success": sum(e["outcome"] == "success" and int(e["intervention_steps"]) == 0
                                               for e in mine) / len(mine) if mine else 0.0,
                     "episodes_per_robot_hour": len(mine) / hours if hours > 0 else 0.0}
    return out


def mean_std(values: Iterable[float | None]) -> dict[str, Any]:
    """``{"mean", "std", "n", "missing", "values"}`` over the non-None, finite values (sample std, ddof 1;
    0.0 for a single value; mean and std None when there is no value)."""
    raw = list(values)
    vals = [float(v) for v in raw if v is not None and math.isfinite(float(v))]
    n = len(vals)
    if n == 0:
        return {"mean": None, "std": None, "n": 0, "missing": len(raw), "values": []}
    mu = sum(vals) / n
    sd = math.sqrt(sum((v - mu) ** 2 for v in vals) / (n - 1)) if n > 1 else 0.0
    return {"mean": mu, "std": sd, "n": n, "missing": len(raw) - n, "values": vals}


def _get(d: Mapping[str, Any], path: str) -> Any:
    cur: Any = d
    for part in path.split("."):
        if not isinstance(cur, Mapping) or part not in cur:
            return None
        cur = cur[part]
    return cur


SUMMARY_FIELDS = {  # summary name -> dotted path in a run record
    "pretrained_mean": "pretrained_mean",
    "final_mean": "final_mean",
    "gain": "gain",
    "time_to_target_s": "time_to_target_s",
    "robot_seconds_to_target": "robot_seconds_to_target",
    "robot_steps": "usage.robot_steps",
    "robot_seconds": "usage.robot_seconds",
    "wall_seconds": "usage.wall_seconds",
    "intervention_steps": "usage.intervention_steps",
    "intervention_share": "usage.intervention_share",
    "episodes": "usage.episodes",
    "learner_steps": "usage.learner_steps",
    "policy_version": "usage.policy_version",
    "pace_ratio": "usage.pace_ratio",
    "first_data_s": "usage.first_data_s",
    "final_episodes_per_hour": "final_episodes_per_hour",
    "final_mean_episode_length": "final_mean_episode_length",
}


def summarize_config(runs: Sequence[Mapping[str, Any]], tasks: Sequence[str], target: float = TARGET) -> dict[str, Any]:
    """Mean and std over seeds of one configuration's runs (failed runs counted, not averaged).

    ``time_to_target_s`` averages the seeds that reached the target; ``reached`` / ``of`` say how many."""
    ok = [r for r in runs if r.get("status") == "ok"]
    out: dict[str, Any] = {"runs": len(ok), "failed": len(runs) - len(ok), "seeds": [r.get("seed") for r in ok]}
    for name, path in SUMMARY_FIELDS.items():
        out[name] = mean_std(_get(r, path) for r in ok)
    out["reached_target"] = {"reached": sum(r.get("time_to_target_s") is not None for r in ok), "of": len(ok), "target": target}
    # the same clock started at the fleet's first received step (start-up of robot processes excluded)
    out["time_to_target_after_first_data_s"] = mean_std(
        r["time_to_target_s"] - _get(r, "usage.first_data_s") if r.get("time_to_target_s") is not None
        and _get(r, "usage.first_data_s") is not None else None for r in ok)
    out["per_task"] = {t: {"final_success": mean_std(_get(r, f"final.{t}.success_rate") for r in ok),
                           "pretrained_success": mean_std(_get(r, f"pretrained.{t}.success_rate") for r in ok),
                           "intervention_share": mean_std(_get(r, f"fleet.{t}.intervention_share") for r in ok),
                           "episodes_per_hour": mean_std(_get(r, f"final.{t}.episodes_per_hour") for r in ok)}
                       for t in tasks}
    if ok:
        first = ok[0]
        out["label"] = first.get("label")
        out["robots"] = first.get("spec", {}).get("robots")
        out["method"] = first.get("spec", {}).get("method")
    return out


def mean_curve(runs: Sequence[Mapping[str, Any]], grid: Sequence[float], key: str = "t") -> dict[str, list[float | None]]:
    """Mean and std over runs of the evaluated success on a common grid (step interpolation: the
    value at ``x`` is the newest point with ``point[key] <= x``; None before a run's first point)."""
    per_run = []
    for r in runs:
        pts = sorted(((float(p[key]), float(p["mean"])) for p in r.get("series", []) if p.get("mean") is not None))
        vals: list[float | None] = []
        for x in grid:
            newest = [m for (t, m) in pts if t <= x]
            vals.append(newest[-1] if newest else None)
        per_run.append(vals)
    means, stds = [], []
    for i in range(len(grid)):
        s = mean_std(v[i] for v in per_run)
        means.append(s["mean"])
        stds.append(s["std"])
    return {"x": list(grid), "mean": means, "std": stds}


def censored_time_to_target(runs: Sequence[Mapping[str, Any]]) -> dict[int, tuple[float, bool]]:
    """Per seed: ``(time, reached)``; a run that never reached the target counts at its wall budget
    (``budget.wall_seconds``, else its stop time): a lower bound on its real time-to-target."""
    out: dict[int, tuple[float, bool]] = {}
    for r in runs:
        if r.get("status") != "ok":
            continue
        t = r.get("time_to_target_s")
        if t is not None:
            out[int(r["seed"])] = (float(t), True)
        else:
            out[int(r["seed"])] = (float(_get(r, "budget.wall_seconds") or _get(r, "usage.wall_seconds") or 0.0), False)
    return out


def scaling_speedups(configs: Mapping[str, Mapping[str, Any]],
                     runs_by_robots: Mapping[int, Sequence[Mapping[str, Any]]] | None = None) -> dict[str, Any]:
    """Time-to-target speed-up of N robots over 1 robot, from per-config summaries carrying ``robots``
    and ``time_to_target_s``: ``mean ttt(1) / mean ttt(N)`` over the seeds that reached it, and the
    goal ``0.8 N``.

    With ``runs_by_robots`` (the run records), also censoring-aware figures: a run that never reached
    the target counts at its budget (:func:`censored_time_to_target`), so ``speedup_censored`` is a
    lower bound when only 1-robot runs were censored, an upper bound when only N-robot runs were
    (``bound``: exact, lower, upper or unknown); and ``speedup_paired``: mean and std over seeds of
    ``ttt_seed(1) / ttt_seed(N)`` (the same seed shares demos, start policy and robot layouts)."""
    by_n = {int(c["robots"]): c for c in configs.values() if c.get("robots") is not None}
    base = by_n.get(1)
    cens = {n: censored_time_to_target(rs) for n, rs in (runs_by_robots or {}).items()}
    out: dict[str, Any] = {}
    for n, c in sorted(by_n.items()):
        t_n = c["time_to_target_s"]["mean"]
        t_1 = base["time_to_target_s"]["mean"] if base else None
        row = {"robots": n, "time_to_target_s": t_n, "speedup": (t_1 / t_n) if t_1 and t_n else None,
               "goal": 0.8 * n, "reached": c.get("reached_target")}
        a_1 = ((base or {}).get("time_to_target_after_first_data_s") or {}).get("mean")
        a_n = (c.get("time_to_target_after_first_data_s") or {}).get("mean")
        row["speedup_after_first_data"] = a_1 / a_n if a_1 and a_n else None
        if n in cens and 1 in cens and cens[n] and cens[1]:
            one, mine = cens[1], cens[n]
            m1 = sum(t for t, _ in one.values()) / len(one)
            mn = sum(t for t, _ in mine.values()) / len(mine)
            c1, cn = not all(ok for _, ok in one.values()), not all(ok for _, ok in mine.values())
            row["time_to_target_censored_s"] = mn
            row["speedup_censored"] = m1 / mn if mn > 0 else None
            row["bound"] = ("exact" if n == 1 or not (c1 or cn) else "unknown" if (c1 and cn)
                            else "lower" if c1 else "upper")
            paired = [one[s][0] / mine[s][0] for s in sorted(set(one) & set(mine)) if mine[s][0] > 0]
            row["speedup_paired"] = mean_std(paired)
        out[str(n)] = row
    return out
