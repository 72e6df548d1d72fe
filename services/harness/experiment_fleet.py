"""The moving parts of one experiment run: an in-process learner and a fleet of robot processes.

:class:`LocalLearner` is the real learner (``LearnerCore`` + its gRPC server, the same pieces the Ray
actor wraps) run inside the run's process, so the harness can pause training at the budget and
train offline rounds step by step. :class:`Fleet` starts ``fleetloop actor`` processes (Meta-World
robots, scripted HG-DAgger operator or none, paced at ``hz``) through :mod:`services.harness.sim_fleet`,
waits until they have connected, stops them by pid (SIGTERM: finish the episode, flush the spool;
SIGKILL after a grace period) and reads back how many steps each
robot says it sent (its ``actor_done`` log line), for the exactly-received check.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

from fleetloop.logs import event, get_logger
from services.harness.sim_fleet import SimRobot, rotated, spawn_robot, stop_robots

log = get_logger("experiment.fleet")
_DONE = re.compile(r"event=actor_done\b.*?\bsteps=(\d+)")
_DONE_INTER = re.compile(r"event=actor_done\b.*?\binterventions=(\d+)")


class LocalLearner:
    """A learner in this process: core + gRPC server on a free loopback port (+ optional training
    thread). ``train=False`` leaves training to the caller (:meth:`train_steps`)."""

    def __init__(self, cfg, train: bool) -> None:
        from learner.process import build_learner

        self.cfg = cfg
        self.proc = build_learner(cfg).serve(train=train)
        self.core, self.servicer, self.port = self.proc.core, self.proc.servicer, self.proc.port
        self._stopped = False
        event(log, "learner_up", job=cfg.job_id, port=self.port, train=train, version=self.core.version)

    @property
    def target(self) -> str:
        return f"{self.cfg.serving.host}:{self.port}"

    def counts(self) -> dict[str, int]:
        """Received robot steps, operator steps, finished episodes, learner step, newest version."""
        core = self.core
        with core.ingestor.lock:
            inter = sum(t.intervention_steps for t in core.ingestor.tally.values())
            steps = core.ingestor.steps_total
            episodes = core.ingestor.episodes_total
        return {"robot_steps": int(steps), "intervention_steps": int(inter), "episodes": int(episodes),
                "learner_step": int(core.step), "version": int(core.version)}

    def connected_since(self, since: float) -> set[str]:
        """Actor ids that completed a handshake at or after unix time ``since``."""
        sessions = list(self.servicer.sessions.values())
        return {s["actor_id"] for s in sessions if s.get("since", 0.0) >= since}

    def snapshot(self) -> tuple[int, bytes]:
        """(version, blob) of the newest published version."""
        latest = self.core.weights.latest
        return latest.version, self.core.weights.blob(latest.version)

    def freeze(self) -> int:
        """Stop training (no further step starts; the one in flight finishes) and publish the policy as
        it is now. Returns that version: the run's final policy."""
        return self.core.pause_and_publish()  # the step in flight (if any) ends before the weights are copied

    def train_steps(self, n: int, on_tick=None, tick_s: float = 0.5) -> int:
        """Run up to ``n`` learner steps now (offline training); returns the steps made. ``on_tick()``
        is called about every ``tick_s`` seconds (periodic evaluation keeps going)."""
        made, last = 0, time.monotonic()
        for _ in range(n):
            if self.core.train_step() is not None:
                made += 1
            if on_tick is not None and time.monotonic() - last >= tick_s:
                on_tick()
                last = time.monotonic()
        return made

    def stop(self) -> dict[str, Any]:
        """Stop serving and training, checkpoint; returns the final status and exactly-once audit."""
        if self._stopped:
            return {}
        self._stopped = True
        audit = self.core.audit()
        status = self.proc.stop()
        return {"status": status, "audit": audit}


class Fleet:
    """``robots`` simulated robots for one run (ids ``robot-<i>``; spools and logs under ``run_dir``)."""

    def __init__(self, run_dir: Path, target: str, job: str, token: str, tasks: list[str], robots: int, hz: float, seed: int,
                 safety_minutes: float) -> None:
        self.run_dir, self.target, self.job, self.tasks = Path(run_dir), target, job, tasks
        self.n, self.hz, self.seed, self.safety_minutes = robots, hz, seed, safety_minutes
        self.token = token
        self.robots: list[SimRobot] = []
        self.started_at = 0.0  # unix time of the newest launch
        self.operator = "scripted"
        self.launches = 0
        self.exit_codes: list[int | None] = []

    def start(self, operator: str = "scripted") -> None:
        """Start every robot; each launch uses fresh layout seeds (a restarted robot never replays layouts)."""
        if self.robots:
            raise RuntimeError("fleet already running")
        self.operator = operator
        base = self.seed * 1_000_003 + self.launches * 10_007
        self.launches += 1
        self.started_at = time.time()
        self.robots = [spawn_robot(target=self.target, job=self.job, actor_id=f"robot-{i}", tasks=rotated(self.tasks, i),
                                   token=self.token, spool=self.run_dir / "spool" / f"robot-{i}",
                                   log_path=self.run_dir / "logs" / f"robot-{i}.log", seed=base + i * 7919, hz=self.hz,
                                   minutes=self.safety_minutes, operator=operator) for i in range(self.n)]
        event(log, "fleet_started", job=self.job, robots=self.n, operator=operator, launch=self.launches)

    def wait_connected(self, learner: LocalLearner, timeout_s: float = 180.0) -> float:
        """Block until every robot of the newest launch has handshaken with ``learner`` (robot processes
        take seconds to import and connect; a real fleet is already up). Returns the seconds waited;
        RuntimeError when a robot died or ``timeout_s`` passed."""
        t0 = time.monotonic()
        while len(learner.connected_since(self.started_at)) < self.n:
            if any(not r.alive() for r in self.robots):
                raise RuntimeError(f"a robot exited before connecting (see {self.run_dir / 'logs'})")
            if time.monotonic() - t0 > timeout_s:
                raise RuntimeError(f"only {sorted(learner.connected_since(self.started_at))} of {self.n} robots connected "
                                   f"within {timeout_s:.0f} s")
            time.sleep(0.1)
        return time.monotonic() - t0

    def stop(self, grace_s: float = 60.0) -> None:
        """SIGTERM every robot (finish the episode, flush), SIGKILL after ``grace_s``; records exit codes."""
        if not self.robots:
            return
        stop_robots(self.robots, grace_s=grace_s)
        self.exit_codes.extend(r.proc.returncode for r in self.robots)
        self.robots = []

    def alive(self) -> int:
        return sum(r.alive() for r in self.robots)

    def sent(self) -> dict[str, int]:
        """Steps and operator steps the robots say they sent (sum of their ``actor_done`` lines), and
        how many robot lives ended without one (killed: their count is unknown)."""
        steps = inter = lines = 0
        for i in range(self.n):
            path = self.run_dir / "logs" / f"robot-{i}.log"
            if not path.exists():
                continue
            for line in path.read_text(errors="replace").splitlines():
                m = _DONE.search(line)
                if m:
                    steps += int(m.group(1))
                    lines += 1
                    mi = _DONE_INTER.search(line)
                    inter += int(mi.group(1)) if mi else 0
        return {"steps": steps, "intervention_steps": inter, "lives": self.launches * self.n,
                "lives_without_count": self.launches * self.n - lines}


def write_policy_file(state_dir: Path, policy_factory: str, policy_kwargs: dict[str, Any], tasks: list[str]) -> None:
    """Record how to rebuild the job's policy beside its learner state (read by ``fleetloop eval --state-dir``)."""
    from services.harness.evaluation import POLICY_FILE
    state_dir.mkdir(parents=True, exist_ok=True)
    (state_dir / POLICY_FILE).write_text(json.dumps({"policy_factory": policy_factory, "policy_kwargs": policy_kwargs,
                                                     "tasks": tasks}))
