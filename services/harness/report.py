"""The demo's report: ``report.json`` (numbers) and ``report.png`` (curves over wall-clock time).

report.json, per task: ``pretrained_success`` and ``final_success`` (success rate of the pretrained
and the final policy over the evaluation protocol: held-out seeds, no operator; ``final_success``
is the mean over the last ``eval_trials`` = 50 evaluation episodes), ``episodes``, ``steps``,
``intervention_steps`` (fleet, online phase), plus fleet-side rates over the last 50 episodes.
Overall: ``policy_version``, ``wall_seconds``, ``staleness_max``, ``duplicates_stored``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np


def rolling_rates(episodes: list[dict[str, Any]], task: str, t0: float, window: int = 20) -> dict[str, np.ndarray]:
    """Per-episode time (s since t0), rolling success and intervention-step rates for one task."""
    eps = [e for e in episodes if e["task_id"] == task]
    if not eps:
        return {"t": np.zeros(0), "success": np.zeros(0), "autonomous": np.zeros(0), "intervention": np.zeros(0)}
    t = np.array([e["time"] - t0 for e in eps])
    succ = np.array([e["outcome"] == "success" for e in eps], float)
    auto = np.array([e["outcome"] == "success" and e["intervention_steps"] == 0 for e in eps], float)
    inter = np.array([e["intervention_steps"] for e in eps], float)
    steps = np.array([max(e["steps"], 1) for e in eps], float)
    out = {"t": t, "success": np.zeros(len(eps)), "autonomous": np.zeros(len(eps)), "intervention": np.zeros(len(eps))}
    for i in range(len(eps)):
        a = max(0, i - window + 1)
        out["success"][i] = succ[a:i + 1].mean()
        out["autonomous"][i] = auto[a:i + 1].mean()
        out["intervention"][i] = inter[a:i + 1].sum() / steps[a:i + 1].sum()
    return out


def fleet_summary(episodes: list[dict[str, Any]], task: str, last: int = 50) -> dict[str, Any]:
    """Fleet-side numbers of one task: totals and rates over its last ``last`` episodes."""
    eps = [e for e in episodes if e["task_id"] == task]
    tail = eps[-last:]
    steps = sum(e["steps"] for e in eps)
    inter = sum(e["intervention_steps"] for e in eps)
    return {
        "episodes": len(eps), "steps": steps, "intervention_steps": inter,
        "intervention_share": inter / steps if steps else 0.0,
        "fleet_success_last50": float(np.mean([e["outcome"] == "success" for e in tail])) if tail else 0.0,
        "autonomous_success_last50": float(np.mean([e["outcome"] == "success" and e["intervention_steps"] == 0
                                                    for e in tail])) if tail else 0.0,
        "intervention_share_last50": (sum(e["intervention_steps"] for e in tail) / max(1, sum(e["steps"] for e in tail))),
    }


def write_report(out: Path, tasks: list[str], pre_eval: dict, final_eval: dict, episodes: list[dict], t0: float,
                 overall: dict[str, Any], versions: list[tuple[float, int]]) -> dict[str, Any]:
    """Write report.json and report.png into ``out``; return the report dict."""
    per_task = {}
    for task in tasks:
        per_task[task] = {"pretrained_success": pre_eval[task]["success_rate"], "final_success": final_eval[task]["success_rate"],
                          "eval_trials": final_eval[task]["trials"],
                          "final_mean_episode_length": final_eval[task]["mean_length"],
                          **fleet_summary(episodes, task)}
    pre = float(np.mean([per_task[t]["pretrained_success"] for t in tasks]))
    fin = float(np.mean([per_task[t]["final_success"] for t in tasks]))
    report = {"tasks": per_task, "overall": {**overall, "mean_pretrained_success": pre, "mean_final_success": fin,
                                             "improvement": fin - pre}}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    plot(out / "report.png", tasks, episodes, t0, per_task, overall.get("wall_seconds", 0.0), versions,
         curve=overall.get("curve"))
    return report


def plot(path: Path, tasks: list[str], episodes: list[dict], t0: float, per_task: dict, wall: float,
         versions: list[tuple[float, int]], curve: list[dict] | None = None) -> None:
    """Success and intervention rate per task over wall-clock minutes, with evaluation markers;
    with ``curve`` (held-out evaluations of policy snapshots: ``t``, ``mean``) also the held-out mean
    success over time."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 1, figsize=(10, 7.5), sharex=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, task in enumerate(tasks):
        c = colors[i % len(colors)]
        r = rolling_rates(episodes, task, t0)
        axes[0].plot(r["t"] / 60, r["autonomous"], color=c, label=f"{task} (no-intervention success, rolling 20)")
        axes[0].scatter([0], [per_task[task]["pretrained_success"]], color=c, marker="o", s=40)
        axes[0].scatter([wall / 60], [per_task[task]["final_success"]], color=c, marker="*", s=120)
        axes[1].plot(r["t"] / 60, r["intervention"], color=c, label=task)
    if curve:
        pts = sorted((p["t"], p["mean"]) for p in curve)
        axes[0].plot([t / 60 for t, _ in pts], [m for _, m in pts], color="black", marker="s", markersize=4, lw=1.5,
                     label="held-out mean success (policy snapshots, no operator)")
    axes[0].set_ylabel("success rate")
    axes[0].set_ylim(-0.02, 1.02)
    axes[0].set_title("Success per task (lines: fleet episodes without intervention; o = pretrained eval, * = final eval)",
                      fontsize=9)
    axes[0].legend(fontsize=7, loc="lower right")
    axes[1].set_ylabel("intervention rate (operator steps / steps)")
    axes[1].set_xlabel("wall-clock minutes of online post-training")
    axes[1].set_ylim(-0.02, 1.02)
    axes[1].legend(fontsize=7, loc="upper right")
    if versions:
        ax2 = axes[1].twinx()
        ax2.step([(t - t0) / 60 for t, _ in versions], [v for _, v in versions], where="post", color="grey", alpha=0.5)
        ax2.set_ylabel("policy version", color="grey")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
