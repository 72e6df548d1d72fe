"""``fleetloop job`` subcommands for safe releases (canary cohorts, automatic promotion and rollback).

- ``fleetloop job releases JOB [--watch N]``: the release snapshot (``GET /v1/jobs/JOB/releases``):
  rollout policy, stable and candidate versions, cohorts, live evidence per cohort and the history
  of decisions with their reasons (newest first). ``--watch N`` prints it again every N seconds until
  the job ends (``-o json``: one JSON object per line, with ``watched_at``).
- ``fleetloop job promote JOB`` / ``fleetloop job abort-release JOB``: promote the open candidate to
  stable now / abort it (``POST .../releases/promote|abort``; like pin: ``status`` done or queued).
- ``fleetloop job rollout JOB [--file rollout.yaml] [--strategy canary] [--canary-fraction 0.25]
  [--canary-actors a,b] [--min-episodes 10] [--max-episodes 60] [--metrics m1,m2]
  [--max-regression 0.1] [--confidence 0.95] [--retrain-from-stable | --no-retrain-from-stable]``:
  set the rollout policy (``PUT /v1/jobs/JOB/rollout``). The flags change the policy in force (the
  snapshot's, or the file's with ``--file``); fields neither names keep their value. The API
  validates it (an error names the field) and the job's spec keeps it for a relaunch.

Run by :func:`services.cli.control._cmd_job` (``--api``, ``--key``, ``-o json`` as every job command).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from fleetloop.errors import InvalidArgument

COMMANDS = ("releases", "promote", "abort-release", "rollout")
METRIC_LABELS = (("episodes", "EPISODES"), ("autonomous_success", "AUTO SUCCESS"), ("intervention_rate", "INTERVENTION"),
                 ("episode_length", "EP LENGTH"), ("reward", "REWARD"))


def add_release_commands(jsub: argparse._SubParsersAction) -> None:
    """The parsers of the module docstring, on ``fleetloop job``'s subparsers."""
    r = jsub.add_parser("releases", help="a job's releases: stable, candidate, cohorts, evidence, decisions and reasons")
    r.add_argument("job_id")
    r.add_argument("--watch", type=float, default=0, help="print it again every N seconds until the job ends")
    for name, text in (("promote", "promote the open release candidate to stable now"),
                       ("abort-release", "abort the open release candidate: every robot runs stable again")):
        c = jsub.add_parser(name, help=text)
        c.add_argument("job_id")
    ro = jsub.add_parser("rollout", help="set a job's rollout policy (flags change the policy in force)")
    ro.add_argument("job_id")
    ro.add_argument("--file", default=None, help="a RolloutPolicy as YAML or JSON (the flags apply on top of it)")
    ro.add_argument("--strategy", choices=["all", "canary"], default=None,
                    help="all: every robot runs the newest version; canary: a candidate runs on a cohort first")
    ro.add_argument("--canary-fraction", type=float, default=None, help="share of the robots in the canary cohort (0-1)")
    ro.add_argument("--canary-actors", default=None,
                    help="comma-separated actor ids of an explicit canary cohort (wins over the fraction); '' clears it")
    ro.add_argument("--min-episodes", type=int, default=None, help="episodes per cohort before any decision")
    ro.add_argument("--max-episodes", type=int, default=None, help="candidate episodes after which a decision is forced")
    ro.add_argument("--metrics", default=None, help="comma-separated: autonomous_success, intervention_rate, "
                    "episode_length, reward")
    ro.add_argument("--max-regression", type=float, default=None, help="largest tolerated regression (absolute)")
    ro.add_argument("--confidence", type=float, default=None, help="posterior probability needed to decide")
    ro.add_argument("--retrain-from-stable", dest="retrain_from_stable_on_rollback", action=argparse.BooleanOptionalAction,
                    default=None, help="after a rollback, continue training from the stable version's weights")


def rollout_body(args: argparse.Namespace, current: dict[str, Any]) -> dict[str, Any]:
    """The policy to PUT: ``--file`` (a RolloutPolicy, or a JobSpec's ``rollout``), else ``current`` (the
    policy in force), with the given flags applied. InvalidArgument when neither a file nor a flag is given."""
    flags: dict[str, Any] = {f: getattr(args, f) for f in ("strategy", "canary_fraction", "min_episodes", "max_episodes",
                                                           "max_regression", "confidence", "retrain_from_stable_on_rollback")
                             if getattr(args, f) is not None}
    if args.canary_actors is not None:
        flags["canary_actors"] = [a.strip() for a in args.canary_actors.split(",") if a.strip()]
    if args.metrics is not None:
        flags["metrics"] = [m.strip() for m in args.metrics.split(",") if m.strip()]
    if not args.file and not flags:
        raise InvalidArgument("nothing to set: give --file or at least one flag (fleetloop job rollout --help)",
                              field="rollout")
    if args.file:
        from services.control.client import load_spec
        base = load_spec(Path(args.file))
        base = base["rollout"] if isinstance(base.get("rollout"), dict) else base
    else:
        base = current
    return {**base, **flags}


def _num(v: Any, pct: bool = False) -> str:
    if v is None:
        return "-"
    if pct:
        return f"{100 * v:.1f}%"
    return f"{v:,}" if isinstance(v, int) else f"{v:.3g}"


def _clock(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


def _robots(ids: list[str], limit: int = 6) -> str:
    shown = ", ".join(ids[:limit]) + (f", +{len(ids) - limit}" if len(ids) > limit else "")
    return f"{len(ids)}: {shown}" if ids else "0"


def _metric_cells(m: dict[str, Any] | None) -> list[str]:
    m = m or {}
    return [_num(m.get(k), pct=k in ("autonomous_success", "intervention_rate")) for k, _ in METRIC_LABELS]


def format_releases(view: dict[str, Any]) -> str:
    """``GET .../releases`` for people: policy, versions, cohorts with evidence, decisions newest first."""
    p = view.get("policy") or {}
    lines = []
    cohort = (f"canary_actors {','.join(p['canary_actors'])}" if p.get("canary_actors")
              else f"canary_fraction {p.get('canary_fraction')}")
    policy = ("every robot runs the newest version" if view["strategy"] == "all" else
              f"{cohort}, min_episodes {p.get('min_episodes')}, max_episodes {p.get('max_episodes')}, metrics "
              f"{','.join(p.get('metrics') or [])}, max_regression {p.get('max_regression')}, confidence {p.get('confidence')}")
    lines.append(f"job {view['job_id']}  strategy {view['strategy']} ({policy})")
    if not view.get("reported"):
        lines.append("the learner has reported no release yet")
    if view.get("problem"):
        lines.append(f"problem: {view['problem']}")
    head = f"stable {_v(view.get('stable'))}  candidate {_v(view.get('candidate'))}"
    if view.get("pinned") is not None:
        head += f"  (pinned {_v(view['pinned'])}: every robot runs the pin)"
    lines.append(head)
    cohorts, evidence = view.get("cohorts") or {}, view.get("evidence") or {}
    rows = [("canary", view.get("candidate"), cohorts.get("canary") or [], evidence.get("candidate")),
            ("stable", view.get("stable"), cohorts.get("stable") or [], evidence.get("stable"))]
    if view["strategy"] == "canary" or any(r[2] or r[3] for r in rows):
        table = [["COHORT", "VERSION", "ROBOTS", *(label for _, label in METRIC_LABELS)]]
        table += [[name, _v(version), _robots(ids), *_metric_cells(ev)] for name, version, ids, ev in rows]
        lines.extend(_table(table))
        for name, _, _, ev in rows:
            for task, m in sorted(((ev or {}).get("per_task") or {}).items()):
                lines.append(f"  {name} {task}: " + "  ".join(f"{label.lower()} {cell}" for (_, label), cell
                                                                 in zip(METRIC_LABELS, _metric_cells(m))))
    history = view.get("history") or []
    lines.append(f"decisions ({len(history)}, newest first)" if history else "no decision yet")
    for h in reversed(history):
        eps = h.get("episodes") or {}
        sizes = h.get("cohort_sizes")
        robots = f", robots {sizes.get('canary', 0)}/{sizes.get('stable', 0)}" if sizes else ""
        p_nw = f"  p_not_worse {h['p_not_worse']:.3f}" if h.get("p_not_worse") is not None else ""
        lines.append(f"  #{h['id']} {_clock(h.get('decided_at'))}  {_v(h['candidate'])} vs stable {_v(h.get('stable'))}: "
                     f"{h['decision']} by {h['by']}  (episodes canary {eps.get('canary', 0)} / stable {eps.get('stable', 0)}"
                     f"{robots}){p_nw}")
        lines.append(f"      reason: {h.get('reason') or '-'}")
    return "\n".join(lines)


def _v(version: Any) -> str:
    return "-" if version is None else f"v{version}"


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip() for r in rows]


def run(api: Any, args: argparse.Namespace, as_json: bool, emit) -> int:
    """One release subcommand through ``api`` (:class:`services.control.client.ApiClient`); ``emit``
    prints an object as pretty JSON (the job commands' printer)."""
    if args.job_cmd == "releases":
        while True:
            view = api.releases(args.job_id)
            if as_json and args.watch:
                print(json.dumps({**view, "watched_at": time.time()}, sort_keys=True), flush=True)
            elif as_json:
                emit(view)
            else:
                print((f"-- {time.strftime('%H:%M:%S')}\n" if args.watch else "") + format_releases(view), flush=True)
            if not args.watch or api.job(args.job_id)["state"] in ("stopped", "failed"):
                return 0
            time.sleep(args.watch)
    if args.job_cmd in ("promote", "abort-release"):
        emit(api.release_action(args.job_id, "promote" if args.job_cmd == "promote" else "abort"))
        return 0
    current = {} if args.file else api.releases(args.job_id).get("policy") or {}
    emit(api.set_rollout(args.job_id, rollout_body(args, current)))
    return 0
