"""The "Safe releases: canary vs all" section of docs/RESULTS.md and its plot, from committed JSON.

Reads ``RELEASES/releases.json`` (written by ``fleetloop experiment releases --out RELEASES``; the runs'
records are beside it in ``per-run/``) and returns markdown: per strategy the held-out success of the
version the stable fleet runs at the end, the newest trained version's, the fleet's online success,
candidates, promotions, rollbacks, exposure and time to promotion (mean ± std over seeds), the same per
seed, the issue-21 goal checked on these numbers; writes ``RELEASES/releases.png`` (held-out success of
the stable fleet's version and online success over robot time, decisions marked). Nothing is measured
here: every number comes from the JSON.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

LABELS = {"all": "strategy: all", "canary": "strategy: canary"}
MARK = {"promoted": ("^", "tab:green"), "rolled_back": ("v", "tab:red"), "aborted": ("x", "tab:grey")}


def fmt(s: dict[str, Any] | None, digits: int = 2, scale: float = 1.0) -> str:
    """``mean ± std`` over seeds (the mean alone for one seed; '-' when missing)."""
    if not s or s.get("mean") is None:
        return "-"
    m, sd = s["mean"] * scale, (s.get("std") or 0.0) * scale
    return f"{m:.{digits}f} ± {sd:.{digits}f}" if s.get("n", 0) > 1 else f"{m:.{digits}f}"


def _pooled(c: dict[str, Any]) -> str:
    p = c.get("time_to_promotion_pooled_s") or {}
    if not p.get("n"):
        return "-"
    return f"{p['median']:.0f} / {p['mean']:.0f} (n={p['n']})"


def _runs(root: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted((root / "per-run").glob("*.json"))]


def _summary_table(block: dict[str, Any]) -> list[str]:
    rows = ["| strategy | seeds | held-out success, stable fleet's version at the end | newest trained version | "
            "online autonomous success, last quarter | online, whole run | candidates | promoted | rolled back | "
            "exposure: episodes on candidates | on rolled-back candidates | time to promotion (s, median / mean, pooled) | "
            "canary episodes per decision | stable fleet's version behind newest (versions) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for cfg, c in block["configs"].items():
        rows.append(f"| {LABELS.get(cfg, cfg)} | {len(c.get('seeds', []))} | {fmt(c['final_mean'])} | {fmt(c['newest_mean'])} | "
                    f"{fmt(c['online_last_autonomous_success'])} | {fmt(c['online_autonomous_success'])} | "
                    f"{fmt(c['candidates'], 1)} | {fmt(c['promotions'], 1)} | {fmt(c['rollbacks'], 1)} | "
                    f"{fmt(c['exposure_candidate_share'], 0, 100)} % | {fmt(c['exposure_rolled_back_share'], 1, 100)} % | "
                    f"{_pooled(c) if cfg == 'canary' else '- (no gate)'} | {fmt(c['episodes_to_decision_mean'], 1)} | "
                    f"{fmt(c['versions_behind'], 0)} |")
    return rows + [""]


def _seed_table(runs: list[dict[str, Any]]) -> list[str]:
    by = {(r["config"], r["seed"]): r for r in runs if r.get("status") == "ok"}
    seeds = sorted({s for _, s in by})
    rows = ["| seed | all: held-out | canary: held-out (stable v) | canary: newest | all: online last quarter | "
            "canary: online last quarter | canary decisions (in order) | time to promotion (s, each) |",
            "|---|---|---|---|---|---|---|---|"]
    for s in seeds:
        a, k = by.get(("all", s)), by.get(("canary", s))

        def g(r: dict[str, Any] | None, *path: str) -> str:
            cur: Any = r
            for p in path:
                cur = None if cur is None else cur.get(p)
            return "-" if cur is None else f"{cur:.2f}"
        kr = (k or {}).get("releases", {})
        seq = " ".join({"promoted": "P", "rolled_back": "R", "aborted": "A"}[h["decision"]] + str(h["candidate"])
                       for h in kr.get("history", []))
        ttp = ", ".join(f"{h['decided_at'] - h['opened_at']:.0f}" for h in kr.get("history", [])
                        if h["decision"] == "promoted" and h.get("opened_at"))
        stable = f" (v{kr['fleet_version']})" if kr else ""
        rows.append(f"| {s} | {g(a, 'final_mean')} | {g(k, 'final_mean')}{stable} | {g(k, 'releases', 'newest', 'mean')} | "
                    f"{g(a, 'releases', 'online_last', 'autonomous_success')} | "
                    f"{g(k, 'releases', 'online_last', 'autonomous_success')} | {seq or '-'} | {ttp or '-'} |")
    return rows + ["", "Decisions: P = promoted, R = rolled back, followed by the candidate version.", ""]


def checks(block: dict[str, Any], runs: list[dict[str, Any]]) -> list[str]:
    """Issue 21's second "done when", evaluated on the numbers (PASS / FAIL / n/a)."""
    out = []
    canary = [r for r in runs if r.get("config") == "canary" and r.get("status") == "ok"]
    promoted = [r["releases"]["promotions"] for r in canary]
    ok = bool(canary) and all(p >= 1 for p in promoted)
    out.append(f"- {'PASS' if ok else ('n/a' if not canary else 'FAIL')}: a good version is promoted automatically "
               f"(automatic promotions per canary seed: {promoted})")
    a = (block["configs"].get("all") or {}).get("final_mean", {}).get("mean")
    k = (block["configs"].get("canary") or {}).get("final_mean", {}).get("mean")
    d = block.get("paired", {}).get("final_mean_canary_minus_all", {})
    if a is None or k is None:
        out.append("- n/a: the stable fleet's final success with canary is not lower than with strategy all")
    else:
        diffs = ", ".join(f"{v:+.2f}" for v in d.get("values", []))
        out.append(f"- {'PASS' if k >= a else 'FAIL'}: the stable fleet's final held-out success with canary ({k:.3f}) is "
                   f"not lower than with strategy all ({a:.3f}) at the same robot time (paired per seed, canary - all: "
                   f"{diffs}; mean {fmt(d, 3)}: the mean decides, the spread says how sure it is)")
    return out + [""]


def plot(block: dict[str, Any], runs: list[dict[str, Any]], path: Path) -> None:
    """Held-out success of the stable fleet's version (per run, stepped) and the fleet's online autonomous
    success (mean over seeds, binned) over robot minutes per robot; every canary decision marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), sharey=True)
    colors = {"all": "tab:blue", "canary": "tab:orange"}
    for r in runs:
        if r.get("status") != "ok":
            continue
        per = r["spec"]["robots"] * r["spec"]["hz"] * 60.0
        xs = [p.get("robot_steps", 0) / per for p in r["series"]]
        ys = [p["mean"] for p in r["series"]]
        axes[0].step(xs, ys, where="post", color=colors.get(r["config"]), alpha=0.55, linewidth=1.2,
                     label=f"{LABELS.get(r['config'])}" if r["seed"] == 0 else None)
    for cfg, c in block["configs"].items():
        bins = c.get("online_bins", [])
        xs = [(b["x0"] + b["x1"]) / 2 for b in bins if b["autonomous_success"]["mean"] is not None]
        ys = [b["autonomous_success"]["mean"] for b in bins if b["autonomous_success"]["mean"] is not None]
        sd = [b["autonomous_success"]["std"] or 0.0 for b in bins if b["autonomous_success"]["mean"] is not None]
        axes[1].plot(xs, ys, "o-", color=colors.get(cfg), label=f"{LABELS.get(cfg, cfg)} (whole fleet)")
        axes[1].fill_between(xs, [y - s for y, s in zip(ys, sd)], [y + s for y, s in zip(ys, sd)], alpha=0.15,
                             color=colors.get(cfg))
    seeds = sorted({d["seed"] for d in block.get("decisions", [])})
    for d in block.get("decisions", []):
        marker, color = MARK.get(d["decision"], ("o", "black"))
        y = 1.05 + 0.035 * seeds.index(d["seed"])
        for ax in axes:
            ax.plot([d["x"]], [y], marker=marker, color=color, markersize=6, linestyle="none")
    for name, (marker, color) in MARK.items():
        if any(d["decision"] == name for d in block.get("decisions", [])):
            axes[1].plot([], [], marker=marker, color=color, linestyle="none", label=f"canary decision: {name.replace('_', ' ')}")
    axes[0].set_title("held-out success of the version the stable fleet runs (one line per run)", fontsize=9)
    axes[1].set_title("online autonomous success of the fleet (mean ± std over seeds)", fontsize=9)
    top = 1.05 + 0.035 * max(len(seeds), 1)
    for ax in axes:
        ax.set_xlabel("robot minutes per robot")
        ax.set_ylim(-0.02, top + 0.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    axes[0].set_ylabel("success (mean over tasks)")
    fig.suptitle("Safe releases: canary vs all (markers above 1: decisions of the canary runs, one row per seed)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def section(root: Path, rel: str) -> list[str]:
    """Markdown lines of the section (empty when there is no ``root/releases.json``); writes the plot. The
    reading of the numbers, written by a person, comes from ``root/NOTE.md`` when present."""
    if not (root / "releases.json").is_file():
        return []
    s = json.loads((root / "releases.json").read_text())
    block, runs = s["releases"], _runs(root)
    o, m = s.get("options", {}).get("resolved", {}), s.get("machine_facts") or s.get("machine", {})
    canary = next((r["spec"]["rollout"] for r in runs if r.get("config") == "canary"), {}) or {}
    plot(block, runs, root / "releases.png")
    robots = o.get("robots")
    robots = robots[0] if isinstance(robots, list) and robots else robots
    cohort = (f"canary cohort {', '.join(canary.get('canary_actors') or [])}" if canary.get("canary_actors")
              else f"canary fraction {canary.get('canary_fraction')}")
    md = ["## Safe releases: canary vs all", "",
          f"Command: `{s.get('command')}`  ",
          f"Machine: {m.get('cpus_usable') or m.get('cpus')} CPUs usable, {m.get('memory_gb')} GB, {m.get('platform')}, "
          f"load average {m.get('loadavg_1m_at_start')} at the start, commit {m.get('git_commit')}; finished "
          f"{s.get('finished_at')}; wall time {s.get('wall_seconds', 0) / 60:.1f} min; {s.get('ok')}/{s.get('runs')} runs ok.  ",
          f"The same job twice per seed, side by side, at the same robot time ({robots} robots x {o.get('minutes')} "
          f"robot minutes at {o.get('hz')} Hz each, tasks {', '.join(s.get('tasks', []))}, the seed's behaviour-cloned start "
          "policy, SOP + HG-DAgger with the scripted operator on throughout): `strategy: all` (every robot runs the newest "
          f"version) and `strategy: canary` ({cohort}; min_episodes {canary.get('min_episodes')}, max_episodes "
          f"{canary.get('max_episodes')}, metrics {', '.join(canary.get('metrics', []))}, max_regression "
          f"{canary.get('max_regression')}, confidence {canary.get('confidence')}, retrain_from_stable_on_rollback "
          f"{canary.get('retrain_from_stable_on_rollback')}). Held-out success = the evaluation protocol ({o.get('eval_trials')} "
          "fixed-seed trials per task, no operator) of the version the *stable* fleet runs at the budget (canary: the "
          "stable version; all: the fleet's version); newest = the version training stopped at. Online = the fleet's own "
          "episodes (autonomous: success without an operator step; mean over tasks), last quarter = the last 25 % of "
          "robot time. Exposure = robot-episodes that ran a candidate while it was judged, of all episodes (strategy all: "
          "every episode runs the newest, unvetted version). Time to promotion = seconds from a candidate opened to "
          f"promoted. JSON: [releases.json]({rel}/releases.json), runs in [per-run/]({rel}/per-run/).", ""]
    md += ["Checks (issue 21, done when):", "", *checks(block, runs), *_summary_table(block),
           "Per seed:", "", *_seed_table(runs), f"![releases: canary vs all]({rel}/releases.png)", ""]
    if (root / "NOTE.md").is_file():
        md += [(root / "NOTE.md").read_text().strip(), ""]
    errors = [f"- `{r['config']}` seed {r['seed']} failed: {str(r.get('error'))[:300]}" for r in runs if r.get("status") != "ok"]
    return md + errors + ([""] if errors else [])
