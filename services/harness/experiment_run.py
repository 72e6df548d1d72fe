"""One experiment run (a :class:`RunSpec`): ``python -m services.harness.experiment_run SPEC.json`` writes ``run.json``.

Methods:

* ``pretrained``: the start policy's protocol evaluation (no robot time, no operator).
* ``sop``: the closed loop. The learner trains continuously while ``robots`` robots (scripted
  HG-DAgger operator, paced at ``hz``) stream to it; the run ends when the fleet's received steps
  reach the budget (``robot_steps``) or after ``minutes`` of wall-clock time (``wall``). At that
  moment training stops and the policy is published: that version is the run's final policy.
* ``rounds``: HG-DAgger in offline rounds. Round r: the robots run the current version until the
  fleet has sent ``r / rounds`` of the budget, then stop (each finishes its episode and flushes);
  the learner, idle meanwhile, trains ``round_train_steps`` steps on everything stored so far
  (demos + all rounds), publishes, and the robots are redeployed with it.

Both: when the fleet's operator steps reach the intervention budget, the robots are restarted
without operator (the human goes home); periodic evaluation runs on separate processes
(:class:`services.harness.evaluation.PeriodicEvaluator`) every ``eval_interval_s`` of run time (``eval_mode``
deferred: the run only snapshots the newest version then, and the snapshots are evaluated once robots
and learner have stopped), and the final
policy gets the protocol evaluation (``eval_trials`` per task). The run checks that the learner
received exactly the steps the robots say they sent (evaluation episodes never reach it) and that
nothing was stored twice. Run time ``t`` is wall-clock seconds since the robots were first started.
"""

from __future__ import annotations

import json
import platform
import secrets
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from fleetloop.logs import event, get_logger
from services.harness import experiment_metrics as M
from services.harness.experiment_config import RunSpec

log = get_logger("experiment.run")
FORMAT = "fleetloop-experiment-run/v1"


def machine() -> dict[str, Any]:
    """Where a run ran (for RESULTS.md)."""
    import os
    return {"host": platform.node(), "cpus": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version()}


class _Progress:
    def __init__(self, path: Path | None) -> None:
        self.path, self.last = path, 0.0

    def __call__(self, fraction: float, note: str = "", force: bool = False) -> None:
        if self.path is None or (not force and time.monotonic() - self.last < 1.0):
            return
        self.last = time.monotonic()
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"fraction": max(0.0, min(1.0, fraction)), "note": note}))
        tmp.replace(self.path)


def _learner_config(spec: RunSpec, state_dir: Path, token: str, method: str):
    from learner.config import LearnerConfig
    from learner.sampler import SamplerConfig
    return LearnerConfig(
        job_id=f"exp-{spec.experiment}-{spec.config}-s{spec.seed}".replace("_", "-")[:64], state_dir=state_dir,
        tasks=spec.tasks, initial_weights=spec.pretrained, offline_dataset=spec.demos, algorithm=spec.algorithm,
        algorithm_params=spec.algorithm_params, policy_factory=spec.policy_factory, policy_kwargs=spec.policy_kwargs,
        sampler=SamplerConfig(**spec.sampler), batch_size=spec.batch_size,
        publish_every=spec.publish_every if method == "sop" else 1_000_000_000, min_publish_interval_s=1.0,
        max_updates_per_s=spec.max_updates_per_s, robot_tokens=[token], metrics_port=None, seed=spec.seed,
        max_episode_steps=spec.max_episode_steps, checkpoint_every_s=600.0,
        **({"rollout": spec.rollout} if spec.rollout is not None else {}))


class Run:
    """State of one run (see the module docstring)."""

    def __init__(self, spec: RunSpec, progress: _Progress) -> None:
        self.spec, self.progress = spec, progress
        self.run_dir = Path(spec.run_dir)
        self.budget = M.budget_steps(spec.robots, spec.hz, spec.minutes * 60) if spec.budget_kind == "robot_steps" else None
        self.cap = M.intervention_budget(self.budget, spec.intervention_budget) if self.budget is not None else None
        self.wall_budget = spec.minutes * 60 if spec.budget_kind == "wall" else None
        # robots run in parallel, paced: either budget takes about minutes*60 s of wall time (+ training pauses
        # for rounds). The deadline is a safety net only; CPU starvation shows up as pace_ratio < 1.
        self.deadline_s = 3 * spec.minutes * 60 + 300
        self.first_data_t: float | None = None
        self.cap_hit_at: float | None = None
        self.t0 = 0.0
        self.rounds: list[dict[str, Any]] = []
        self.startup_s: list[float] = []  # seconds each fleet launch took to connect

    # -- shared pieces -----------------------------------------------------------------------
    def now(self) -> float:
        return time.monotonic() - self.t0

    def _fraction(self, c: dict[str, int]) -> float:
        if self.budget:
            return c["robot_steps"] / self.budget
        return self.now() / self.wall_budget if self.wall_budget else 0.0

    def tick(self) -> dict[str, int]:
        """Poll: periodic evaluation, intervention budget, progress. Returns the learner's counts."""
        c = self.learner.counts()
        if self.first_data_t is None and c["robot_steps"] > 0:
            self.first_data_t = self.now()
        self.evaluator.poll(self.now(), {k: c[k] for k in ("robot_steps", "intervention_steps", "learner_step", "episodes")})
        if self.cap is not None and self.cap_hit_at is None and c["intervention_steps"] >= self.cap:
            self.cap_hit_at = self.now()
            event(log, "intervention_budget_spent", job=self.learner.cfg.job_id, used=c["intervention_steps"], cap=self.cap)
            if self.fleet.robots:
                self.fleet.stop()
                self._deploy()
        self.progress(self._fraction(c), self.spec.run_id)
        return c

    def operator(self) -> str:
        return "none" if self.cap_hit_at is not None else "scripted"

    # -- methods -----------------------------------------------------------------------------
    def _deploy(self) -> None:
        """Start the robots and wait until all have connected (their start-up is not robot time)."""
        self.fleet.start(self.operator())
        self.startup_s.append(self.fleet.wait_connected(self.learner))

    def sop(self) -> dict[str, Any]:
        self._deploy()
        self.t0 = time.monotonic()  # run time starts with the fleet up; the learner starts training now
        self.learner.core.start_training()
        while True:
            c = self.tick()
            if self.budget is not None and c["robot_steps"] >= self.budget:
                break
            if self.wall_budget is not None and self.now() >= self.wall_budget:
                break
            if self.now() > self.deadline_s:
                raise TimeoutError(f"run exceeded its safety deadline {self.deadline_s:.0f} s at {c}")
            if not self.fleet.alive():
                raise RuntimeError(f"every robot exited before the budget was used: exit codes "
                                   f"{[r.proc.returncode for r in self.fleet.robots]} (see {self.run_dir / 'logs'})")
            time.sleep(self.spec.poll_s)
        at_stop = self.learner.counts()
        extra = self.at_stop()
        version = self.learner.freeze()
        return {"stop_t": self.now(), "at_stop": at_stop, "final_version": version, **extra}

    def at_stop(self) -> dict[str, Any]:
        """Hook: what a subclass records at the budget, before training stops (added to the stop dict)."""
        return {}

    def eval_snapshot(self) -> tuple[int, bytes]:
        """Hook: (version, blob) the periodic evaluation takes (default: the newest published version)."""
        return self.learner.snapshot()

    def offline_rounds(self) -> dict[str, Any]:
        spec = self.spec
        steps_per_round = spec.round_train_steps or max(1, round(spec.max_updates_per_s * spec.minutes * 60 / spec.rounds))
        for r in range(1, spec.rounds + 1):
            quota = round(self.budget * r / spec.rounds)
            before = self.learner.counts()
            t_start = self.now() if r > 1 else 0.0
            if before["robot_steps"] < quota:  # (the previous round's episode tails may already cover a tiny quota)
                self._deploy()  # redeploy (round 1: deploy); the wait for robot processes counts from round 2 on
                if r == 1:
                    self.t0 = time.monotonic()
                while True:
                    c = self.tick()
                    if c["robot_steps"] >= quota:
                        break
                    if self.now() > self.deadline_s:
                        raise TimeoutError(f"round {r} exceeded the safety deadline at {c}")
                    if not self.fleet.alive():
                        raise RuntimeError(f"every robot exited in round {r} (see {self.run_dir / 'logs'})")
                    time.sleep(spec.poll_s)
                self.fleet.stop()  # each robot finishes its episode and flushes: the whole round is stored
            collected = self.learner.counts()
            t_train = self.now()
            made = self.learner.train_steps(steps_per_round, on_tick=self.tick)
            version = self.learner.core.publish()
            self.rounds.append({"round": r, "quota": quota, "robot_steps": collected["robot_steps"] - before["robot_steps"],
                                "intervention_steps": collected["intervention_steps"] - before["intervention_steps"],
                                "episodes": collected["episodes"] - before["episodes"], "operator": self.fleet.operator,
                                "train_steps": made, "collect_s": t_train - t_start, "train_s": self.now() - t_train,
                                "version": version})
            event(log, "round_done", job=self.learner.cfg.job_id, version=version, **{k: v for k, v in self.rounds[-1].items()
                                                                                     if k not in ("version",)})
        at_stop = self.learner.counts()
        return {"stop_t": self.now(), "at_stop": at_stop, "final_version": self.learner.freeze()}

    # -- the whole run -----------------------------------------------------------------------
    def execute(self) -> dict[str, Any]:
        spec = self.spec
        if spec.method == "pretrained":
            return self._record_pretrained()
        import torch

        from services.harness.evaluation import EvalPool, PeriodicEvaluator
        from services.harness.experiment_fleet import Fleet, LocalLearner, write_policy_file

        torch.set_num_threads(1)
        state_dir = self.run_dir / "learner"
        write_policy_file(state_dir, spec.policy_factory, spec.policy_kwargs, spec.tasks)
        token = secrets.token_urlsafe(18)
        cfg = _learner_config(spec, state_dir, token, spec.method)
        self.learner = LocalLearner(cfg, train=False)  # SOP: training starts once the fleet is up
        self.fleet = Fleet(self.run_dir, self.learner.target, cfg.job_id, token, spec.tasks, spec.robots, spec.hz, spec.seed,
                           safety_minutes=self.deadline_s / 60 + 5)
        eval_kwargs = {"policy_factory": spec.policy_factory, "policy_kwargs": spec.policy_kwargs, "hz": spec.hz,
                       "max_steps": spec.max_episode_steps, "guidance_beta": spec.eval_guidance_beta}
        pool = EvalPool(spec.eval_workers, nice=10)
        self.evaluator = PeriodicEvaluator(pool, self.eval_snapshot, self.run_dir / "eval-snapshots", spec.tasks,
                                           spec.curve_trials, spec.eval_interval_s, eval_kwargs,
                                           deferred=spec.eval_mode == "deferred", target=M.TARGET,
                                           coarse_stride=spec.eval_coarse_stride)
        if spec.pretrained_eval and self.learner.core.version == 0:  # version 0 is the start policy: evaluated already
            self.evaluator.known(0, spec.pretrained_eval)
        final_learner: dict[str, Any] = {}
        try:
            stop = self.sop() if spec.method == "sop" else self.offline_rounds()
            self.fleet.stop()
            self.evaluator.finish(lambda done, total: self.progress(1.0, f"evaluating snapshot {done}/{total}"))
            self.progress(1.0, "final evaluation", force=True)
            final_path = state_dir / "weights" / f"v{stop['final_version']}.safetensors"
            final = pool.evaluate(final_path, spec.tasks, spec.eval_trials, **eval_kwargs)
        finally:
            self.fleet.stop(grace_s=30.0)
            final_learner = self.learner.stop()
            pool.close()
        return self._record(stop, final, final_learner)

    def _record_pretrained(self) -> dict[str, Any]:
        pre = self.spec.pretrained_eval or {}
        mean = M.mean_over_tasks({t: r["success_rate"] for t, r in pre.items()})
        series = [{"t": 0.0, "robot_steps": 0, "intervention_steps": 0, "version": 0, "mean": mean,
                   "tasks": {t: r["success_rate"] for t, r in pre.items()}, "trials": self.spec.eval_trials, "final": True}]
        usage = {"robot_steps": 0, "robot_seconds": 0.0, "intervention_steps": 0, "intervention_share": 0.0, "episodes": 0,
                 "wall_seconds": 0.0, "learner_steps": 0, "policy_version": 0}
        return self._assemble(pre, series, usage, fleet={t: M.fleet_rates([], [t], self.spec.hz)[t] for t in pre},
                              invariants={"evaluation_isolated": True, "note": "no learner, no robots"}, extra={})

    def _record(self, stop: dict[str, Any], final: dict[str, dict], learner_end: dict[str, Any]) -> dict[str, Any]:
        spec, c = self.spec, stop["at_stop"]
        status, audit = learner_end.get("status", {}), learner_end.get("audit", {})
        series = [dict(p) for p in self.evaluator.series]
        pre = spec.pretrained_eval or {}
        head = {"t": 0.0, "robot_steps": 0, "intervention_steps": 0, "version": 0, "trials": spec.eval_trials, "pretrained": True,
                "mean": M.mean_over_tasks({t: r["success_rate"] for t, r in pre.items()}),
                "tasks": {t: r["success_rate"] for t, r in pre.items()}}
        tail = {"t": stop["stop_t"], "robot_steps": c["robot_steps"], "intervention_steps": c["intervention_steps"],
                "version": stop["final_version"], "learner_step": c["learner_step"], "trials": spec.eval_trials, "final": True,
                "mean": M.mean_over_tasks({t: r["success_rate"] for t, r in final.items()}),
                "tasks": {t: r["success_rate"] for t, r in final.items()}}
        series = ([head] if pre else []) + [p for p in series if p["t"] <= stop["stop_t"]] + [tail]
        episodes = [vars(e) if not isinstance(e, dict) else e for e in self.learner.core.episodes_since(0)[1]]
        received = int(status.get("ingested_steps", c["robot_steps"]))
        sent = self.fleet.sent()
        effort = M.human_effort(c["robot_steps"], c["intervention_steps"])
        wall = stop["stop_t"]
        usage = {"robot_steps": c["robot_steps"], "robot_seconds": M.robot_seconds(c["robot_steps"], spec.hz),
                 **{k: effort[k] for k in ("intervention_steps", "intervention_share")}, "episodes": c["episodes"],
                 "wall_seconds": wall, "learner_steps": c["learner_step"], "policy_version": stop["final_version"],
                 "robot_steps_received_total": received, "pace_ratio": (c["robot_steps"] / (spec.robots * spec.hz * wall))
                 if wall > 0 and spec.method == "sop" else None,
                 "intervention_budget_spent_at_s": self.cap_hit_at, "first_data_s": self.first_data_t,
                 "fleet_startup_s": self.startup_s,
                 "evaluation_episodes": self.evaluator.episodes + spec.eval_trials * len(spec.tasks),
                 "snapshots_not_evaluated": self.evaluator.skipped}
        poll_steps = int(spec.robots * spec.hz * spec.poll_s) + spec.robots * 50
        invariants = {
            "evaluation_isolated": sent["lives_without_count"] == 0 and sent["steps"] == received,
            "learner_received_steps": received, "robots_sent_steps": sent["steps"],
            "robot_lives_without_count": sent["lives_without_count"],
            "evaluation_episodes": usage["evaluation_episodes"],
            "actors_seen_by_learner": sorted(status.get("actors", {}).keys()),
            "duplicates_stored": audit.get("duplicates_stored"),
            "robot_exit_codes": self.fleet.exit_codes,
            "budget": M.budget_check(c["robot_steps"], self.budget, spec.robots, spec.max_episode_steps, poll_steps),
            "intervention_budget": M.intervention_check(c["intervention_steps"], self.cap, spec.robots,
                                                        spec.max_episode_steps, poll_steps),
            "learner_trained": c["learner_step"] > 0,
        }
        extra = {"rounds": self.rounds} if self.rounds else {}
        return self._assemble(final, series, usage, M.fleet_rates(episodes, spec.tasks, spec.hz), invariants, extra)

    def _assemble(self, final: dict[str, dict], series: list[dict], usage: dict[str, Any], fleet: dict[str, Any],
                  invariants: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
        spec = self.spec
        pre = spec.pretrained_eval or {}
        pre_mean = M.mean_over_tasks({t: r["success_rate"] for t, r in pre.items()}) if pre else None
        fin_mean = M.mean_over_tasks({t: r["success_rate"] for t, r in final.items()})
        ttt = M.time_to_target(series)
        robot_axis = [{"rs": M.robot_seconds(int(p.get("robot_steps", 0)), spec.hz), "mean": p["mean"]} for p in series]
        record = {
            "format": FORMAT, "experiment": spec.experiment, "config": spec.config, "label": spec.label, "seed": spec.seed,
            "status": "ok", "error": None, "spec": spec.model_dump(mode="json"),
            "budget": {"kind": spec.budget_kind, "robot_steps": self.budget, "wall_seconds": self.wall_budget,
                       "intervention_steps": self.cap, "intervention_share": spec.intervention_budget},
            "usage": usage, "pretrained": pre, "pretrained_mean": pre_mean, "final": final, "final_mean": fin_mean,
            "gain": fin_mean - pre_mean if pre_mean is not None else None,
            "final_episodes_per_hour": M.mean_over_tasks({t: r["episodes_per_hour"] for t, r in final.items()}),
            "final_mean_episode_length": M.mean_over_tasks({t: r["mean_length"] for t, r in final.items()}),
            "target": M.TARGET, "time_to_target_s": ttt,
            "robot_seconds_to_target": M.time_to_target(robot_axis, key="rs") if spec.method != "pretrained" else ttt,
            "series": series, "fleet": fleet, "invariants": invariants, "machine": machine(), **extra}
        problems = self._problems(record)
        if problems:
            record["status"], record["error"] = "failed", "; ".join(problems)
        return record

    def _problems(self, r: dict[str, Any]) -> list[str]:
        if self.spec.method == "pretrained":
            return []
        inv, out = r["invariants"], []
        if not inv["learner_trained"]:
            out.append("the learner made 0 training steps (see learner log: train_step_failed)")
        if inv["duplicates_stored"]:
            out.append(f"{inv['duplicates_stored']} steps stored twice")
        if not inv["evaluation_isolated"]:
            out.append(f"learner received {inv['learner_received_steps']} steps, robots sent {inv['robots_sent_steps']} "
                       f"({inv['robot_lives_without_count']} robot lives without a count)")
        return out


def run_spec(spec: RunSpec, progress_path: Path | None = None) -> dict[str, Any]:
    """Execute one run and write ``RUN_DIR/run.json`` (also on failure, with ``status: failed``)."""
    run_dir = Path(spec.run_dir)
    if (run_dir / "learner").exists() or (run_dir / "spool").exists():
        raise FileExistsError(f"{run_dir} holds an earlier run's learner state or spool: a run needs a fresh folder")
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    try:
        if spec.experiment == "releases":
            from services.harness.experiment_releases import ReleaseRun
            record = ReleaseRun(spec, _Progress(progress_path)).execute()
        else:
            record = Run(spec, _Progress(progress_path)).execute()
    except Exception as exc:  # the experiment goes on; the run says why it failed
        record = {"format": FORMAT, "experiment": spec.experiment, "config": spec.config, "label": spec.label,
                  "seed": spec.seed, "status": "failed", "error": f"{exc!r}"[:2000], "traceback": traceback.format_exc()[-4000:],
                  "spec": spec.model_dump(mode="json"), "machine": machine()}
    record["run_wall_seconds"] = time.time() - t0
    tmp = run_dir / "run.json.tmp"
    tmp.write_text(json.dumps(record, indent=1, default=str))
    tmp.replace(run_dir / "run.json")
    event(log, "run_done", run=spec.run_id, status=record["status"], seconds=round(record["run_wall_seconds"], 1),
          final=record.get("final_mean"), error=record.get("error"))
    return record


def main(argv: list[str] | None = None) -> int:
    """``python -m services.harness.experiment_run SPEC.json [PROGRESS.json]``: exit 0 when the run is ok."""
    import signal

    def _terminate(*_: object) -> None:  # the driver was interrupted: unwind, so our robots and learner are stopped
        raise SystemExit(143)

    signal.signal(signal.SIGTERM, _terminate)
    args = sys.argv[1:] if argv is None else argv
    spec = RunSpec.model_validate_json(Path(args[0]).read_text())
    record = run_spec(spec, Path(args[1]) if len(args) > 1 else None)
    return 0 if record["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
