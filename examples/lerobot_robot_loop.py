"""A LeRobot-style robot loop on the fleetloop robot client (``pip install fleetloop-client``; no torch).

LeRobot robots (``lerobot.robots.Robot``: SO-101, Koch, ...) speak dicts: ``get_observation()`` gives
one float per motor (``"<motor>.pos"``, normalised to [-100, 100]) and one ``[H, W, 3]`` uint8 array
per camera; ``send_action({"<motor>.pos": goal})`` moves them; ``observation_features`` /
``action_features`` describe both. This loop:

- maps them to the job's tensors, named as in a LeRobot dataset: ``observation.state`` (the motors,
  divided by 100), ``observation.images.<camera>``, ``action`` (motor goals / 100, in [-1, 1]);
- acts with the policy built from the weights the client received and verified
  (:class:`fleetloop.client.MlpPolicy`: the job's default MLP, numpy), swapping in a new version
  only between episodes;
- lets an operator take over: ``intervene(observation, policy_action)`` returns the operator's action
  dict (a LeRobot teleoperator's ``get_action()``) or None; those steps are recorded as interventions
  (HG-DAgger trains on them);
- streams every step to the learner (spooled on disk first: nothing is lost when the link drops).

Without hardware it drives :class:`SimulatedArm` with :class:`ScriptedTeleop`::

    python examples/lerobot_robot_loop.py --learner HOST:50051 --job arm --token TOKEN --episodes 5

The learner's job declares the same tensors (``--print-specs`` prints them for its job file). With a
real robot: ``run(..., robot=make_robot_from_config(cfg), intervene=my_teleop_hook, reward_fn=...)``.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any, Callable

import numpy as np

from fleetloop.client import FleetClient, MlpPolicy, make_spec
from fleetloop.codec import WIRE_DTYPES

SCALE = 100.0  # LeRobot's normalised motor range (RANGE_M100_100)
MOTORS = ("shoulder_pan", "shoulder_lift", "elbow_flex", "wrist_flex", "wrist_roll", "gripper")


class SimulatedArm:
    """A LeRobot-style arm without hardware: each motor moves halfway to its goal per step; one camera
    whose colours follow the pose. ``task_reward`` is the task "reach a random pose"."""

    def __init__(self, seed: int = 0, camera: tuple[int, int, int] = (24, 32, 3)) -> None:
        self.rng, self.camera = np.random.default_rng(seed), camera
        self.observation_features = {**{f"{m}.pos": float for m in MOTORS}, "front": camera}
        self.action_features = {f"{m}.pos": float for m in MOTORS}
        self.is_connected = False
        self.reset()

    def connect(self) -> None:
        self.is_connected = True

    def disconnect(self) -> None:
        self.is_connected = False

    def reset(self) -> None:
        self.pos, self.target = self.rng.uniform(-50, 50, len(MOTORS)), self.rng.uniform(-50, 50, len(MOTORS))

    def get_observation(self) -> dict[str, Any]:
        img = np.zeros(self.camera, np.uint8)
        img[..., :] = np.clip(128 + self.pos[:3], 0, 255).astype(np.uint8)
        return {**{f"{m}.pos": float(p) for m, p in zip(MOTORS, self.pos)}, "front": img}

    def send_action(self, action: dict[str, Any]) -> dict[str, Any]:
        goal = np.clip([action[f"{m}.pos"] for m in MOTORS], -SCALE, SCALE)
        self.pos = self.pos + 0.5 * (goal - self.pos)
        return {f"{m}.pos": float(g) for m, g in zip(MOTORS, goal)}

    def task_reward(self, observation: dict[str, Any]) -> tuple[float, bool]:
        dist = float(np.abs(np.array([observation[f"{m}.pos"] for m in MOTORS]) - self.target).mean())
        return -dist / SCALE, dist < 3.0


class ScriptedTeleop:
    """An operator with a leader arm: takes over (sends the task's target pose) when the policy's
    goal is farther from the target than the arm is now, hands back when the arm is close."""

    def __init__(self, arm: SimulatedArm) -> None:
        self.arm = arm

    def __call__(self, observation: dict[str, Any], policy_action: dict[str, Any]) -> dict[str, Any] | None:
        now = np.array([observation[f"{m}.pos"] for m in MOTORS])
        goal = np.array([policy_action[f"{m}.pos"] for m in MOTORS])
        if np.abs(goal - self.arm.target).mean() <= max(np.abs(now - self.arm.target).mean(), 3.0):
            return None
        return {f"{m}.pos": float(t) for m, t in zip(MOTORS, self.arm.target)}


def job_specs(robot: Any) -> tuple[list, list]:
    """The job's tensors for ``robot``: observation.state, one observation.images.<cam> per camera, action."""
    motors = [k for k, v in robot.observation_features.items() if v is float]
    cams = {k: tuple(v) for k, v in robot.observation_features.items() if isinstance(v, tuple)}
    obs = [make_spec("observation.state", "float32", [len(motors)])]
    obs += [make_spec(f"observation.images.{c}", "uint8", list(shape)) for c, shape in cams.items()]
    act = [make_spec("action", "float32", [len(robot.action_features)], low=[-1.0], high=[1.0])]
    return obs, act


def job_file_specs(robot: Any) -> dict[str, list[dict[str, Any]]]:
    """:func:`job_specs` as a job file (or ``LearnerConfig``) declares them."""
    def as_dict(s: Any) -> dict[str, Any]:
        return {"name": s.name, "dtype": np.dtype(WIRE_DTYPES[int(s.dtype)]).name, "shape": [int(d) for d in s.shape],
                **({"low": list(s.low), "high": list(s.high)} if len(s.low) else {})}
    obs, act = job_specs(robot)
    return {"observation_specs": [as_dict(s) for s in obs], "action_specs": [as_dict(s) for s in act]}


def to_tensors(robot: Any, observation: dict[str, Any]) -> dict[str, np.ndarray]:
    """A LeRobot observation dict as the job's observation tensors."""
    out = {"observation.state": np.array([observation[k] for k, v in robot.observation_features.items() if v is float],
                                         np.float32) / SCALE}
    out.update({f"observation.images.{k}": np.asarray(observation[k], np.uint8)
                for k, v in robot.observation_features.items() if isinstance(v, tuple)})
    return out


def run(learner: str, job: str, token: str | None, *, robot: Any = None, intervene: Callable | None = None,
        reward_fn: Callable[[dict], tuple[float, bool]] | None = None, task: str = "reach",
        episodes: int | None = None, max_steps: int | None = None, hz: float | None = None,
        should_stop: Callable[[dict], bool] | None = None, spool_dir: str | None = None,
        actor_id: str = "lerobot-arm", connect_timeout_s: float = 60.0) -> dict[str, Any]:
    """Run episodes until ``episodes`` ran, ``should_stop(stats)`` is true or the learner stops the job;
    returns ``stats`` (episodes, steps, intervention_steps, successes, versions: one per episode)."""
    if robot is None:
        robot = SimulatedArm()
        intervene = intervene or ScriptedTeleop(robot)
    reward_fn = reward_fn or getattr(robot, "task_reward", lambda obs: (0.0, False))
    obs_specs, act_specs = job_specs(robot)
    motors = list(robot.action_features)
    client = FleetClient(learner, job, actor_id, obs_specs, act_specs, [task], credential=token, spool_dir=spool_dir,
                         connect_timeout_s=connect_timeout_s, weights_format="numpy")
    run_cfg = client.connect()
    policy = MlpPolicy.from_weights(client.current, run_cfg, obs_specs)
    stats: dict[str, Any] = {"episodes": 0, "steps": 0, "intervention_steps": 0, "successes": 0, "versions": []}
    robot.connect()
    try:
        while not client.job_stopping and (episodes is None or stats["episodes"] < episodes) \
                and not (should_stop and should_stop(stats)):
            if (new := client.swap_if_ready()) is not None:  # between episodes only
                policy = MlpPolicy.from_weights(new, run_cfg, obs_specs)
            if hasattr(robot, "reset"):
                robot.reset()
            ep, outcome = client.begin_episode(task), "timeout"
            for _ in range(max_steps or run_cfg.max_episode_steps):
                t0, raw = time.monotonic(), robot.get_observation()
                obs = to_tensors(robot, raw)
                proposal = {m: float(a) * SCALE for m, a in zip(motors, policy.act(obs, task))}
                takeover = intervene(raw, proposal) if intervene else None
                sent = robot.send_action(takeover if takeover is not None else proposal)
                action = np.clip(np.array([sent[m] for m in motors], np.float32) / SCALE, -1.0, 1.0)
                reward, success = reward_fn(robot.get_observation())
                ep.record(obs, action, reward, intervened=takeover is not None)
                stats["steps"] += 1
                stats["intervention_steps"] += int(takeover is not None)
                if success:
                    outcome = "success"
                    break
                if hz:
                    time.sleep(max(0.0, 1.0 / hz - (time.monotonic() - t0)))
            ep.end(outcome)
            stats["episodes"] += 1
            stats["successes"] += int(outcome == "success")
            stats["versions"].append(ep.version)
    finally:
        robot.disconnect()
        client.close(flush_timeout=30.0)
    return stats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--learner", help="learner gRPC target HOST:PORT")
    p.add_argument("--job", default="arm")
    p.add_argument("--token", default=None)
    p.add_argument("--episodes", type=int, default=5)
    p.add_argument("--hz", type=float, default=30.0)
    p.add_argument("--spool", default=None, help="spool folder (default /tmp/fleetloop-spool-<actor id>)")
    p.add_argument("--print-specs", action="store_true", help="print the job's tensors (for its job file) and exit")
    args = p.parse_args()
    if args.print_specs:
        print(json.dumps(job_file_specs(SimulatedArm())))
        return
    print(json.dumps(run(args.learner, args.job, args.token, episodes=args.episodes, hz=args.hz, spool_dir=args.spool)))


if __name__ == "__main__":
    main()
