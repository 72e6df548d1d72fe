"""``fleetloop bench async``: synchronous (eta = 0) vs asynchronous (eta > 0) GRPO on the same job.

    fleetloop bench async --out runs/bench-async.json --etas 0,1,2,4 --steps 10 --model smollm2
    fleetloop bench async --tiny --out runs/bench-async-tiny.json   # random tiny Llama, CI-sized

For each eta, one :func:`services.llm_fleet.run_session` with the same model, task, seed, servers
and GRPO settings runs ``steps`` learner steps after every engine is up (or stops early at
``target_reward``, or at ``max_minutes``). Per eta: wall seconds to the ``steps``-th step and per
step, wall seconds to the target reward (when set and reached), learner idle share, rollout-server
idle share and admission-wait share, staleness histogram, groups dropped as stale, admitted and
blocked rollouts. Each async figure sits beside the eta = 0 baseline of the same run (``rows``:
``baseline`` = eta 0, ``ratio`` = baseline / async for times, so > 1 means async is faster).

Each eta starts fresh engines (start-up is not in the window, see :mod:`services.llm_fleet`), so
the runs are sequential and the machine's load changes between them: the JSON records the load
average at each run's start and end. With ``--model tiny`` the reward is 0 throughout (a random
model); the comparison is then of throughput and idle time only.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import load_average, log_progress, machine_info, ratio, write_json

TINY = {"model": "tiny", "group_size": 4, "batch_groups": 2, "max_new_tokens": 8, "lr": 1e-3, "rollouts_per_admit": 1}


def parse_etas(text: str) -> list[int]:
    """'0,1,2,4' -> [0, 1, 2, 4] (ValueError naming --etas otherwise); eta 0 is always run first."""
    try:
        etas = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        etas = []
    if not etas or any(e < 0 or e > 64 for e in etas) or len(set(etas)) != len(etas):
        raise ValueError(f"--etas {text!r} must be distinct comma-separated integers in 0..64")
    return [0] + [e for e in etas if e != 0]


def run_async(etas: list[int], steps: int, model: str = "tiny", servers: int = 2, target_reward: float | None = None,
              max_minutes: float = 30.0, seed: int = 0, out_dir: Path | None = None, tiny: bool = False) -> dict[str, Any]:
    """Run one session per eta (eta 0 first); returns the JSON result (module docstring)."""
    from services.llm_demo import PRESETS
    from services.llm_fleet import LlmSessionSpec, run_session

    base = dict(TINY if (tiny or model == "tiny") else PRESETS["smollm2"])
    base.update({"model": "tiny" if tiny else model, "task": "arith", "task_params": {"digits": 1, "ops": "+"}})
    base.setdefault("task", "arith")
    work = Path(out_dir or Path("runs/bench-async"))
    machine = machine_info()
    runs = []
    for eta in etas:
        spec = LlmSessionSpec(**{k: v for k, v in base.items() if k in LlmSessionSpec.model_fields}, eta=eta,
                              servers=servers, seed=seed, max_new_steps=steps, target_reward=target_reward,
                              hard_limit_minutes=max_minutes)
        log_progress(f"eta={eta}: {spec.model}, {steps} steps, {servers} servers (starting engines)")
        load0 = load_average()
        res = run_session(spec, work / f"eta{eta}",
                          on_phase=lambda msg, eta=eta: log_progress(f"eta={eta}: {msg}"))
        run = _figures(eta, res, steps)
        run["loadavg_1m"] = {"start": load0, "end": load_average()}
        runs.append(run)
        log_progress(f"eta={eta}: {run['steps_done']} steps in {run['wall_s']:.1f}s, learner idle "
                     f"{_pct(run['learner_idle_share'])}, servers idle {_pct(run['rollout_idle_share'])}")
    rows = _rows(runs)
    notes = [f"{servers} rollout servers pinned to separate cores; learner in the bench process; "
             f"{'tiny random Llama: reward is 0, so only throughput/idle compare' if base['model'] == 'tiny' else base['model']}",
             "wall time counts from the moment every engine was up (engine start-up excluded)",
             "runs are sequential on a shared machine: see loadavg_1m per run"]
    return {"bench": "async", "machine": machine, "config": {**base, "etas": etas, "steps": steps, "servers": servers,
                                                             "target_reward": target_reward, "seed": seed,
                                                             "max_minutes": max_minutes},
            "runs": runs, "rows": rows, "notes": notes, "versions": _versions()}


def _versions() -> dict[str, str | None]:
    from services.llm_fleet import package_versions
    return package_versions()


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def _figures(eta: int, res: dict[str, Any], steps: int) -> dict[str, Any]:
    recs = res["steps"]
    wall = recs[-1]["t"] if recs else res["timings"]["window_s"]
    servers = res["servers"].values()
    waits = [s["admission_wait_share"] for s in servers if s["admission_wait_share"] is not None]
    rewards = [r["reward_mean"] for r in recs if r["reward_mean"] is not None]
    return {"eta": eta, "steps_target": steps, "steps_done": len(recs), "wall_s": wall,
            "s_per_step": wall / len(recs) if recs else None, "stop_reason": res["stop_reason"],
            "target_reached_s": res["target_reached_s"], "learner_idle_share": res["learner"]["idle_share"],
            "rollout_idle_share": res["rollout_idle_share"],
            "admission_wait_share": sum(waits) / len(waits) if waits else None,
            "staleness_histogram": res["staleness_histogram"], "dropped_stale": res["dropped_stale"],
            "admitted": res["admission"]["admitted"], "blocked": res["admission"]["blocked"],
            "reward_mean": sum(rewards) / len(rewards) if rewards else None, "reward_last": rewards[-1] if rewards else None,
            "startup_s": res["timings"]["startup_s"], "steps": recs, "servers": res["servers"]}


def _rows(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every async figure beside the eta = 0 baseline; ratio = baseline / async for times (> 1: async faster)."""
    base = next(r for r in runs if r["eta"] == 0)
    rows = []
    for r in runs:
        rows.append({"eta": r["eta"], "s_per_step": r["s_per_step"], "baseline_s_per_step": base["s_per_step"],
                     "speedup": ratio(base["s_per_step"], r["s_per_step"]),
                     "wall_to_target_s": r["target_reached_s"], "baseline_wall_to_target_s": base["target_reached_s"],
                     "speedup_to_target": ratio(base["target_reached_s"], r["target_reached_s"]),
                     "learner_idle_share": r["learner_idle_share"], "baseline_learner_idle_share": base["learner_idle_share"],
                     "rollout_idle_share": r["rollout_idle_share"], "baseline_rollout_idle_share": base["rollout_idle_share"],
                     "staleness_histogram": r["staleness_histogram"], "dropped_stale": r["dropped_stale"],
                     "steps_done": r["steps_done"]})
    return rows


def print_async_table(result: dict[str, Any]) -> None:
    """The rows as a rich table on stdout."""
    from rich.console import Console
    from rich.table import Table

    m = result["machine"]
    t = Table(title=f"fleetloop bench async: {result['config']['model']}, {result['config']['steps']} steps, "
                    f"{result['config']['servers']} servers (baseline eta=0 from the same run)",
              caption=f"{m['cpus_usable']} CPUs, load {m['loadavg_1m_at_start']}, {m['platform']}; speedup = eta0 / eta")
    for col in ("eta", "steps", "s/step", "speedup", "to target s", "learner idle", "servers idle", "staleness hist",
                "dropped"):
        t.add_column(col, justify="right")
    f = lambda v, p=1: "-" if v is None else f"{v:.{p}f}"  # noqa: E731
    for r in result["rows"]:
        t.add_row(str(r["eta"]), str(r["steps_done"]), f(r["s_per_step"]), f(r["speedup"], 2), f(r["wall_to_target_s"]),
                  _pct(r["learner_idle_share"]), _pct(r["rollout_idle_share"]),
                  " ".join(f"{k}:{v}" for k, v in r["staleness_histogram"].items()), str(r["dropped_stale"]))
    console = Console(width=max(120, Console().width))
    console.print(t)
    for note in result["notes"]:
        console.print(f"  - {note}", highlight=False)


def main(args: argparse.Namespace) -> int:
    """``fleetloop bench async``: run, print the table, write ``args.out``; 2 on a bad argument."""
    try:
        etas = parse_etas(args.etas)
        if args.steps is not None and args.steps < 1:
            raise ValueError(f"--steps {args.steps} must be >= 1")
        if args.servers < 1:
            raise ValueError(f"--servers {args.servers} must be >= 1")
    except ValueError as exc:
        print(f"fleetloop bench async: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    steps = args.steps if args.steps is not None else (3 if args.tiny else 10)
    t0 = time.monotonic()
    result = run_async(etas, steps, model=args.model, servers=args.servers, target_reward=args.target_reward,
                       max_minutes=args.max_minutes, seed=args.seed,
                       out_dir=Path(args.work_dir) if args.work_dir else out.with_suffix("").parent / (out.stem + "-runs"),
                       tiny=args.tiny)
    result["wall_s"] = round(time.monotonic() - t0, 1)
    result["command"] = " ".join(["fleetloop", *sys.argv[1:]]) if sys.argv[1:2] == ["bench"] else "fleetloop bench async"
    print_async_table(result)
    path = write_json(result, out)
    log_progress(f"wrote {path}")
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of ``fleetloop bench async``."""
    p.add_argument("--out", required=True, help="JSON result file")
    p.add_argument("--etas", default="0,1,2,4", help="comma-separated staleness bounds (eta 0, sync, always runs first)")
    p.add_argument("--steps", type=int, default=None, help="learner steps per eta after every engine is up (default 10; "
                   "--tiny: 3)")
    p.add_argument("--model", default="tiny", help="tiny | smollm2 | a Hugging Face folder")
    p.add_argument("--tiny", action="store_true", help="CI preset: tiny random Llama, 3 steps unless --steps")
    p.add_argument("--servers", type=int, default=2, help="rollout servers")
    p.add_argument("--target-reward", type=float, default=None, help="also record wall time to this mean reward")
    p.add_argument("--max-minutes", type=float, default=30.0, help="safety limit per eta")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work-dir", default=None, help="logs and learner state per eta (default next to --out)")
