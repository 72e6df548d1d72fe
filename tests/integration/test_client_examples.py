"""The robot-client examples (issue 20, part 5) against a real learner (in this process, real gRPC on
a free loopback port): examples/lerobot_robot_loop.py drives its simulated LeRobot-style arm with an
operator taking over, and the ROS-free core of examples/ros2_node.py (RosBridge) runs on its fake
topic source (rclpy is not pip-installable, so the rclpy node itself is not run here). Each streams
episodes that the learner stores step for step, records interventions, acts with the numpy policy
built from the verified weights and swaps in a version published mid-run between episodes."""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import pytest

from fleetloop.client import FleetClient
from tests.helpers import client_learner

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(300)


def _example(name: str):
    spec = importlib.util.spec_from_file_location(f"fleetloop_example_{name}", ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses / typing resolve names through sys.modules
    spec.loader.exec_module(module)
    return module


def _check(impl, stats: dict, new_version: int) -> None:
    assert stats["versions"][0] == 0 and new_version in stats["versions"], stats["versions"]
    assert stats["versions"] == sorted(stats["versions"])  # swapped in between episodes, never back
    assert impl.core.ingestor.steps_total == stats["steps"] > 0  # every step stored (close() flushed)
    assert impl.core.ingestor.episodes_total == stats["episodes"] >= 3
    assert 0 < stats["intervention_steps"] < stats["steps"]


def test_lerobot_robot_loop_streams_and_swaps(tmp_path):
    ex = _example("lerobot_robot_loop")
    specs = ex.job_file_specs(ex.SimulatedArm())
    impl = client_learner.start(tmp_path / "learner", "arm", ["reach"], specs["observation_specs"],
                                specs["action_specs"], max_episode_steps=40)
    published: list = []
    deadline = time.monotonic() + 120

    def should_stop(stats: dict) -> bool:
        if stats["episodes"] >= 1 and not published:  # a new version once the first episode was streamed
            published.append(client_learner.publish_policy(impl, seed=3)[0])
        done = bool(published) and published[0].version in stats["versions"] and stats["episodes"] >= 3
        return done or time.monotonic() > deadline

    try:
        stats = ex.run(f"127.0.0.1:{impl.port}", "arm", client_learner.TOKEN, max_steps=40, hz=400.0,
                       should_stop=should_stop, spool_dir=str(tmp_path / "spool"))
        _check(impl, stats, published[0].version)
    finally:
        client_learner.stop(impl)


def test_ros2_bridge_on_fake_topics_streams_and_swaps(tmp_path):
    ex = _example("ros2_node")
    obs, act = ex.job_specs()
    impl = client_learner.start(tmp_path / "learner", "arm", ["reach"], client_learner.as_config_specs(obs),
                                client_learner.as_config_specs(act), max_episode_steps=30)
    try:
        client = FleetClient(f"127.0.0.1:{impl.port}", "arm", "ros2-robot", obs, act, ["reach"],
                             credential=client_learner.TOKEN, spool_dir=str(tmp_path / "spool"), connect_timeout_s=60,
                             weights_format="numpy")
        # ticks come every ~2 ms here (20 Hz on a robot): the operator's commands count as "still coming" for 1 ms
        bridge = ex.RosBridge(client, "reach", teleop_timeout_s=0.001)
        topics, published = ex.FakeTopics(bridge), None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            topics.spin_once()
            time.sleep(0.002)
            if published is None and bridge.stats["episodes"] >= 1:
                published, _ = client_learner.publish_policy(impl, seed=4)
            if published is not None and published.version in bridge.stats["versions"] and bridge.stats["episodes"] >= 3:
                break
        bridge.close()
        _check(impl, bridge.stats, published.version)
    finally:
        client_learner.stop(impl)
