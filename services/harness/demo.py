"""``fleetloop demo``: the main job on one machine.

1. record scripted demonstrations (unless a dataset is given or already there);
2. behaviour-clone the initial policy (``pretrain``) and evaluate it (held-out seeds, no operator);
3. start Ray locally and the learner (HG-DAgger, SOP adaptive sampler) seeded with that policy
   and the demos;
4. start N simulated robots as separate ``fleetloop actor`` processes (scripted HG-DAgger operator)
   for ``minutes``, with a live view of per-task success, interventions, version, staleness, ingest;
5. stop the fleet (every spool flushed), audit exactly-once storage, stop the learner
   (checkpoint), evaluate the final policy, write ``report.json`` and ``report.png``.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from fleetloop.logs import event, get_logger
from fleetloop.presets import DEFAULT_CAMERAS, DEFAULT_IMAGE_SIZE, metaworld_specs
from services.harness.live_view import LiveView, staleness_text
from services.harness.sim_fleet import SimRobot, rotated, spawn_robot, stop_robots

log = get_logger("demo")
VISUOMOTOR_FACTORY = "fleetloop.vision:visuomotor_policy"
#: ``--observations pixels`` defaults (any option given explicitly wins): tasks a pixel policy can learn
#: on this machine's budget, a small batch and a capped update rate so 2 cores render and train.
PIXEL_PRESET: dict[str, object] = {
    "tasks": ["push-v3", "drawer-open-v3", "window-open-v3"], "minutes": 10.0, "demos_per_task": 2,
    "pretrain_steps": 400, "eval_trials": 20, "publish_every": 25, "max_updates_per_s": 4.0, "batch_size": 64,
    "memory_budget_mb": 3072, "curve_every_s": 60.0,
}


class DemoOptions(BaseModel):
    """Options of ``fleetloop demo`` (see ``fleetloop demo --help``)."""

    model_config = ConfigDict(extra="forbid")
    robots: int = Field(4, ge=1, le=64, description="Simulated robots (one process each).")
    tasks: list[str] = Field(min_length=1, description="Meta-World v3 task ids; one multi-task policy learns them all.")
    minutes: float = Field(9.0, gt=0, le=24 * 60, description="Length of the online phase.")
    out: Path = Field(Path("runs/demo"), description="Output folder.")
    seed: int = Field(0, description="Seed for demos, pretraining and robot layouts.")
    demos: str | None = Field(None, description="Existing demo dataset; default OUT/demos (recorded if missing).")
    demos_per_task: int = Field(2, ge=1, description="Scripted demonstrations per task.")
    pretrain_steps: int = Field(3000, ge=0, description="Behaviour-cloning steps of the initial policy.")
    eval_trials: int = Field(50, ge=1, description="Evaluation trials per task, before and after.")
    hz: float = Field(0.0, ge=0, description="Robot pacing; 0 = as fast as the CPU allows.")
    live: bool = Field(True, description="Live terminal view (else one log line per update).")
    publish_every: int = Field(50, ge=1, description="Learner steps between published versions.")
    max_updates_per_s: float = Field(100.0, gt=0, description="Learner step rate cap (leaves CPU to the simulated fleet).")
    observations: Literal["state", "pixels"] = Field(
        "state", description="What robots and policy see: state (Meta-World's 39 values, MLP policy) or pixels "
        "(cameras + proprioception, no object or goal coordinates; visuomotor policy).")
    cameras: list[str] = Field(default_factory=lambda: list(DEFAULT_CAMERAS), description="pixels: camera names.")
    image_size: int = Field(DEFAULT_IMAGE_SIZE, ge=16, le=256, description="pixels: square image side (pixels).")
    jpeg_quality: int = Field(90, ge=1, le=95, description="pixels: JPEG quality of camera frames on the wire.")
    batch_size: int = Field(256, ge=1, le=65536, description="Learner (and pretraining) batch size.")
    memory_budget_mb: int | None = Field(None, ge=64, description="Learner memory budget (replay sized from it).")
    curve_every_s: float | None = Field(
        None, gt=0, description="Snapshot the fleet's policy this often during the run and evaluate the snapshots "
        "afterwards (held-out seeds, curve_trials each; evaluations never compete with the fleet for CPU): a success "
        "curve and the time to target_success in the report. None = final evaluation only.")
    curve_trials: int = Field(10, ge=1, description="Held-out trials per task of each curve point.")
    target_success: float = Field(0.8, gt=0, le=1, description="Mean success whose first curve point is time-to-target.")
    algorithm: Literal["hg_dagger", "recap"] = Field(
        "hg_dagger", description="Learner algorithm. recap: the BC policy is lifted into the indicator-conditioned policy "
        "(recap_mlp_policy), the learner pretrains V and the policy on the demos at start-up, robots act with guidance "
        "beta 1; 'pretrained' in the report stays the BC policy.")


def demo_options(observations: str = "state", **given: object) -> DemoOptions:
    """DemoOptions for an observation mode: ``given`` options over the mode's defaults
    (:data:`PIXEL_PRESET` for pixels, the model's defaults for state)."""
    base = dict(PIXEL_PRESET) if observations == "pixels" else {}
    return DemoOptions(observations=observations, **{**base, **{k: v for k, v in given.items() if v is not None}})


def _view(o: DemoOptions) -> dict | None:
    """The robots' observation options (None: state)."""
    if o.observations == "state":
        return None
    return {"observations": "pixels", "cameras": list(o.cameras), "image_size": o.image_size}


def _policy(o: DemoOptions) -> dict:
    if o.observations == "pixels":
        return {"policy_factory": VISUOMOTOR_FACTORY, "policy_kwargs": {"conditioned": o.algorithm == "recap"}}
    return {"policy_factory": "fleetloop.policies:recap_mlp_policy"} if o.algorithm == "recap" else {}


def _prepare_offline(o: DemoOptions) -> tuple[Path, Path]:
    from services.harness.bootstrap import bootstrap_offline

    steps = iter(["[1/5]", "[2/5]"])
    pixels = _policy(o) if o.observations == "pixels" else {}
    return bootstrap_offline(o.tasks, Path(o.demos) if o.demos else o.out / "demos", o.out / "pretrained.safetensors",
                             o.demos_per_task, o.pretrain_steps, seed=o.seed,
                             progress=lambda m: print(f"{next(steps, '     ')} {m}", flush=True),
                             view=_view(o), batch_size=o.batch_size, **pixels)


def _spawn_robots(o: DemoOptions, target: str, job: str, token: str) -> list[SimRobot]:
    return [spawn_robot(target=target, job=job, actor_id=f"robot-{i}", tasks=rotated(o.tasks, i), token=token,
                        spool=o.out / "spool" / f"robot-{i}", log_path=o.out / "logs" / f"robot-{i}.log",
                        seed=o.seed * 1000 + i * 7919, hz=o.hz, minutes=o.minutes, view=_view(o),
                        jpeg_quality=o.jpeg_quality) for i in range(o.robots)]


def run_demo(o: DemoOptions) -> dict:
    """Run the whole demo; returns the report dict (also written to OUT/report.json)."""
    import torch

    from learner.config import LearnerConfig
    from learner.ray_learner import start_learner
    from services.harness.evaluation import EvalPool, PeriodicEvaluator, evaluate_file
    from services.harness.report import write_report

    torch.set_num_threads(1)
    o.out.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    demos, pretrained = _prepare_offline(o)
    print(f"[3/5] evaluating the pretrained policy ({o.eval_trials} held-out trials per task, no operator)", flush=True)
    policy, view = _policy(o), _view(o)
    pre_eval = evaluate_file(pretrained, o.tasks, o.eval_trials, view=view,
                             **({} if o.algorithm == "recap" and view is None else policy))
    print("      pretrained success: " + ", ".join(f"{t} {pre_eval[t]['success_rate']:.2f}" for t in o.tasks), flush=True)

    state_dir = o.out / "learner"
    shutil.rmtree(state_dir, ignore_errors=True)
    shutil.rmtree(o.out / "spool", ignore_errors=True)
    token = secrets.token_urlsafe(24)
    job = "demo"
    obs_specs, act_specs = metaworld_specs(o.observations, o.cameras, o.image_size)
    cfg = LearnerConfig(job_id=job, state_dir=state_dir, tasks=o.tasks, initial_weights=pretrained, offline_dataset=demos,
                        publish_every=o.publish_every, min_publish_interval_s=1.0, max_updates_per_s=o.max_updates_per_s,
                        robot_tokens=[token], metrics_port=0, seed=o.seed, algorithm=o.algorithm, batch_size=o.batch_size,
                        memory_budget_mb=o.memory_budget_mb, observation_specs=obs_specs, action_specs=act_specs, **policy)
    print(f"[4/5] starting Ray, the learner and {o.robots} robots for {o.minutes:g} min", flush=True)
    ray_tmp = f"/tmp/fl-ray-{os.getpid()}"
    handle = start_learner(cfg, num_cpus=2, temp_dir=ray_tmp)
    event(log, "learner_up", job=job, target=handle.target, metrics_port=handle.metrics_port)
    robots = _spawn_robots(o, handle.target, job, token)
    t0 = time.time()
    episodes: list[dict] = []
    versions: list[tuple[float, int]] = []
    index = 0
    live = LiveView(o.tasks, o.minutes * 60, live=o.live)
    pool = EvalPool(min(2, len(o.tasks))) if o.curve_every_s else None
    curve = None if pool is None else PeriodicEvaluator(
        pool, lambda: _snapshot(state_dir, handle.status()["version"]), o.out / "curve-snapshots", o.tasks,
        o.curve_trials, o.curve_every_s, {"view": view, "max_steps": 200, **policy}, deferred=True,
        target=o.target_success, coarse_stride=2)
    if curve is not None:
        curve.known(0, pre_eval)  # version 0 is the pretrained policy, evaluated above
    try:
        with live:
            while any(r.alive() for r in robots):
                time.sleep(2.0)
                status = handle.status()
                index, new = handle.episodes_since(index)
                episodes.extend(new)
                if not versions or versions[-1][1] != status["version"]:
                    versions.append((time.time(), status["version"]))
                live.update(status, episodes, time.time() - t0, sum(r.alive() for r in robots))
                if curve is not None:
                    curve.poll(time.time() - t0, {"learner_step": status["step"]})
                if time.time() - t0 > o.minutes * 60 + 120:  # robots overdue: stop them
                    for r in robots:
                        r.terminate()
    finally:
        stop_robots(robots, grace_s=60.0)
        index, new = handle.episodes_since(index)
        episodes.extend(new)
        audit = handle.audit()
        final = handle.stop()
    wall = time.time() - t0
    robot_rc = [r.proc.returncode for r in robots]
    print(f"[5/5] evaluating the final policy v{final['version']} ({o.eval_trials} held-out trials per task)", flush=True)
    final_weights = state_dir / "weights" / f"v{final['version']}.safetensors"
    final_eval = evaluate_file(final_weights, o.tasks, o.eval_trials, view=view, **policy)
    series: list[dict] = []
    if curve is not None and pool is not None:
        print(f"      evaluating the policy snapshots of the run ({o.curve_trials} trials per task each)", flush=True)
        with pool:
            series = curve.finish()
    hit = next((p["t"] for p in series if p["mean"] >= o.target_success), None)
    overall = {"policy_version": final["version"], "learner_steps": final["step"], "wall_seconds": wall,
               "total_seconds": time.monotonic() - t_start, "staleness_max": final["staleness_max"],
               "staleness_max_autonomous": final.get("staleness_max_autonomous", 0),
               "staleness_bound": final["staleness_bound"], "duplicates_stored": audit["duplicates_stored"],
               "stored_steps": sum(audit["stored_steps"].values()), "ingested_steps": final["ingested_steps"],
               "robots": o.robots, "robot_exit_codes": robot_rc, "episodes": len(episodes), "device": final["device"],
               "algorithm": o.algorithm, "observations": o.observations, "seed": o.seed,
               **({"curve": series, "target_success": o.target_success, "time_to_target_s": hit} if curve else {}),
               **({"cameras": list(o.cameras), "image_size": o.image_size} if view else {})}
    report = write_report(o.out, o.tasks, pre_eval, final_eval, episodes, t0, overall, versions)
    (o.out / "episodes.jsonl").write_text("".join(json.dumps(e) + "\n" for e in episodes))
    shutil.rmtree(ray_tmp, ignore_errors=True)
    _print_summary(report, o.out)
    return report


def _snapshot(state_dir: Path, version: int) -> tuple[int, bytes]:
    """(version, weights) of a published version, read from the learner's weight store on disk."""
    return version, (state_dir / "weights" / f"v{version}.safetensors").read_bytes()


def _print_summary(report: dict, out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="fleetloop demo: evaluation on held-out seeds, no operator")
    for col in ("task", "pretrained", "final", "fleet episodes", "intervention share"):
        t.add_column(col, justify="right")
    for task, r in report["tasks"].items():
        t.add_row(task, f"{r['pretrained_success']:.2f}", f"{r['final_success']:.2f}", str(r["episodes"]),
                  f"{r['intervention_share']:.2f}")
    ov = report["overall"]
    t.add_row("mean", f"{ov['mean_pretrained_success']:.2f}", f"{ov['mean_final_success']:.2f}", str(ov["episodes"]), "")
    Console().print(t)
    print(f"policy v{ov['policy_version']}, {staleness_text(ov)}, duplicates stored {ov['duplicates_stored']}, "
          f"online {ov['wall_seconds']:.0f} s, total {ov['total_seconds']:.0f} s -> {out / 'report.json'}, {out / 'report.png'}")
