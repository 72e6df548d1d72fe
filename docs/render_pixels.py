"""The "From pixels" section of docs/RESULTS.md, from committed pixel-demo reports.

Reads ``RESULTS/pixels/seed*/report.json`` (each written by ``fleetloop demo --observations pixels
--seed S --out ...``; the run's report.json and report.png are copied there) and returns markdown:
per task pretrained vs final success (mean ± std over seeds), gain, time to the target from the
run's success curve, intervention share, learner steps/s and ingest steps/s with images, and the
issue-19 goal checked on these numbers. Nothing is measured here: every number comes from the JSON.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

GOAL_GAIN, GOAL_FINAL, GOAL_MINUTES = 0.3, 0.8, 30.0


def load_reports(results: Path) -> list[dict[str, Any]]:
    """The pixel reports under ``results/pixels``, in seed-folder order."""
    return [json.loads(p.read_text()) for p in sorted((results / "pixels").glob("seed*/report.json"))]


def _ms(values: list[float], digits: int = 2) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "-"
    if len(vals) == 1:
        return f"{vals[0]:.{digits}f}"
    return f"{statistics.mean(vals):.{digits}f} ± {statistics.stdev(vals):.{digits}f}"


def section(results: Path, rel: str) -> list[str]:
    """Markdown lines of the section (empty when there is no report)."""
    reports = load_reports(results)
    if not reports:
        return []
    ov0 = reports[0]["overall"]
    tasks = list(reports[0]["tasks"])
    md = ["## From pixels: two cameras + proprioception, no object or goal coordinates", "",
          f"{len(reports)} seed{'s' if len(reports) > 1 else ''} of `fleetloop demo --observations pixels` ({ov0.get('robots')} robots, cameras "
          f"{', '.join(ov0.get('cameras', []))} at {ov0.get('image_size')} px, JPEG on the wire, the built-in visuomotor "
          f"policy, HG-DAgger with the scripted operator). Success = held-out evaluation (fixed seeds, no operator); "
          "± is the standard deviation over seeds; time to target = run time of the first policy snapshot whose "
          f"held-out mean reached {reports[0]['overall'].get('target_success', 0.8)} (snapshots every minute, "
          "evaluated after the run). Reports: "
          + ", ".join(f"[{p.parent.name}]({rel}/pixels/{p.parent.name}/report.json)"
                      for p in sorted((results / "pixels").glob("seed*/report.json"))) + ".", "",
          *([(results / "pixels" / "NOTE.md").read_text().strip(), ""] if (results / "pixels" / "NOTE.md").is_file() else []),
          "| task | pretrained | final | gain | intervention share |", "|---|---|---|---|---|"]
    for t in tasks:
        pre = [r["tasks"][t]["pretrained_success"] for r in reports]
        fin = [r["tasks"][t]["final_success"] for r in reports]
        md.append(f"| {t} | {_ms(pre)} | {_ms(fin)} | {_ms([f - p for f, p in zip(fin, pre)])} | "
                  f"{_ms([r['tasks'][t]['intervention_share'] for r in reports])} |")
    pre_m = [r["overall"]["mean_pretrained_success"] for r in reports]
    fin_m = [r["overall"]["mean_final_success"] for r in reports]
    md.append(f"| **mean** | {_ms(pre_m)} | {_ms(fin_m)} | {_ms([f - p for f, p in zip(fin_m, pre_m)])} | |")
    ttt = [r["overall"].get("time_to_target_s", "-") for r in reports]  # "-": a run without a success curve
    md += ["", "| per run | " + " | ".join(f"seed {r['overall'].get('seed', i)}" for i, r in enumerate(reports)) + " |",
           "|---|" + "---|" * len(reports),
           "| online minutes | " + " | ".join(f"{r['overall']['wall_seconds'] / 60:.1f}" for r in reports) + " |",
           "| time to target (s) | " + " | ".join("-" if v == "-" else "not reached" if v is None else f"{v:.0f}"
                                                for v in ttt) + " |",
           "| learner steps/s | " + " | ".join(f"{r['overall']['learner_steps'] / r['overall']['wall_seconds']:.2f}"
                                              for r in reports) + " |",
           "| ingest steps/s (images) | " + " | ".join(f"{r['overall']['ingested_steps'] / r['overall']['wall_seconds']:.0f}"
                                                      for r in reports) + " |",
           "| fleet episodes | " + " | ".join(str(r["overall"]["episodes"]) for r in reports) + " |",
           "| duplicates stored | " + " | ".join(str(r["overall"]["duplicates_stored"]) for r in reports) + " |", ""]
    gain, final = statistics.mean(fin_m) - statistics.mean(pre_m), statistics.mean(fin_m)
    minutes = max(r["overall"]["wall_seconds"] for r in reports) / 60
    ok = gain >= GOAL_GAIN and final >= GOAL_FINAL and minutes <= GOAL_MINUTES
    md += [f"Goal (issue 19): mean gain >= {GOAL_GAIN} and final mean >= {GOAL_FINAL} within {GOAL_MINUTES:.0f} fleet "
           f"minutes: **{'PASS' if ok else 'FAIL'}** (gain {gain:.2f}, final {final:.2f}, {minutes:.1f} min).", ""]
    if _plot_curves(reports, results / "pixels_success.png"):
        md += [f"![pixels: held-out success over time]({rel}/pixels_success.png)", ""]
    md += ["One run's report plot (fleet success without intervention and intervention rate per task, policy "
           "versions):", ""]
    md += [f"![pixels, {p.parent.name}]({rel}/pixels/{p.parent.name}/report.png)" for p in
           sorted((results / "pixels").glob("seed*/report.png"))][:1] + [""]
    return md


def _plot_curves(reports: list[dict[str, Any]], path: Path) -> bool:
    """Held-out mean success of the policy snapshots over online minutes, one line per seed."""
    curves = [(r["overall"].get("seed", i), r["overall"].get("curve")) for i, r in enumerate(reports)]
    curves = [(s, c) for s, c in curves if c]
    if not curves:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for seed, curve in curves:
        pts = sorted((p["t"] / 60, p["mean"]) for p in curve)
        ax.plot([t for t, _ in pts], [m for _, m in pts], marker="s", markersize=4, label=f"seed {seed}")
    target = reports[0]["overall"].get("target_success", 0.8)
    ax.axhline(target, color="grey", ls="--", lw=1, label=f"target {target}")
    ax.set_xlabel("online minutes (4 robots)")
    ax.set_ylabel("held-out mean success (3 tasks, no operator)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("Pixel policy: held-out success of the fleet's policy snapshots", fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
