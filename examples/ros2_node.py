"""A ROS 2 node that streams a robot's experience to a fleetloop learner and runs the fleet's policy
(fleetloop robot client: ``pip install fleetloop-client``; no torch).

Topics: subscribes ``joint_states`` (sensor_msgs/JointState), ``camera/image_raw`` (sensor_msgs/Image,
rgb8 / bgr8 / mono8), ``teleop/joint_commands`` (std_msgs/Float64MultiArray: an operator's joint
targets; while they keep coming the operator has control and those steps are recorded as
interventions) and ``fleetloop/episode_end`` (std_msgs/String: success / failure / aborted); publishes
``joint_commands`` (std_msgs/Float64MultiArray, joint position targets in rad) at ``--hz``. Each tick
records one step: the joint positions and the camera frame the action was chosen on, the action
(targets / ``--joint-limit``, in [-1, 1]) and who chose it. New policy versions are taken only
between episodes.

rclpy is not on PyPI (``pip download rclpy`` finds nothing: it comes with a ROS 2 distribution,
e.g. apt ``ros-jazzy-rclpy``), so the file is split in two:

- :class:`RosBridge`, the ROS-free core: message objects in (anything with the sensor_msgs /
  std_msgs fields), joint targets out; it owns the FleetClient, the policy and the episode. It runs,
  and is tested (tests/integration/test_client_examples.py), against :class:`FakeTopics`, a fake
  topic source simulating the arm, its camera and an operator:
  ``python examples/ros2_node.py --learner HOST:50051 --job arm --token TOKEN --fake 500``.
- :func:`make_node`, the rclpy node wiring the topics to the bridge, imported only inside a sourced
  ROS 2 environment: ``python examples/ros2_node.py --learner HOST:50051 --job arm --token TOKEN``.
  This part is not run by the tests (no ROS 2 here).
"""

from __future__ import annotations

import argparse
import json
import time
from types import SimpleNamespace
from typing import Any

import numpy as np

from fleetloop.client import FleetClient, MlpPolicy, make_spec

JOINTS = ("joint1", "joint2", "joint3", "joint4", "joint5", "joint6")


def job_specs(joints=JOINTS, camera=(24, 32, 3)) -> tuple[list, list]:
    """The job's tensors: ``joint_positions`` (rad), ``camera`` (uint8 [H, W, C]), ``joint_targets`` in [-1, 1]."""
    return ([make_spec("joint_positions", "float32", [len(joints)]), make_spec("camera", "uint8", list(camera))],
            [make_spec("joint_targets", "float32", [len(joints)], low=[-1.0], high=[1.0])])


def image_array(msg: Any, shape: tuple[int, int, int]) -> np.ndarray:
    """A sensor_msgs/Image (rgb8, bgr8, mono8) as uint8 ``shape`` (nearest-neighbour resize)."""
    channels = {"rgb8": 3, "bgr8": 3, "mono8": 1}[msg.encoding]
    rows = np.frombuffer(bytes(msg.data), np.uint8).reshape(msg.height, msg.step)
    img = rows[:, :msg.width * channels].reshape(msg.height, msg.width, channels)
    img = img[..., ::-1] if msg.encoding == "bgr8" else img
    img = np.repeat(img, shape[2], axis=2) if channels == 1 and shape[2] == 3 else img
    ys, xs = np.arange(shape[0]) * msg.height // shape[0], np.arange(shape[1]) * msg.width // shape[1]
    return np.ascontiguousarray(img[ys][:, xs])


class RosBridge:
    """Topics in, joint targets out, experience to the learner (ROS-free; module docstring)."""

    def __init__(self, client: FleetClient, task: str, joints=JOINTS, joint_limit: float = np.pi,
                 max_steps: int | None = None, teleop_timeout_s: float = 0.3) -> None:
        self.client, self.task, self.joints, self.limit = client, task, list(joints), float(joint_limit)
        self.camera_shape = tuple(int(d) for s in client.observation_specs if s.name == "camera" for d in s.shape)
        self.run = client.connect()
        self.policy = MlpPolicy.from_weights(client.current, self.run, client.observation_specs)
        self.max_steps, self.teleop_timeout_s = max_steps or self.run.max_episode_steps, teleop_timeout_s
        self.positions: np.ndarray | None = None
        self.image: np.ndarray | None = None
        self.teleop: tuple[float, np.ndarray] | None = None
        self.episode, self.ep_steps = None, 0
        self.stats: dict[str, Any] = {"episodes": 0, "steps": 0, "intervention_steps": 0, "versions": []}

    def on_joint_state(self, msg: Any) -> None:
        by_name = dict(zip(msg.name, msg.position))
        self.positions = np.array([by_name[j] for j in self.joints], np.float32)

    def on_image(self, msg: Any) -> None:
        self.image = image_array(msg, self.camera_shape)

    def on_teleop(self, msg: Any) -> None:
        self.teleop = (time.monotonic(), np.array(msg.data, np.float32))

    def on_episode_end(self, msg: Any) -> None:
        self._end(str(msg.data))

    def _end(self, outcome: str) -> None:
        if self.episode is not None:
            self.episode.end(outcome)
            self.stats["episodes"] += 1
            self.stats["versions"].append(self.episode.version)
            self.episode = None

    def tick(self) -> np.ndarray | None:
        """One control step: the joint targets (rad) to publish, or None before the first joint state
        and camera frame. Opens an episode (swapping in a new policy first) when none is open."""
        if self.positions is None or self.image is None or self.client.job_stopping:
            return None
        if self.episode is None:
            if (new := self.client.swap_if_ready()) is not None:
                self.policy = MlpPolicy.from_weights(new, self.run, self.client.observation_specs)
            self.episode, self.ep_steps = self.client.begin_episode(self.task), 0
        obs = {"joint_positions": self.positions, "camera": self.image}
        manual = self.teleop is not None and time.monotonic() - self.teleop[0] < self.teleop_timeout_s
        action = np.clip(self.teleop[1] / self.limit, -1, 1) if manual else self.policy.act(obs, self.task)
        self.episode.record(obs, action.astype(np.float32), 0.0, intervened=manual)
        self.stats["steps"] += 1
        self.stats["intervention_steps"] += int(manual)
        self.ep_steps += 1
        if self.ep_steps >= self.max_steps:
            self._end("timeout")
        return action * self.limit

    def close(self) -> None:
        self._end("aborted")
        self.client.close(flush_timeout=30.0)


class FakeTopics:
    """A fake topic source: an arm that moves halfway to each command, a camera, and an operator who
    publishes the task's target pose while the arm is far from it; ends episodes on success."""

    def __init__(self, bridge: RosBridge, seed: int = 0) -> None:
        self.bridge, self.rng = bridge, np.random.default_rng(seed)
        self.pos, self.target = self.rng.uniform(-1, 1, len(bridge.joints)), self.rng.uniform(-1, 1, len(bridge.joints))

    def spin_once(self) -> None:
        """Publish one round of messages to the bridge, tick it, apply the command."""
        b = self.bridge
        b.on_joint_state(SimpleNamespace(name=list(b.joints), position=self.pos.tolist()))
        h, w, _ = b.camera_shape
        frame = np.full((h * 2, w * 2, 3), np.clip(128 + 40 * self.pos[:3], 0, 255), np.uint8)
        b.on_image(SimpleNamespace(height=h * 2, width=w * 2, encoding="rgb8", step=w * 6, data=frame.tobytes()))
        if np.abs(self.pos - self.target).mean() > 0.6:
            b.on_teleop(SimpleNamespace(data=self.target.tolist()))
        had_episode = b.episode is not None
        cmd = b.tick()
        if cmd is not None:
            self.pos = self.pos + 0.5 * (np.clip(cmd, -np.pi, np.pi) - self.pos)
        if had_episode and b.episode is not None and np.abs(self.pos - self.target).mean() < 0.05:
            b.on_episode_end(SimpleNamespace(data="success"))
            self.target = self.rng.uniform(-1, 1, len(b.joints))


def make_node(bridge: RosBridge, hz: float):
    """The rclpy node (needs a sourced ROS 2 environment; module docstring)."""
    from rclpy.node import Node
    from sensor_msgs.msg import Image, JointState
    from std_msgs.msg import Float64MultiArray, String

    class FleetloopNode(Node):
        def __init__(self) -> None:
            super().__init__("fleetloop_robot")
            self.create_subscription(JointState, "joint_states", bridge.on_joint_state, 10)
            self.create_subscription(Image, "camera/image_raw", bridge.on_image, 2)
            self.create_subscription(Float64MultiArray, "teleop/joint_commands", bridge.on_teleop, 10)
            self.create_subscription(String, "fleetloop/episode_end", bridge.on_episode_end, 10)
            self.commands = self.create_publisher(Float64MultiArray, "joint_commands", 10)
            self.create_timer(1.0 / hz, self._tick)

        def _tick(self) -> None:
            cmd = bridge.tick()
            if cmd is not None:
                self.commands.publish(Float64MultiArray(data=[float(x) for x in cmd]))

    return FleetloopNode()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--learner", required=True, help="learner gRPC target HOST:PORT")
    p.add_argument("--job", default="arm")
    p.add_argument("--task", default="reach")
    p.add_argument("--token", default=None)
    p.add_argument("--hz", type=float, default=20.0)
    p.add_argument("--spool", default=None)
    p.add_argument("--fake", type=int, default=0, metavar="STEPS", help="no ROS: run STEPS ticks on FakeTopics")
    args = p.parse_args()
    obs, act = job_specs()
    client = FleetClient(args.learner, args.job, "ros2-robot", obs, act, [args.task], credential=args.token,
                         spool_dir=args.spool, weights_format="numpy")
    # an operator's commands count as "still coming" for 6 ticks on ROS; FakeTopics publishes each tick it drives
    bridge = RosBridge(client, args.task, teleop_timeout_s=(0.5 if args.fake else 6.0) / args.hz)
    try:
        if args.fake:
            topics = FakeTopics(bridge)
            for _ in range(args.fake):
                topics.spin_once()
                time.sleep(1.0 / args.hz)
            print(json.dumps(bridge.stats))
            return
        import rclpy
        rclpy.init()
        node = make_node(bridge, args.hz)
        try:
            rclpy.spin(node)
        finally:
            node.destroy_node()
            rclpy.shutdown()
    finally:
        bridge.close()


if __name__ == "__main__":
    main()
