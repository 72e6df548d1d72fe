"""Render docs/RESULTS.md and its PNG plots from ``fleetloop experiment`` summaries.

    .venv/bin/python docs/render_results.py [--results docs/results/experiments] [--out docs/RESULTS.md]

Reads ``RESULTS/<experiment>/summary.json`` for experiment in main, sampler, scaling (those present),
the pixel-demo reports ``RESULTS/pixels/seed*/report.json`` (docs/render_pixels.py) and the releases
experiment ``RESULTS/../releases/releases.json`` (docs/render_releases.py: its section and plot),
writes the tables (mean ± std over seeds), the checks of issue 3's "done when" evaluated on the
numbers, and the plots ``RESULTS/main_success.png``, ``sampler_success.png``, ``scaling_success.png``,
``scaling_time_to_target.png``. Each section states the command, the machine and the wall time
recorded in its summary. Nothing is measured here: every number comes from the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

EXPERIMENTS = ("main", "sampler", "scaling")


def fmt(s: dict[str, Any] | None, digits: int = 2, scale: float = 1.0) -> str:
    """``mean ± std`` (just the mean for one seed; '-' when missing)."""
    if not s or s.get("mean") is None:
        return "-"
    m, sd = s["mean"] * scale, (s.get("std") or 0.0) * scale
    return f"{m:.{digits}f} ± {sd:.{digits}f}" if s.get("n", 0) > 1 else f"{m:.{digits}f}"


def _header(summary: dict[str, Any]) -> list[str]:
    m = summary.get("machine", {})
    o = summary.get("options", {}).get("resolved", {})
    note = [f"**Note:** {summary['note']}", ""] if summary.get("note") else []
    return note + [f"Command: `{summary.get('command') or 'fleetloop experiment ' + summary['experiment']}`  ",
            f"Machine: {m.get('cpus')} CPUs, {m.get('platform')} (host {m.get('host')}); finished {summary.get('finished_at')}; "
            f"wall time {summary.get('wall_seconds', 0) / 60:.1f} min (the runs themselves: "
            f"{summary.get('runs_wall_seconds_total', 0) / 60:.1f} min summed, {summary.get('reused_runs', 0)} reused from an "
            f"earlier invocation); {summary.get('ok')}/{summary.get('runs')} runs ok.  ",
            f"Tasks: {', '.join(summary.get('tasks', []))}; budget {o.get('minutes')} min per run, robots {o.get('robots')}, "
            f"{o.get('hz')} Hz; final evaluation {o.get('eval_trials')} trials per task, periodic {o.get('curve_trials')} "
            f"every {o.get('eval_interval_s')} s{_eval_mode(o)}; {_cap(summary)}"
            f"{'' if o.get('max_updates_per_s') is None else '; learner capped at ' + str(o['max_updates_per_s']) + ' steps/s'}.",
            ""]


def _cap(summary: dict[str, Any]) -> str:
    if summary.get("experiment") == "scaling":  # scaling runs have no operator cap (RunSpec default None)
        return "no intervention cap (the scripted operator stays on)"
    return f"intervention budget {summary.get('options', {}).get('resolved', {}).get('intervention_budget')} of the robot steps"


def _eval_mode(o: dict[str, Any]) -> str:
    if o.get("eval_mode") != "deferred":
        return " (during the run)"
    return (f" (deferred: snapshots taken during the run, evaluated after it; every {o.get('eval_coarse_stride')}th "
            "snapshot until one reached the target, then the gap before it)")


def _method_table(summary: dict[str, Any]) -> list[str]:
    t = summary.get("target", 0.8)
    rows = [f"| configuration | seeds | final success | gain over pretrained | time to {t} (wall s) | reached | "
            f"robot time to {t} (s) | intervention share | intervention steps | robot steps | eval episodes/h |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for cfg, c in summary["configs"].items():
        r = c.get("reached_target", {})
        failed = f" ({c['failed']} failed)" if c.get("failed") else ""
        rows.append(f"| {c.get('label') or cfg} | {c['runs']}{failed} | "
                    f"{fmt(c['final_mean'])} | {fmt(c['gain'])} | {fmt(c['time_to_target_s'], 0)} | "
                    f"{r.get('reached', 0)}/{r.get('of', 0)} | {fmt(c['robot_seconds_to_target'], 0)} | "
                    f"{fmt(c['intervention_share'])} | {fmt(c['intervention_steps'], 0)} | {fmt(c['robot_steps'], 0)} | "
                    f"{fmt(c['final_episodes_per_hour'], 0)} |")
    return rows + [""]


def _task_table(summary: dict[str, Any]) -> list[str]:
    tasks = summary.get("tasks", [])
    rows = ["| configuration | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for cfg, c in summary["configs"].items():
        rows.append(f"| {c.get('label') or cfg} | " + " | ".join(fmt(c["per_task"][tk]["final_success"]) for tk in tasks) + " |")
    return rows + [""]


def _errors(summary: dict[str, Any]) -> list[str]:
    out = []
    for cfg, c in summary["configs"].items():
        for e in c.get("errors", []):
            out.append(f"- `{cfg}` failed: {str(e)[:300]}")
    return out + ([""] if out else [])


def _plot_curves(summary: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for cfg, c in summary["configs"].items():
        for ax, key, scale in ((axes[0], "curve_wall", 1 / 60), (axes[1], "curve_robot", 1 / 60)):
            cur = c.get(key) or {}
            xs = [x * scale for x, m in zip(cur.get("x", []), cur.get("mean", [])) if m is not None]
            ms = [m for m in cur.get("mean", []) if m is not None]
            sds = [s or 0.0 for s, m in zip(cur.get("std", []), cur.get("mean", [])) if m is not None]
            if not xs:
                continue
            if len(xs) == 1:  # no online phase (pretrained only): a level line
                ax.axhline(ms[0], linestyle=":", color="black", label=c.get("label") or cfg)
                continue
            line, = ax.step(xs, ms, where="post", label=c.get("label") or cfg)
            ax.fill_between(xs, [m - s for m, s in zip(ms, sds)], [m + s for m, s in zip(ms, sds)], step="post",
                            alpha=0.15, color=line.get_color())
    target = summary.get("target", 0.8)
    for ax, xlabel in ((axes[0], "wall-clock minutes since the fleet was up"), (axes[1], "robot minutes (all robots)")):
        ax.axhline(target, color="grey", linestyle="--", linewidth=0.8)
        ax.set_xlabel(xlabel)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("evaluated success (mean over tasks)")
    axes[0].legend(fontsize=8, loc="lower right")
    fig.suptitle(f"{summary['experiment']}: held-out success over time (mean ± std over seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_scaling(summary: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sc = summary.get("scaling", {})
    ns = sorted(int(n) for n in sc)
    ttt = [sc[str(n)].get("time_to_target_censored_s", sc[str(n)]["time_to_target_s"]) for n in ns]
    fig, ax = plt.subplots(figsize=(6, 4.2))
    pts = [(n, t / 60) for n, t in zip(ns, ttt) if t]
    if pts:
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label="measured (mean over seeds; unreached = budget)")
        by_n = {c.get("robots"): c for c in summary.get("configs", {}).values()}
        seeds = [(n, v / 60) for n in ns for v in (by_n.get(n, {}).get("time_to_target_s") or {}).get("values", [])]
        if seeds:
            ax.plot([q[0] for q in seeds], [q[1] for q in seeds], ".", color="C0", alpha=0.4, label="one seed (reached)")
        base = ttt[0] if ns and ns[0] == 1 else None
        if base:
            ax.plot(ns, [base / 60 / (0.8 * n) if n > 1 else base / 60 for n in ns], ":", color="grey", label="goal: 0.8 x N speed-up")
            ax.plot(ns, [base / 60 / n for n in ns], "--", color="lightgrey", label="linear")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ns or [1])
    ax.set_xticklabels([str(n) for n in ns] or ["1"])
    ax.set_xlabel("robots")
    ax.set_ylabel(f"time to {summary.get('target', 0.8)} success (wall minutes)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _speedup(sc: dict[str, Any]) -> str:
    sp = sc.get("speedup_censored", sc.get("speedup"))
    if sp is None:
        return "-"
    mark = {"lower": ">= ", "upper": "<= ", "unknown": "~"}.get(sc.get("bound", "exact"), "")
    return f"{mark}{sp:.2f}x"


def _scaling_table(summary: dict[str, Any]) -> list[str]:
    """Per fleet size: time-to-target over all seeds (a seed that never reached it counts at the budget,
    so its speed-up is a bound), the seed-paired speed-up, and whether the robots kept their pace."""
    t = summary.get("target", 0.8)
    rows = [f"| robots | time to {t} (wall s) | reached | speed-up vs 1 robot | paired speed-up | goal 0.8 x N | "
            "success at the budget | robot steps | robot pace (of hz) | learner steps | first data (s) | "
            f"time to {t} after first data (s) | its speed-up |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for cfg, c in summary["configs"].items():
        n = c.get("robots")
        sc = summary.get("scaling", {}).get(str(n), {})
        r = c.get("reached_target", {})
        ttt = (f"{sc['time_to_target_censored_s']:.0f}" if sc.get("time_to_target_censored_s") is not None
               and r.get("reached") != r.get("of") else fmt(c["time_to_target_s"], 0))
        if r.get("reached") != r.get("of") and ttt != "-":
            ttt = f">= {ttt} (unreached at the budget)"
        rows.append(f"| {n} | {ttt} | {r.get('reached', 0)}/{r.get('of', 0)} | {_speedup(sc)} | "
                    f"{fmt(sc.get('speedup_paired'))} | {0.8 * n:.1f}x | {fmt(c['final_mean'])} | {fmt(c['robot_steps'], 0)} | "
                    f"{fmt(c.get('pace_ratio'))} | {fmt(c.get('learner_steps'), 0)} | {fmt(c.get('first_data_s'), 1)} | "
                    f"{fmt(c.get('time_to_target_after_first_data_s'), 0)} | "
                    f"{'-' if sc.get('speedup_after_first_data') is None else format(sc['speedup_after_first_data'], '.2f') + 'x'} |")
    return rows + [""]


def _mean(c: dict[str, Any] | None, key: str) -> float | None:
    return None if c is None else (c.get(key) or {}).get("mean")


def checks(summaries: dict[str, dict[str, Any]]) -> list[str]:
    """Issue 3's "done when", evaluated on the numbers (PASS / FAIL / n/a)."""
    out = []

    def line(ok: bool | None, text: str) -> None:
        out.append(f"- {'n/a' if ok is None else ('PASS' if ok else 'FAIL')}: {text}")

    main = summaries.get("main", {}).get("configs", {})
    sop, rounds, recap, pre = (main.get(k) for k in ("sop_hg_dagger", "hg_dagger_rounds", "sop_recap", "pretrained"))
    a, b = _mean(sop, "final_mean"), _mean(rounds, "final_mean")
    line(None if a is None or b is None else a > b, f"SOP + HG-DAgger ({a if a is None else round(a, 3)}) beats offline "
         f"rounds ({b if b is None else round(b, 3)}) at equal robot time and intervention budget")
    ntasks = len(summaries.get("main", {}).get("tasks", []))
    line(None if a is None else (a >= 0.9 and ntasks >= 5), f"one policy reaches >= 0.9 mean success over >= 5 tasks "
         f"(SOP + HG-DAgger: {a if a is None else round(a, 3)} over {ntasks} tasks)")
    c, p = _mean(recap, "final_mean"), _mean(pre, "final_mean")
    line(None if c is None or p is None else c > p, f"SOP + RECAP ({c if c is None else round(c, 3)}) improves on the "
         f"pretrained policy ({p if p is None else round(p, 3)})")
    smp = summaries.get("sampler", {}).get("configs", {})
    ad, fx, on = (_mean(smp.get(k), "final_mean") for k in ("adaptive", "fixed_50_50", "online_only"))
    others = [v for v in (fx, on) if v is not None]
    line(None if ad is None or not others else ad >= max(others) - 0.05,
         f"adaptive sampler ({ad if ad is None else round(ad, 3)}) not worse than fixed 50/50 "
         f"({fx if fx is None else round(fx, 3)}) and online only ({on if on is None else round(on, 3)}) "
         f"(within 0.05, the evaluation noise of the mean)")
    sc = summaries.get("scaling", {}).get("scaling", {})
    for n, s in sorted(sc.items(), key=lambda kv: int(kv[0])):
        if int(n) == 1:
            continue
        sp, bound = s.get("speedup_censored", s.get("speedup")), s.get("bound", "exact")
        met = None if sp is None else sp >= 0.8 * int(n)
        # a bound decides only one way: a lower bound that meets the goal, an upper bound that misses it
        ok = met if bound == "exact" or (bound == "lower" and met) or (bound == "upper" and met is False) else None
        line(ok, f"{n} robots: time-to-target speed-up {_speedup(s)} (goal >= {0.8 * int(n):.1f}x; SOP reports 2.4x at "
             "4 robots)")
    return out + [""]


def render(results: Path, out: Path) -> str:
    """Write ``out`` (RESULTS.md) and the plots under ``results``; returns the markdown."""
    summaries = {n: json.loads((results / n / "summary.json").read_text()) for n in EXPERIMENTS
                 if (results / n / "summary.json").is_file()}
    rel = os.path.relpath(results, out.parent)
    md = ["# Results: SOP-style post-training on the simulated Meta-World fleet", "",
          "Rendered by `docs/render_results.py` from the experiment JSON in "
          f"`{rel}/` (`fleetloop experiment NAME --seeds N --out {rel}/NAME`). Success = held-out evaluation "
          "(fixed seeds, no operator), mean over tasks; ± is the standard deviation over seeds. Time-to-target = first "
          "wall-clock second (since the fleet was up) at which a periodic evaluation reached the target; robot time = "
          "robot steps / hz over all robots (resets excluded). Human effort = operator (intervention) steps and their share.",
          "", "## Checks (issue 3, done when)", "", *checks(summaries)]
    if not summaries:
        md += ["No experiment summary found yet.", ""]
    for name, s in summaries.items():
        title = {"main": "Main comparison (equal robot time, equal intervention budget)",
                 "sampler": "Sampler ablation (SOP + HG-DAgger)", "scaling": "Fleet scaling (same wall-clock budget)"}[name]
        md += [f"## {title}", "", *_header(s)]
        if name == "scaling":
            md += _scaling_table(s)
            _plot_scaling(s, results / "scaling_time_to_target.png")
            md += [f"![time to target vs robots]({rel}/scaling_time_to_target.png)", ""]
        else:
            md += _method_table(s) + ["Per task (final success):", ""] + _task_table(s)
        _plot_curves(s, results / f"{name}_success.png")
        md += [f"![{name}: success over time]({rel}/{name}_success.png)", "", *_errors(s)]
    md += _pixels_section(results, rel)
    releases = results.parent / "releases"
    md += _load("render_releases").section(releases, os.path.relpath(releases, out.parent))
    text = "\n".join(md)
    out.write_text(text)
    return text


def _load(name: str):
    """A sibling render module (docs/render_pixels.py, docs/render_releases.py), loaded beside this file."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _pixels_section(results: Path, rel: str) -> list[str]:
    """The pixel-demo section (docs/render_pixels.py)."""
    return _load("render_pixels").section(results, rel)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", default=str(Path(__file__).parent / "results" / "experiments"))
    p.add_argument("--out", default=str(Path(__file__).parent / "RESULTS.md"))
    a = p.parse_args()
    render(Path(a.results), Path(a.out))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
