"""Camera observations of the simulated robots: what rendering and JPEG cost per step, beside a
state-only env step measured in the same run.

``fleetloop bench render --out F.json [--tasks drawer-open-v3] [--cameras corner3,gripperPOV]
[--image-size 84,128] [--steps 150] [--jpeg-quality 90]``

Everything runs in this process, as on a robot, on the scripted expert's trajectories (seeds 0, 1,
...; the expert's own action and the resets between episodes are outside every timed call):

- **baseline**: ``MetaWorldEnv(observations="state").step`` (no GL), measured before and after the
  pixel runs and merged, so a shared machine's load changes hit both sides alike;
- **one camera per frame**: after each state step, one :class:`actor.envs.render.CameraRenderer`
  frame of one camera (the renderer the pixel env uses: no shadows, reflections, skybox or MSAA),
  per camera and size;
- **the pixel robot's step**: ``MetaWorldEnv(observations="pixels", cameras=...).step`` (physics +
  every camera) plus one JPEG per camera (:func:`fleetloop.image_codec.encode_frames`, what the
  robot's recorder sends), per size: CPU per step, wall per step, steps/s of one robot;
- **JPEG**: bytes per frame (mean) beside the raw uint8 frame, and the encoder's time per frame.

Wall times are medians of the per-call times (robust to a stall on a shared machine); CPU times are
this process's CPU (all threads: llvmpipe's render threads included, ``LP_NUM_THREADS`` caps them)
per call, means. The GL that drew the images (``glGetString``: llvmpipe is software rendering on the
CPU) is in ``config.gl``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any, Callable

from bench.common import cpu_seconds, log_progress, machine_info, ratio

WARMUP_STEPS = 5  # untimed calls first: the first frames build GL state (measured 36 ms vs 8 ms)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of ``fleetloop bench render``."""
    p.add_argument("--out", required=True, help="JSON result file")
    p.add_argument("--tasks", default="drawer-open-v3", help="comma-separated Meta-World v3 tasks")
    p.add_argument("--cameras", default="corner3,gripperPOV", help="comma-separated cameras of the pixel robot "
                   "(each is also timed alone)")
    p.add_argument("--image-size", default="84,128", help="comma-separated square image sizes, pixels (16..256)")
    p.add_argument("--steps", type=int, default=150, help="timed steps (or frames) per measurement")
    p.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality 1..95 (the robot's default is 90)")


def _csv(value: str) -> list[str]:
    return [x.strip() for x in str(value).split(",") if x.strip()]


def parse(args: argparse.Namespace) -> dict[str, Any]:
    """The checked options; ValueError naming the flag and value for a bad one (exit code 2)."""
    from fleetloop.errors import InvalidArgument
    from fleetloop.presets import MAX_IMAGE_SIZE, MIN_IMAGE_SIZE, check_cameras

    tasks = _csv(args.tasks)
    if not tasks:
        raise ValueError(f"--tasks {args.tasks!r}: name at least one Meta-World task")
    from actor.envs import available_tasks

    unknown = [t for t in tasks if t not in available_tasks("MT50")]
    if unknown:
        raise ValueError(f"--tasks {args.tasks!r}: unknown Meta-World v3 task(s) {unknown}")
    try:
        cameras = check_cameras(_csv(args.cameras))
    except InvalidArgument as exc:
        raise ValueError(f"--cameras {args.cameras!r}: {exc}") from None
    try:
        sizes = sorted({int(x) for x in _csv(args.image_size)})
    except ValueError:
        raise ValueError(f"--image-size {args.image_size!r} must be comma-separated integers") from None
    if not sizes or any(not MIN_IMAGE_SIZE <= s <= MAX_IMAGE_SIZE for s in sizes):
        raise ValueError(f"--image-size {args.image_size!r}: each size must be in {MIN_IMAGE_SIZE}..{MAX_IMAGE_SIZE}")
    if not 1 <= args.steps <= 100_000:
        raise ValueError(f"--steps {args.steps} must be in 1..100000")
    if not 1 <= args.jpeg_quality <= 95:
        raise ValueError(f"--jpeg-quality {args.jpeg_quality} must be in 1..95")
    return {"tasks": tasks, "cameras": cameras, "sizes": sizes, "steps": int(args.steps),
            "jpeg_quality": int(args.jpeg_quality)}


def main(args: argparse.Namespace) -> int:
    """``fleetloop bench render``: run, write ``args.out``, print the table; 2 on a bad argument."""
    from bench.runner import run_reported

    def plan(a: argparse.Namespace) -> Callable[[], dict[str, Any]]:
        opts = parse(a)

        def run() -> dict[str, Any]:
            t0 = time.monotonic()
            result = run_render(**opts)
            result["wall_s"] = round(time.monotonic() - t0, 1)
            result["command"] = (" ".join(["fleetloop", *sys.argv[1:]]) if sys.argv[1:2] == ["bench"]
                                 else f"fleetloop bench render --out {a.out}")
            return result
        return run

    return run_reported("render", args, plan, table=print_render_table)


# -- measuring -------------------------------------------------------------------------------------
class Timings:
    """Per-call wall and CPU seconds of one measurement."""

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def summary(self) -> dict[str, float | int | None]:
        """Median wall ms, mean CPU ms, calls per wall second (from the total), count."""
        if not self.wall:
            return {"wall_ms_median": None, "cpu_ms_mean": None, "per_s": None, "n": 0}
        return {"wall_ms_median": round(statistics.median(self.wall) * 1e3, 3),
                "cpu_ms_mean": round(statistics.fmean(self.cpu) * 1e3, 3),
                "per_s": round(len(self.wall) / sum(self.wall), 1), "n": len(self.wall)}

    def merge(self, other: "Timings") -> "Timings":
        merged = Timings()
        merged.wall, merged.cpu = self.wall + other.wall, self.cpu + other.cpu
        return merged


def drive(env: Any, steps: int, timed: Callable[[Any], Any]) -> Timings:
    """Run the scripted expert on ``env`` for ``WARMUP_STEPS + steps`` steps (resetting to the next
    seed after each episode, untimed); ``timed(action)`` is called once per step and timed."""
    t = Timings()
    seed = 0
    obs = env.reset(seed=seed)
    for i in range(WARMUP_STEPS + steps):
        action = env.expert_action(obs)
        w0, c0 = time.perf_counter(), cpu_seconds()
        result = timed(action)
        w1, c1 = time.perf_counter(), cpu_seconds()
        if i >= WARMUP_STEPS:
            t.wall.append(w1 - w0)
            t.cpu.append(c1 - c0)
        obs = result.obs
        if result.done:
            seed += 1
            obs = env.reset(seed=seed)
    return t


def run_render(tasks: list[str], cameras: list[str], sizes: list[int], steps: int, jpeg_quality: int) -> dict[str, Any]:
    """Every measurement of the module docstring, per task; returns the result document."""
    import numpy as np

    from actor.envs import MetaWorldEnv
    from actor.envs.render import CameraRenderer
    from fleetloop.image_codec import encode_frames

    per_task: dict[str, Any] = {}
    gl: dict[str, Any] = {}
    for task in tasks:
        log_progress(f"render: {task}: baseline (state-only step)")
        state = MetaWorldEnv(task, seed=0, observations="state")
        try:
            before = drive(state, steps, state.step)
            model, data = state.physics
            one: dict[str, Any] = {}
            for size in sizes:
                for cam in cameras:
                    log_progress(f"render: {task}: {cam} alone at {size} px")
                    renderer = CameraRenderer(model, (cam,), size)
                    try:
                        gl = gl or renderer.gl_info()
                        frame = Timings()

                        def step_then_render(action: Any, r: CameraRenderer = renderer, f: Timings = frame) -> Any:
                            result = state.step(action)
                            w0, c0 = time.perf_counter(), cpu_seconds()
                            r.render(data)
                            f.wall.append(time.perf_counter() - w0)
                            f.cpu.append(cpu_seconds() - c0)
                            return result

                        drive(state, steps, step_then_render)
                        frame.wall, frame.cpu = frame.wall[WARMUP_STEPS:], frame.cpu[WARMUP_STEPS:]
                        one[f"{cam}@{size}"] = frame.summary()
                    finally:
                        renderer.close()
            full: dict[str, Any] = {}
            for size in sizes:
                log_progress(f"render: {task}: pixel robot step, {'+'.join(cameras)} at {size} px + JPEG q{jpeg_quality}")
                pix = MetaWorldEnv(task, seed=0, observations="pixels", cameras=cameras, image_size=size)
                sizes_b: dict[str, list[int]] = {cam: [] for cam in cameras}
                enc = Timings()
                try:
                    def step_and_encode(action: Any) -> Any:
                        result = pix.step(action)
                        for cam in cameras:
                            w0, c0 = time.perf_counter(), cpu_seconds()
                            jpeg = encode_frames(result.obs[cam], "jpeg", quality=jpeg_quality)[0]
                            enc.wall.append(time.perf_counter() - w0)
                            enc.cpu.append(cpu_seconds() - c0)
                            sizes_b[cam].append(len(jpeg))
                        return result

                    t = drive(pix, steps, step_and_encode)  # the encoding is inside each timed step
                    skip = WARMUP_STEPS * len(cameras)
                    enc.wall, enc.cpu = enc.wall[skip:], enc.cpu[skip:]
                finally:
                    pix.close()
                full[str(size)] = {"step": t.summary(), "jpeg_encode": enc.summary(),
                                   "jpeg_bytes_mean": {c: round(float(np.mean(v)), 1) for c, v in sizes_b.items()},
                                   "raw_bytes": size * size * 3}
            after = drive(state, steps, state.step)
        finally:
            state.close()
        per_task[task] = {"baseline_state_step": before.merge(after).summary(), "camera_alone": one,
                          "pixel_step": full, "baseline_drift": {"before": before.summary(), "after": after.summary()}}
    rows = _rows(per_task, cameras, jpeg_quality)
    config = {"tasks": tasks, "cameras": cameras, "image_sizes": sizes, "steps": steps, "warmup_steps": WARMUP_STEPS,
              "jpeg_quality": jpeg_quality, "gl": gl, "lp_num_threads": _env("LP_NUM_THREADS"),
              "renderer": "actor.envs.render.CameraRenderer (no shadows/reflections/skybox, offsamples 0)",
              "timing": "wall: median per call; CPU: process CPU (all threads) per call, mean; expert action and "
                        "resets not timed"}
    notes = ["baseline column: the state-only env step (same task, same run, before + after the pixel runs) for "
             "time rows; the raw uint8 frame (S*S*3 bytes) for the JPEG size row",
             f"GL: {gl.get('renderer')} ({gl.get('version')}), MUJOCO_GL={gl.get('backend')}, "
             f"LP_NUM_THREADS={config['lp_num_threads']}"]
    return {"bench": "render", "machine": machine_info(), "config": config, "rows": rows, "tasks": per_task,
            "notes": notes}


def _env(name: str) -> str | None:
    import os

    return os.environ.get(name)


def _row(task: str, metric: str, unit: str, what: str, pixels: float | None, baseline: float | None,
         better: str) -> dict[str, Any]:
    return {"task": task, "metric": metric, "unit": unit, "what": what, "pixels": pixels, "baseline": baseline,
            "ratio": None if pixels is None or baseline is None else ratio(pixels, baseline), "better": better}


def _rows(per_task: dict[str, Any], cameras: list[str], quality: int) -> list[dict[str, Any]]:
    rows = []
    for task, r in per_task.items():
        base = r["baseline_state_step"]
        rows.append(_row(task, "state-only env step (baseline), wall", "ms", "no camera", base["wall_ms_median"],
                         base["wall_ms_median"], "lower"))
        rows.append(_row(task, "state-only env step (baseline), CPU", "CPU-ms", "no camera", base["cpu_ms_mean"],
                         base["cpu_ms_mean"], "lower"))
        for key, s in r["camera_alone"].items():
            cam, size = key.split("@")
            rows.append(_row(task, "render 1 camera, wall per frame", "ms", f"{cam} {size}px", s["wall_ms_median"],
                             base["wall_ms_median"], "lower"))
            rows.append(_row(task, "render 1 camera, CPU per frame", "CPU-ms", f"{cam} {size}px", s["cpu_ms_mean"],
                             base["cpu_ms_mean"], "lower"))
        for size, s in r["pixel_step"].items():
            what = f"{'+'.join(cameras)} {size}px"
            rows.append(_row(task, f"step + {len(cameras)} cameras + JPEG q{quality}, CPU per step", "CPU-ms", what,
                             s["step"]["cpu_ms_mean"],
                             base["cpu_ms_mean"], "lower"))
            rows.append(_row(task, f"step + {len(cameras)} cameras + JPEG q{quality}, wall per step", "ms", what,
                             s["step"]["wall_ms_median"],
                             base["wall_ms_median"], "lower"))
            rows.append(_row(task, "env steps/s, one robot (step + cameras + JPEG)", "steps/s", what,
                             s["step"]["per_s"], base["per_s"], "higher"))
            rows.append(_row(task, f"JPEG q{quality} encode, per frame", "ms", f"{size}px",
                             s["jpeg_encode"]["wall_ms_median"], base["wall_ms_median"], "lower"))
            for cam, b in s["jpeg_bytes_mean"].items():
                rows.append(_row(task, f"JPEG q{quality} bytes per frame (mean)", "B", f"{cam} {size}px", b,
                                 s["raw_bytes"], "lower"))
    return rows


def print_render_table(result: dict[str, Any]) -> None:
    """The rows as a rich table on stdout, then the notes."""
    from rich.console import Console
    from rich.table import Table

    m, c = result["machine"], result["config"]
    t = Table(title=f"fleetloop bench render: camera observations vs a state-only step (same run), "
                    f"{c['steps']} steps per figure",
              caption=f"{m['cpus_usable']} CPUs, load {m.get('loadavg_1m_at_start')}, {m['platform']}; "
                      f"GL {c['gl'].get('renderer')}; ratio = pixels / baseline")
    for col, just in (("task", "left"), ("metric", "left"), ("unit", "left"), ("what", "left"), ("pixels", "right"),
                      ("baseline", "right"), ("ratio", "right"), ("better", "left")):
        t.add_column(col, justify=just)
    for r in result["rows"]:
        t.add_row(r["task"], r["metric"], r["unit"], r["what"], _fmt(r["pixels"]), _fmt(r["baseline"]),
                  "-" if r["ratio"] is None else f"{r['ratio']:.2f}", r["better"])
    console = Console(width=max(140, Console().width))
    console.print(t)
    for note in result.get("notes", []):
        console.print(f"  - {note}", highlight=False)


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.1f}" if abs(v) >= 10 else f"{v:.3g}"
