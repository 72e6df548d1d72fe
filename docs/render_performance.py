"""Render docs/PERFORMANCE.md and its PNG plots from the ``fleetloop bench`` JSON results.

    .venv/bin/python docs/render_performance.py [--results docs/results/perf] [--out docs/PERFORMANCE.md]

Reads every ``RESULTS/<bench>.json`` in :data:`ORDER` (those present; any other ``*.json`` after
them). Each document follows the bench JSON contract (``bench/registry.py`` and ``bench/common.py``):
``bench``, ``machine``, ``config``, ``command``, ``wall_s``, ``rows`` (each fleetloop figure beside
its raw-gRPC or no-fleet baseline of the same run, ``ratio`` = fleetloop / baseline), ``goals``
(target, measured, met, and what limits it when not met), optional ``profile`` (top functions where
a goal is not met), optional ``plots`` and ``notes``.

Output: one goals table over all benchmarks (the issue's targets against the measured ratios), then
per benchmark the command to reproduce, the machine, the rows, the goals, the profile, the notes and
the plots. A plot whose name ends in ``cdf`` is drawn as an empirical CDF of its series (each series
is a list of samples); any other plot is a line per series over ``x`` (log x when ``x`` spans more
than a factor 20). Nothing is measured here: every number comes from the JSON.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

ORDER = ("ingest", "weights", "latency", "utilisation", "learner_scaling", "load", "async")

TITLES = {
    "ingest": "Ingest: steps into the buffer vs raw gRPC of the same bytes",
    "weights": "Weight delivery: publish -> every actor verified, vs raw gRPC",
    "latency": "Latency: step produced -> trainable",
    "utilisation": "Staleness and learner utilisation",
    "learner_scaling": "Learner scaling: Ray Train data-parallel",
    "load": "A fleet of lightweight actors against one learner",
    "async": "LLM GRPO: synchronous vs asynchronous rollouts",
}


def fmt(value: Any) -> str:
    """A number for a table: thousands separators for large values, 3 significant digits otherwise."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            return str(value)
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        if value == 0:
            return "0"
        return f"{value:.3g}" if abs(value) >= 0.001 else f"{value:.2e}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def load_results(results: Path) -> dict[str, dict[str, Any]]:
    """``{bench name: document}`` for the JSON files in ``results`` (the known ones in :data:`ORDER` first)."""
    docs: dict[str, dict[str, Any]] = {}
    paths = sorted(results.glob("*.json"), key=lambda p: (ORDER.index(p.stem) if p.stem in ORDER else len(ORDER), p.stem))
    for path in paths:
        try:
            doc = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise SystemExit(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(doc, dict) or "rows" not in doc:
            raise SystemExit(f"{path}: not a bench result (no 'rows')")
        docs[path.stem] = doc
    return docs


def _machine(doc: dict[str, Any]) -> str:
    m = doc.get("machine") or {}
    pk = m.get("packages") or {}
    pkgs = ", ".join(f"{k} {v}" for k, v in sorted(pk.items()) if v)
    cpus = m.get("cpus_usable") or m.get("cpu_count")
    load = m.get("loadavg_1m_at_start")
    return (f"{cpus} CPUs, {m.get('platform', '?')}, Python {m.get('python', '?')}"
            + (f", load average {load} at the start" if load is not None else "") + (f"; {pkgs}" if pkgs else ""))


def goals_table(docs: dict[str, dict[str, Any]]) -> list[str]:
    """All goals of all benchmarks in one table."""
    lines = ["| benchmark | goal | target | measured | met | what limits it |", "|---|---|---|---|---|---|"]
    n = 0
    for name, doc in docs.items():
        for g in doc.get("goals") or []:
            n += 1
            met = g.get("met")
            verdict = "**yes**" if met else ("**no**" if met is False else "not measured")
            unit = f" {g['unit']}" if g.get("unit") and g.get("unit") != "ratio" else ""
            lines.append(f"| {name} | {fmt(g.get('goal'))} | {fmt(g.get('target'))}{unit} | {fmt(g.get('measured'))}{unit} | "
                         f"{verdict} | {fmt(g.get('limit') or '') if not met else ''} |")
    return lines if n else ["No benchmark result states a goal yet."]


def rows_table(doc: dict[str, Any]) -> list[str]:
    """The fleetloop-vs-baseline rows of one benchmark."""
    lines = ["| metric | unit | actors | fleetloop | baseline | ratio | better | note |", "|---|---|---|---|---|---|---|---|"]
    for r in doc.get("rows") or []:
        if "fleetloop" not in r:  # rows of another shape (bench async): key: value
            lines.append("| " + "; ".join(f"{k}={fmt(v)}" for k, v in r.items() if not isinstance(v, (dict, list)))
                         + " | | | | | | | |")
            continue
        lines.append(f"| {fmt(r.get('metric'))} | {fmt(r.get('unit'))} | {fmt(r.get('actors'))} | {fmt(r.get('fleetloop'))} | "
                     f"{fmt(r.get('raw_grpc'))} | {fmt(r.get('ratio'))} | {fmt(r.get('better'))} | {fmt(r.get('note') or '')} |")
    return lines


def profile_lines(doc: dict[str, Any]) -> list[str]:
    """The profile where a goal is not met (top functions by cumulative time)."""
    prof = doc.get("profile")
    if not prof:
        return []
    lines = [f"Profile: {fmt(prof.get('what', ''))}", "", "| function | cumulative s | share |", "|---|---|---|"]
    for item in prof.get("top") or []:
        fn, cum, share = (list(item) + [None, None, None])[:3]
        lines.append(f"| `{fn}` | {fmt(cum)} | {fmt(share)} |")
    return lines + [""]


def plot(name: str, spec: dict[str, Any], path: Path, title: str) -> bool:
    """Draw one plot from its ``plots`` entry; False when the entry has nothing to draw."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = spec.get("series") or {}
    if not series:
        return False
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    if name.endswith("cdf"):
        for label, samples in series.items():
            xs = sorted(float(v) for v in samples if v is not None)
            if xs:
                ax.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post", label=f"{label} (n={len(xs)})")
        ax.set_ylabel(spec.get("ylabel") or "fraction of samples")
        ax.set_ylim(0, 1.02)
        if any(series.values()):
            lo = min((min(v) for v in series.values() if v), default=1)
            hi = max((max(v) for v in series.values() if v), default=1)
            if lo > 0 and hi / lo > 50:
                ax.set_xscale("log")
    else:
        x = spec.get("x") or []
        for label, ys in series.items():
            pts = [(a, b) for a, b in zip(x, ys) if b is not None]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        nums = [v for v in x if isinstance(v, (int, float)) and v > 0]
        if nums and max(nums) / min(nums) > 20:
            ax.set_xscale("log")
        ax.set_ylabel(spec.get("ylabel") or "")
        if spec.get("ylog"):
            ax.set_yscale("log")
    ax.set_xlabel(spec.get("xlabel") or "")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def render(results: Path, out: Path) -> str:
    """Write ``out`` (and the plots beside the JSON) from ``results``; returns the markdown."""
    docs = load_results(results)
    rel = results.resolve().relative_to(out.resolve().parent) if _inside(results, out.parent) else results
    lines = ["# Performance", "",
             "Generated by `docs/render_performance.py` from the JSON in "
             f"`{rel}` (do not edit by hand). Every fleetloop figure stands beside a baseline measured in the "
             "same run on the same machine: raw gRPC of the same bytes over loopback for transport-bound paths, "
             "the same computation without the fleet for the learner. Ratios are fleetloop / baseline. "
             "This machine has 2 shared cores: absolute figures are small and noisy; the ratios are the point.", "",
             "## Goals (issue 8)", "", *goals_table(docs), ""]
    for name, doc in docs.items():
        lines += [f"## {TITLES.get(name, name)}", ""]
        if doc.get("command"):
            lines.append(f"Reproduce: `{doc['command']}`  ")
        wall = doc.get("wall_s")
        lines += [f"Machine: {_machine(doc)}" + (f"; wall time {wall / 60:.1f} min" if isinstance(wall, (int, float)) else ""), ""]
        lines += rows_table(doc) + [""]
        if doc.get("goals"):
            lines += ["Goals:", ""] + [f"- {'met' if g.get('met') else 'NOT met'}: {g.get('goal')} (measured {fmt(g.get('measured'))})"
                                       + (f". Limit: {g['limit']}" if g.get("limit") and not g.get("met") else "")
                                       for g in doc["goals"]] + [""]
        lines += profile_lines(doc)
        for note in doc.get("notes") or []:
            lines.append(f"- {note}")
        if doc.get("notes"):
            lines.append("")
        for pname, spec in (doc.get("plots") or {}).items():
            png = results / f"{name}_{pname}.png"
            if plot(pname, spec, png, f"{name}: {spec.get('title') or pname.replace('_', ' ')}"):
                lines += [f"![{name} {pname}]({png.resolve().relative_to(out.resolve().parent) if _inside(png, out.parent) else png})", ""]
    text = "\n".join(lines).rstrip() + "\n"
    out.write_text(text)
    return text


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def main() -> None:
    """CLI: ``--results`` folder of bench JSON, ``--out`` markdown file."""
    here = Path(__file__).resolve().parent
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", type=Path, default=here / "results" / "perf")
    p.add_argument("--out", type=Path, default=here / "PERFORMANCE.md")
    a = p.parse_args()
    render(a.results, a.out)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
