"""``fleetloop bench async``: synchronous (eta = 0) vs asynchronous (eta > 0) GRPO on the same job.

    fleetloop bench async --out runs/bench-async.json --etas 0,1,2,4 --steps 10 --model smollm2
    fleetloop bench async --tiny --out runs/bench-async-tiny.json   # random tiny Llama, CI-sized

For each eta, one :func:`services.harness.llm_fleet.run_session` with the same model, task, seed, servers
and GRPO settings runs ``steps`` learner steps after every engine is up (or stops early at
``target_reward``, or at ``max_minutes``). Per eta: wall seconds to the ``steps``-th step and per
step, wall seconds to the target reward (when set and reached), learner idle share, rollout-server
idle share and admission-wait share, staleness histogram, groups dropped as stale, admitted and
blocked rollouts. Each async figure sits beside the eta = 0 baseline of the same run (``rows``:
``baseline`` = eta 0, ``ratio`` = baseline / async for times, so > 1 means async is faster).

Each eta starts fresh engines (start-up is not in the window, see :mod:`services.harness.llm_fleet`), so
the runs are sequential and the machine's load changes between them: the JSON records the load
average at each run's start and end. With ``--model tiny`` the reward is 0 throughout (a random
model); the comparison is then of throughput and idle time only.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable

from bench.common import load_average, log_progress, machine_info, ratio

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


def schedule(etas: list[int], repeats: int) -> list[tuple[int, int]]:
    """``(repeat, eta)`` in run order: the eta list forwards, then backwards, and so on (ABBA), so a
    load that drifts over the run hits every eta alike. ``[0, 1], 2 -> [(0,0), (0,1), (1,1), (1,0)]``."""
    order: list[tuple[int, int]] = []
    for rep in range(repeats):
        order += [(rep, e) for e in (etas if rep % 2 == 0 else list(reversed(etas)))]
    return order


def run_async(etas: list[int], steps: int, model: str = "tiny", servers: int = 2, target_reward: float | None = None,
              max_minutes: float = 30.0, seed: int = 0, out_dir: Path | None = None, tiny: bool = False,
              repeats: int = 1) -> dict[str, Any]:
    """Run one session per (repeat, eta) in :func:`schedule` order, repeat r with seed ``seed + r``;
    returns the JSON result (module docstring): ``runs`` (one per session) and ``rows`` (per eta,
    medians/means over repeats beside eta 0's)."""
    from services.harness.llm_demo import PRESETS
    from services.harness.llm_fleet import LlmSessionSpec

    base = dict(TINY if (tiny or model == "tiny") else PRESETS["smollm2"])
    base.update({"model": "tiny" if tiny else model, "task": "arith", "task_params": {"digits": 1, "ops": "+"}})
    base.setdefault("task", "arith")
    work = Path(out_dir or Path("runs/bench-async"))
    machine = machine_info()
    runs = []
    for rep, eta in schedule(etas, repeats):
        spec = LlmSessionSpec(**{k: v for k, v in base.items() if k in LlmSessionSpec.model_fields}, eta=eta,
                              servers=servers, seed=seed + rep, max_new_steps=steps, target_reward=target_reward,
                              hard_limit_minutes=max_minutes)
        tag = f"eta={eta}" + (f" repeat {rep + 1}/{repeats}" if repeats > 1 else "")
        log_progress(f"{tag}: {spec.model}, {steps} steps, {servers} servers (starting engines)")
        load0 = load_average()
        res = run_isolated(spec, work / (f"eta{eta}" if repeats == 1 else f"eta{eta}-r{rep}"), eta)
        run = _figures(eta, res, steps)
        run.update(repeat=rep, seed=seed + rep, loadavg_1m={"start": load0, "end": load_average()})
        runs.append(run)
        log_progress(f"{tag}: {run['steps_done']} steps in {run['wall_s']:.1f}s, learner idle "
                     f"{_pct(run['learner_idle_share'])}, servers idle {_pct(run['rollout_idle_share'])}")
    rows = _rows(runs)
    notes = [f"{servers} rollout servers pinned to separate cores; learner in the bench process; "
             f"{'tiny random Llama: reward is 0, so only throughput/idle compare' if base['model'] == 'tiny' else base['model']}",
             "wall time counts from the moment every engine was up (engine start-up excluded)",
             "runs are sequential on a shared machine: see loadavg_1m and train_s_mean (the learner's own step "
             "time, a load indicator) per run" + ("; repeats run in ABBA order with seed + repeat" if repeats > 1 else "")]
    return {"bench": "async", "machine": machine, "config": {**base, "etas": etas, "steps": steps, "servers": servers,
                                                             "target_reward": target_reward, "seed": seed,
                                                             "max_minutes": max_minutes, "repeats": repeats},
            "runs": runs, "rows": rows, "notes": notes, "versions": _versions()}


def _session_child(spec_json: str, work: str, eta: int, result_path: str) -> None:
    """Child process body of :func:`run_isolated`: one session, its result written as JSON."""
    import json

    from services.harness.llm_fleet import LlmSessionSpec, run_session
    spec = LlmSessionSpec.model_validate_json(spec_json)
    res = run_session(spec, Path(work), on_phase=lambda msg: log_progress(f"eta={eta}: {msg}"))
    Path(result_path).write_text(json.dumps(res, default=str))


def run_isolated(spec: Any, work: Path, eta: int) -> dict[str, Any]:
    """One :func:`services.harness.llm_fleet.run_session` in a fresh ``spawn`` process, so every eta starts
    from the same memory state and the learner's model, optimizer and weight copies of one eta are
    returned to the OS before the next starts (in one process they added up: the bench was killed by
    the kernel's OOM killer during eta 1 with 8 GB resident). Raises RuntimeError when the child fails."""
    import json
    import multiprocessing

    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    result_path = work / "session-result.json"
    result_path.unlink(missing_ok=True)
    proc = multiprocessing.get_context("spawn").Process(
        target=_session_child, args=(spec.model_dump_json(), str(work), eta, str(result_path)), name=f"bench-async-eta{eta}")
    proc.start()
    try:
        proc.join()
    except BaseException:
        proc.terminate()
        proc.join(30)
        raise
    if proc.exitcode != 0 or not result_path.exists():
        raise RuntimeError(f"bench async: the session for eta={eta} failed (exit code {proc.exitcode}); see {work}")
    return json.loads(result_path.read_text())


def _versions() -> dict[str, str | None]:
    from services.harness.llm_fleet import package_versions
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
            "train_s_mean": (sum(r["seconds"] for r in recs) / len(recs)) if recs else None,
            "startup_s": res["timings"]["startup_s"], "steps": recs, "servers": res["servers"]}


def _agg(values: list[Any], how: str = "median") -> float | None:
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None
    if how == "mean":
        return sum(vals) / len(vals)
    vals.sort()
    mid = len(vals) // 2
    return vals[mid] if len(vals) % 2 else (vals[mid - 1] + vals[mid]) / 2


def _rows(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per eta over its repeats (median s/step, mean wall-to-target over the repeats that reached it,
    mean shares), every figure beside eta 0's; speedup = eta-0 figure / this eta's (> 1: async faster)."""
    by_eta: dict[int, list[dict[str, Any]]] = {}
    for r in runs:
        by_eta.setdefault(r["eta"], []).append(r)

    def summary(rs: list[dict[str, Any]]) -> dict[str, Any]:
        hist: dict[str, int] = {}
        for r in rs:
            for k, v in r["staleness_histogram"].items():
                hist[str(k)] = hist.get(str(k), 0) + v
        return {"s_per_step": _agg([r["s_per_step"] for r in rs]),
                "wall_to_target_s": _agg([r["target_reached_s"] for r in rs], "mean"),
                "reached": sum(r["target_reached_s"] is not None for r in rs), "repeats": len(rs),
                "learner_idle_share": _agg([r["learner_idle_share"] for r in rs], "mean"),
                "rollout_idle_share": _agg([r["rollout_idle_share"] for r in rs], "mean"),
                "train_s_mean": _agg([r.get("train_s_mean") for r in rs], "mean"),
                "staleness_histogram": dict(sorted(hist.items(), key=lambda kv: int(kv[0]))),
                "dropped_stale": sum(r["dropped_stale"] for r in rs), "steps_done": sum(r["steps_done"] for r in rs)}

    base = summary(by_eta[0])
    rows = []
    for eta in sorted(by_eta):
        s = summary(by_eta[eta])
        rows.append({"eta": eta, **s, "baseline_s_per_step": base["s_per_step"],
                     "speedup": ratio(base["s_per_step"], s["s_per_step"]),
                     "baseline_wall_to_target_s": base["wall_to_target_s"],
                     "speedup_to_target": ratio(base["wall_to_target_s"], s["wall_to_target_s"]),
                     "baseline_learner_idle_share": base["learner_idle_share"],
                     "baseline_rollout_idle_share": base["rollout_idle_share"],
                     "baseline_train_s_mean": base["train_s_mean"]})
    return rows


def print_async_table(result: dict[str, Any]) -> None:
    """The rows as a rich table on stdout."""
    from rich.console import Console
    from rich.table import Table

    m = result["machine"]
    t = Table(title=f"fleetloop bench async: {result['config']['model']}, {result['config']['steps']} steps, "
                    f"{result['config']['servers']} servers (baseline eta=0 from the same run)",
              caption=f"{m['cpus_usable']} CPUs, load {m['loadavg_1m_at_start']}, {m['platform']}; speedup = eta0 / eta")
    for col in ("eta", "runs", "steps", "s/step", "speedup", "to target s", "reached", "speedup to target", "train s/step",
                "learner idle", "servers idle", "staleness hist", "dropped"):
        t.add_column(col, justify="right")
    f = lambda v, p=1: "-" if v is None else f"{v:.{p}f}"  # noqa: E731
    for r in result["rows"]:
        t.add_row(str(r["eta"]), str(r["repeats"]), str(r["steps_done"]), f(r["s_per_step"]), f(r["speedup"], 2),
                  f(r["wall_to_target_s"]), f"{r['reached']}/{r['repeats']}", f(r["speedup_to_target"], 2),
                  f(r["train_s_mean"]), _pct(r["learner_idle_share"]), _pct(r["rollout_idle_share"]),
                  " ".join(f"{k}:{v}" for k, v in r["staleness_histogram"].items()), str(r["dropped_stale"]))
    console = Console(width=max(120, Console().width))
    console.print(t)
    for note in result["notes"]:
        console.print(f"  - {note}", highlight=False)


def plan(args: argparse.Namespace) -> Callable[[], dict[str, Any]]:
    """Check the flags (ValueError naming the bad one); return the run (result with wall_s and command)."""
    etas = parse_etas(args.etas)
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps {args.steps} must be >= 1")
    if args.repeats < 1:
        raise ValueError(f"--repeats {args.repeats} must be >= 1")
    if args.servers < 1:
        raise ValueError(f"--servers {args.servers} must be >= 1")
    out = Path(args.out)
    steps = args.steps if args.steps is not None else (3 if args.tiny else 10)

    def run() -> dict[str, Any]:
        t0 = time.monotonic()
        result = run_async(etas, steps, model=args.model, servers=args.servers, target_reward=args.target_reward,
                           max_minutes=args.max_minutes, seed=args.seed,
                           out_dir=Path(args.work_dir) if args.work_dir else out.with_suffix("").parent / (out.stem + "-runs"),
                           tiny=args.tiny, repeats=args.repeats)
        result["wall_s"] = round(time.monotonic() - t0, 1)
        result["command"] = " ".join(["fleetloop", *sys.argv[1:]]) if sys.argv[1:2] == ["bench"] else "fleetloop bench async"
        return result
    return run


def main(args: argparse.Namespace) -> int:
    """``fleetloop bench async``: run, write ``args.out``, print the table; 2 on a bad argument."""
    from bench.runner import run_reported

    return run_reported("async", args, plan, table=print_async_table)


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
    p.add_argument("--seed", type=int, default=0, help="seed of the first repeat (repeat r uses seed + r)")
    p.add_argument("--repeats", type=int, default=1, help="sessions per eta, run in ABBA order (0,1,2 then 2,1,0, ...)")
    p.add_argument("--work-dir", default=None, help="logs and learner state per eta (default next to --out)")
