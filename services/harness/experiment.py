"""``fleetloop experiment NAME --seeds 3 --out DIR``: every configuration x seed, one JSON per run, a summary.

1. Offline start, once per seed (shared by every configuration of that seed, so all methods start
   from the same policy): scripted demos (``DIR/offline/seed<s>/demos``), a behaviour-cloned start
   policy per policy family (``pretrained-mlp`` / ``pretrained-recap``) and its protocol evaluation.
2. Each run (:mod:`services.harness.experiment_run`) in its own process, up to ``parallel`` at once, with a
   progress bar; output ``DIR/runs/<config>/seed<s>/run.json`` (``run.log`` holds its logs). A
   finished run whose spec did not change is reused (``--no-reuse`` runs it again).
3. ``DIR/summary.json``: per configuration mean and std over seeds of every number (failed runs
   counted, not averaged), mean success curves over wall-clock and robot time, the scaling speed-ups,
   the command, the machine and the wall time. ``docs/render_results.py`` turns it into RESULTS.md.
   The releases experiment writes ``DIR/releases.json`` instead (the same, plus a ``releases`` block:
   :func:`services.harness.experiment_releases.summarize_releases`) and a copy of each run record as
   ``DIR/per-run/<config>-seed<s>.json`` (``runs/`` holds learner state and spools: not for git).

Exit status: 0 when every run is ok, 1 otherwise (the summary is written either way).
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from fleetloop.logs import event, get_logger
from services.harness import experiment_metrics as M
from services.harness.experiment_config import MLP_FACTORY, ExperimentOptions, RunSpec, plan, resolved
from services.harness.experiment_run import machine
from services.harness.machine import machine_info

log = get_logger("experiment")
SUMMARY_FORMAT = "fleetloop-experiment-summary/v1"


def _family(factory: str) -> str:
    return "mlp" if factory == MLP_FACTORY else factory.split(":")[-1].replace("_policy", "").replace("_mlp", "")


def _pretrain(demos: Path, tasks: list[str], out: Path, steps: int, seed: int, spec: RunSpec) -> None:
    """Behaviour-clone the start policy of ``spec``'s policy family (RECAP: with its own algorithm when
    ``learner.pretrain.pretrain`` accepts one, so the positive and unknown tokens both get trained)."""
    from learner.pretrain import pretrain
    kwargs: dict[str, Any] = {"steps": steps, "seed": seed, "policy_factory": spec.policy_factory,
                              "policy_kwargs": spec.policy_kwargs, "progress": False}
    params = inspect.signature(pretrain).parameters
    if spec.algorithm != "hg_dagger" and "algorithm" in params:
        kwargs["algorithm"] = spec.algorithm
        if "algorithm_params" in params:
            kwargs["algorithm_params"] = spec.algorithm_params
    pretrain(demos, tasks, out, **kwargs)


def _value_file(pretrained: Path) -> Path | None:
    """The value-function weights ``learner.pretrain`` writes beside a RECAP start policy, if any."""
    try:
        from learner.pretrain import value_weights_path
    except ImportError:
        return None
    path = value_weights_path(Path(pretrained))
    return path if path.is_file() else None


def prepare_offline(specs: list[RunSpec], out: Path, r: dict[str, Any], workers: int, say) -> None:
    """Fill in ``demos``, ``pretrained`` and ``pretrained_eval`` of every spec (computed once per seed
    and policy family, cached under ``out/offline``)."""
    from actor.demos import record_demos
    from fleetloop.dataset import task_counts
    from services.harness.evaluation import EvalPool

    cache: dict[tuple[int, str], tuple[Path, dict]] = {}
    with EvalPool(workers) as pool:
        for spec in specs:
            fam = _family(spec.policy_factory)
            key = (spec.seed, fam)
            if key not in cache:
                root = out / "offline" / f"seed{spec.seed}"
                demos = root / "demos"
                have = task_counts(demos)
                missing = [t for t in spec.tasks if have.get(t, 0) < r["demos_per_task"]]
                if missing:
                    say(f"seed {spec.seed}: recording {r['demos_per_task']} scripted demos for {', '.join(missing)}")
                    record_demos(missing, r["demos_per_task"], demos, seed=spec.seed, progress=False)
                weights = root / f"pretrained-{fam}.safetensors"
                evals = root / f"pretrained-{fam}-eval.json"
                meta = {"tasks": spec.tasks, "steps": r["pretrain_steps"], "demos_per_task": r["demos_per_task"],
                        "factory": spec.policy_factory, "algorithm": spec.algorithm, "trials": spec.eval_trials,
                        "hz": spec.hz, "guidance_beta": spec.eval_guidance_beta}
                cached = json.loads(evals.read_text()) if evals.is_file() else {}
                if cached.get("meta") != meta or not weights.is_file():
                    say(f"seed {spec.seed}: pretraining the {fam} start policy ({r['pretrain_steps']} steps) and "
                        f"evaluating it ({spec.eval_trials} trials per task)")
                    _pretrain(demos, spec.tasks, weights, r["pretrain_steps"], spec.seed, spec)
                    res = pool.evaluate(weights, spec.tasks, spec.eval_trials, policy_factory=spec.policy_factory,
                                        policy_kwargs=spec.policy_kwargs, hz=spec.hz, max_steps=spec.max_episode_steps,
                                        guidance_beta=spec.eval_guidance_beta)
                    evals.write_text(json.dumps({"meta": meta, "results": res}, indent=1))
                    cached = {"meta": meta, "results": res}
                cache[key] = (weights, cached["results"])
            spec.demos = out / "offline" / f"seed{spec.seed}" / "demos"
            spec.pretrained, spec.pretrained_eval = cache[key]
            value = _value_file(spec.pretrained) if spec.algorithm == "recap" else None
            if value is not None:  # the value function pretrained beside the RECAP start policy
                spec.algorithm_params = {"value_weights": str(value), **spec.algorithm_params}


def _reusable(spec: RunSpec) -> dict[str, Any] | None:
    path = Path(spec.run_dir) / "run.json"
    if not path.is_file():
        return None
    try:
        rec = json.loads(path.read_text())
    except ValueError:
        return None
    same = RunSpec.model_validate(rec.get("spec", {})).identity() == spec.identity() if rec.get("spec") else False
    return rec if rec.get("status") == "ok" and same else None


class _Runner:
    """Runs specs as subprocesses, ``parallel`` at a time, and reports fractional progress."""

    def __init__(self, specs: list[RunSpec], parallel: int, progress) -> None:
        self.todo, self.parallel, self.progress = list(specs), parallel, progress
        self.running: dict[str, tuple[RunSpec, subprocess.Popen, Path]] = {}
        self.records: dict[str, dict[str, Any]] = {}

    def _launch(self, spec: RunSpec) -> None:
        run_dir = Path(spec.run_dir)
        shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run: no learner state, spool or robot log of an earlier try
        run_dir.mkdir(parents=True, exist_ok=True)
        spec_path, prog = run_dir / "spec.json", run_dir / "progress.json"
        spec_path.write_text(spec.model_dump_json(indent=1))
        prog.unlink(missing_ok=True)
        fh = open(run_dir / "run.log", "w")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled"}
        try:
            proc = subprocess.Popen([sys.executable, "-m", "services.harness.experiment_run", str(spec_path), str(prog)],
                                    stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=os.getcwd())
        finally:
            fh.close()
        self.running[spec.run_id] = (spec, proc, prog)

    def fraction(self) -> float:
        done = len(self.records)
        for _, _, prog in self.running.values():
            try:
                done += 0.95 * float(json.loads(prog.read_text())["fraction"])
            except (OSError, ValueError, KeyError):
                pass
        return done

    def run(self) -> dict[str, dict[str, Any]]:
        """Run everything; on SIGTERM or Ctrl-C stop the runs in flight (each stops its robots and learner)."""
        import signal
        import threading

        def _interrupt(*_: object) -> None:
            raise KeyboardInterrupt

        previous = signal.signal(signal.SIGTERM, _interrupt) if threading.current_thread() is threading.main_thread() else None
        try:
            while self.todo or self.running:
                while self.todo and len(self.running) < self.parallel:
                    self._launch(self.todo.pop(0))
                for rid, (spec, proc, _) in list(self.running.items()):
                    if proc.poll() is None:
                        continue
                    del self.running[rid]
                    self.records[rid] = self._read(spec, proc.returncode)
                    self.progress(self.fraction(), self.records[rid])
                self.progress(self.fraction(), None)
                time.sleep(1.0)
        finally:
            for _, proc, _ in self.running.values():  # interrupted: stop our own run processes (they stop their robots)
                proc.terminate()
            for _, proc, _ in self.running.values():
                try:
                    proc.wait(90)
                except subprocess.TimeoutExpired:
                    proc.kill()
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
        return self.records

    @staticmethod
    def _read(spec: RunSpec, rc: int) -> dict[str, Any]:
        path = Path(spec.run_dir) / "run.json"
        if path.is_file():
            return json.loads(path.read_text())
        tail = (Path(spec.run_dir) / "run.log").read_text(errors="replace")[-1500:] if (Path(spec.run_dir) / "run.log").exists() else ""
        return {"experiment": spec.experiment, "config": spec.config, "label": spec.label, "seed": spec.seed,
                "status": "failed", "error": f"run process exited {rc} without run.json: {tail}",
                "spec": spec.model_dump(mode="json")}


def summarize(name: str, records: list[dict[str, Any]], tasks: list[str], options: dict[str, Any], command: str,
              wall_seconds: float, reused: int = 0) -> dict[str, Any]:
    """The summary JSON of an experiment from its run records."""
    by_config: dict[str, list[dict[str, Any]]] = {}
    for rec in records:
        by_config.setdefault(rec["config"], []).append(rec)
    configs = {cfg: M.summarize_config(runs, tasks) for cfg, runs in by_config.items()}
    for cfg, runs in by_config.items():
        configs[cfg].setdefault("label", runs[0].get("label"))
        ok = [r for r in runs if r.get("status") == "ok"]
        horizon = max((p["t"] for r in ok for p in r.get("series", [])), default=0.0)
        rs_horizon = max((r["usage"]["robot_seconds"] for r in ok), default=0.0)
        grid = [horizon * i / 40 for i in range(41)] if horizon > 0 else [0.0]
        configs[cfg]["curve_wall"] = M.mean_curve(ok, grid)
        rs_runs = [{"series": [{"rs": float(p.get("robot_steps", 0)) / max(r["spec"]["hz"], 1e-9), "mean": p["mean"]}
                               for p in r.get("series", [])]} for r in ok]
        rs_grid = [rs_horizon * i / 40 for i in range(41)] if rs_horizon > 0 else [0.0]
        configs[cfg]["curve_robot"] = M.mean_curve(rs_runs, rs_grid, key="rs")
        configs[cfg]["errors"] = [r.get("error") for r in runs if r.get("status") != "ok"]
    out = {"format": SUMMARY_FORMAT, "experiment": name, "command": command, "machine": machine(),
           "wall_seconds": wall_seconds, "reused_runs": reused,
           "runs_wall_seconds_total": sum(float(r.get("run_wall_seconds") or 0.0) for r in records),
           "finished_at": time.strftime("%Y-%m-%d %H:%M:%S"), "options": options,
           "tasks": tasks, "target": M.TARGET, "runs": len(records), "ok": sum(r.get("status") == "ok" for r in records),
           "configs": configs}
    if name == "releases":
        from services.harness.experiment_releases import summarize_releases
        out["machine_facts"] = machine_info()
        out["releases"] = summarize_releases(records)
    if name == "scaling":
        out["scaling"] = M.scaling_speedups(configs, {int(configs[c]["robots"]): runs for c, runs in by_config.items()
                                                      if configs[c].get("robots") is not None})
    return out


def summary_file(name: str) -> str:
    """File name of an experiment's summary in its output folder."""
    return "releases.json" if name == "releases" else "summary.json"


def run_experiment(o: ExperimentOptions, command: str = "", progress: bool = True) -> dict[str, Any]:
    """Run the experiment ``o.name``; returns the summary (also written to ``o.out/summary.json``, or
    ``releases.json``: :func:`summary_file`)."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(width=None if sys.stdout.isatty() else 140)  # logs and CI: wide enough for the table
    t0 = time.time()
    r = resolved(o)
    specs = plan(o)
    out = Path(o.out)
    out.mkdir(parents=True, exist_ok=True)
    say = (lambda m: console.print(f"[experiment {o.name}] {m}")) if progress else (lambda m: None)
    say(f"{len(specs)} runs ({len({s.config for s in specs})} configurations x {r['seeds']} seeds), tasks {', '.join(r['tasks'])}; "
        f"budget {r['minutes']:g} min per run, robots {r['robots']}, {r['hz']:g} Hz -> {out}")
    prepare_offline(specs, out, r, workers=max(1, min(len(r["tasks"]), (os.cpu_count() or 2))), say=say)
    todo = []
    records: dict[str, dict[str, Any]] = {}
    for spec in specs:
        spec.run_dir = out / "runs" / spec.config / f"seed{spec.seed}"
        old = _reusable(spec) if o.reuse else None
        if old is not None:
            records[spec.run_id] = old
        else:
            todo.append(spec)
    if records:
        say(f"reusing {len(records)} finished runs with unchanged specs")
    bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed:.1f}/{task.total} runs"),
                   TimeElapsedColumn(), console=console, disable=not progress)

    with bar:
        task = bar.add_task(f"experiment {o.name}", total=len(todo))

        def on_progress(done: float, rec: dict[str, Any] | None) -> None:
            bar.update(task, completed=done)
            if rec is not None:
                note = f"final {rec['final_mean']:.2f}" if rec.get("status") == "ok" else f"FAILED: {str(rec.get('error'))[:200]}"
                ttt = rec.get("time_to_target_s")
                bar.console.print(f"  {rec['config']} seed {rec['seed']}: {note}"
                                  + (f", time-to-{M.TARGET} {ttt:.0f} s" if ttt is not None else ""))

        records.update(_Runner(todo, o.parallel, on_progress).run())
    ordered = [records[s.run_id] for s in specs if s.run_id in records]
    options = {**o.model_dump(mode="json"), "resolved": r}
    summary = summarize(o.name, ordered, r["tasks"], options, command, time.time() - t0, reused=len(ordered) - len(todo))
    (out / summary_file(o.name)).write_text(json.dumps(summary, indent=1, default=str))
    if o.name == "releases":
        (out / "per-run").mkdir(exist_ok=True)
        for rec in ordered:
            (out / "per-run" / f"{rec['config']}-seed{rec['seed']}.json").write_text(json.dumps(rec, indent=1, default=str))
    event(log, "experiment_done", experiment=o.name, runs=len(ordered), ok=summary["ok"], seconds=round(summary["wall_seconds"], 1))
    if progress:
        print_summary(summary, console)
    return summary


def _fmt(s: dict[str, Any], digits: int = 2) -> str:
    if s["mean"] is None:
        return "-"
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}" if s["n"] > 1 else f"{s['mean']:.{digits}f}"


def print_summary(summary: dict[str, Any], console) -> None:
    """One table: per configuration final success, time-to-target, human effort, robot time."""
    from rich.table import Table
    t = Table(title=f"fleetloop experiment {summary['experiment']}: {summary['ok']}/{summary['runs']} runs ok, "
                    f"{summary['wall_seconds']:.0f} s")
    for col in ("configuration", "runs", "final success", "gain", f"time to {summary['target']} (s)", "reached",
                "human share", "robot steps"):
        t.add_column(col, justify="right")
    for cfg, c in summary["configs"].items():
        reached = c["reached_target"]
        t.add_row(c.get("label") or cfg, f"{c['runs']}" + (f" ({c['failed']} failed)" if c["failed"] else ""),
                  _fmt(c["final_mean"]), _fmt(c["gain"]), _fmt(c["time_to_target_s"], 0),
                  f"{reached['reached']}/{reached['of']}", _fmt(c["intervention_share"]), _fmt(c["robot_steps"], 0))
    console.print(t)
    for cfg, c in summary["configs"].items():
        for err in c.get("errors", []):
            console.print(f"[red]{cfg}: {str(err)[:300]}[/red]")
