"""Simulated Meta-World robots as separate ``fleetloop actor`` processes.

Used by ``fleetloop demo`` and by the local launcher's simulated fleets. Each robot is its own
process (its own spool folder, token from the environment, never on the command line) started at
nice 10: on one machine the simulated fleet yields the CPU to the learner, as a real fleet never
competes with the cloud learner for cores. Robots are stopped by pid: SIGTERM lets a robot finish
its episode and flush its spool; SIGKILL follows after a grace period.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path


def rotated(tasks: list[str], i: int) -> list[str]:
    """Robot ``i`` starts its task cycle at task ``i mod len(tasks)`` (so a small fleet covers every task)."""
    k = i % len(tasks)
    return tasks[k:] + tasks[:k]


@dataclass
class SimRobot:
    """One robot process."""

    actor_id: str
    proc: subprocess.Popen
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def terminate(self) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        if self.alive():
            self.proc.kill()
            self.proc.wait(5)


def view_args(view: dict | None, jpeg_quality: int = 90) -> list[str]:
    """``fleetloop actor`` flags for a robot's observation options (``observations``, ``cameras``,
    ``image_size``; none for state); camera frames as JPEG at ``jpeg_quality``."""
    if not view or view.get("observations") != "pixels":
        return []
    args = ["--observations", "pixels", "--jpeg-quality", str(jpeg_quality)]
    args += ["--cameras", ",".join(view["cameras"])] if view.get("cameras") else []
    return args + (["--image-size", str(view["image_size"])] if view.get("image_size") else [])


def spawn_robot(*, target: str, job: str, actor_id: str, tasks: list[str], token: str | None, spool: Path, log_path: Path,
                seed: int, hz: float = 0.0, minutes: float | None = None, operator: str = "scripted",
                extra_env: dict[str, str] | None = None, view: dict | None = None, jpeg_quality: int = 90) -> SimRobot:
    """Start one ``fleetloop actor`` process for the built-in Meta-World robot. ``view``: its
    observation options (``observations="pixels"``, ``cameras``, ``image_size``; None = state);
    camera frames go on the wire as JPEG at ``jpeg_quality``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    # one BLAS and one llvmpipe (offscreen rendering) thread per robot: N robots must not oversubscribe the cores
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "LP_NUM_THREADS": "1", **(extra_env or {})}
    if token:
        env["FLEETLOOP_ROBOT_TOKEN"] = token
    cmd = [sys.executable, "-m", "services.cli", "actor", "--learner", target, "--job", job, "--actor-id", actor_id,
           "--tasks", ",".join(tasks), "--spool", str(spool), "--seed", str(seed), "--hz", str(hz), "--operator", operator]
    if minutes:
        cmd += ["--minutes", str(minutes)]
    cmd += view_args(view, jpeg_quality)
    fh = open(log_path, "a")
    try:
        # no preexec_fn (os.nice in the forked child): Python code between fork and exec in a process whose gRPC
        # threads are running could crash the child ("epoll_wait error: Bad file descriptor", a robot that never
        # connects); the niceness is set from here right after the start instead
        proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, cwd=os.getcwd())
    finally:
        fh.close()  # the child holds its own descriptor
    try:
        os.setpriority(os.PRIO_PROCESS, proc.pid, min(19, os.getpriority(os.PRIO_PROCESS, 0) + 10))
    except (OSError, AttributeError):  # already gone, or not POSIX: it runs at our priority
        pass
    return SimRobot(actor_id, proc, log_path)


def stop_robots(robots: list[SimRobot], grace_s: float = 30.0) -> None:
    """SIGTERM every robot (finish episode, flush), wait up to ``grace_s`` in total, then SIGKILL."""
    import time

    for r in robots:
        r.terminate()
    deadline = time.monotonic() + grace_s
    for r in robots:
        r.wait(max(0.1, deadline - time.monotonic()))
        r.kill()
