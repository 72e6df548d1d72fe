"""The closed loop on real Ray and real gRPC: two Meta-World robots, one learner.

Holds: every step sent is stored exactly once (also across a forced disconnect mid-episode with
acks lost), versions increase, robots swap only between episodes.
"""

from __future__ import annotations

import time

import pytest

from learner.config import LearnerConfig
from learner.ray_learner import start_learner
from learner.staleness import StalenessConfig
from tests.helpers.tcp_proxy import TcpProxy
from tests.integration.helpers import RobotThread

pytestmark = [pytest.mark.timeout(300)]
TASKS = ["reach-v3", "push-v3"]


@pytest.fixture()
def ray_learner(ray_cluster, tmp_path):
    cfg = LearnerConfig(state_dir=tmp_path / "learner", tasks=TASKS, robot_tokens=["tok-a", "tok-b"], publish_every=10,
                        min_publish_interval_s=0.3, max_updates_per_s=60, chunk_steps=20, metrics_port=0,
                        staleness=StalenessConfig(bound=100_000))
    handle = start_learner(cfg)
    yield handle
    handle.stop()


def test_two_robots_exactly_once_through_disconnect(ray_learner, tmp_path):
    proxy = TcpProxy(ray_learner.host, ray_learner.port)
    a = RobotThread(proxy.target, "robot-a", TASKS, tmp_path / "spool-a", "tok-a", episodes=10, seed=1)
    b = RobotThread(ray_learner.target, "robot-b", TASKS, tmp_path / "spool-b", "tok-b", episodes=10, seed=2)
    a.start(), b.start()
    deadline = time.monotonic() + 60
    while a.client.sender.acked < 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert a.client.sender.acked >= 5, a.error
    proxy.drop_downstream = True   # the learner keeps storing robot-a's chunks, but their acks are lost
    time.sleep(1.0)
    proxy.cut()                    # then the connection dies mid-episode
    proxy.drop_downstream = False
    a.join(120), b.join(120)
    assert a.error is None and b.error is None, (a.error, b.error)
    for r in (a, b):
        assert r.client.flush(30), f"{r.client.actor_id} spool not drained"
    sent = sum(r.stats.steps for r in (a, b))
    audit = ray_learner.audit()
    status = ray_learner.status()
    try:
        assert audit["duplicates_stored"] == 0
        assert sum(audit["stored_steps"].values()) == sent
        assert status["ingested_steps"] == sent
        assert a.client.sender.duplicates > 0, "the lost acks should have caused resends recognised as duplicates"
        assert a.client.sender.reconnects >= 1 or a.client.sender.duplicates > 0
        assert audit["episodes_with_mixed_versions"] == 0, "an episode mixed two policy versions"
        assert status["episodes_total"] == 20
        assert status["version"] >= 1
        for r in (a, b):
            assert r.stats.versions_run == sorted(r.stats.versions_run), "versions must only increase"
    finally:
        for r in (a, b):
            r.client.close(flush_timeout=0)
        proxy.close()


def test_versions_increase_and_reach_robots(ray_learner, tmp_path):
    r = RobotThread(ray_learner.target, "robot-v", TASKS, tmp_path / "spool-v", "tok-a", episodes=12, seed=3)
    r.start()
    r.join(120)
    assert r.error is None, r.error
    r.client.flush(30)
    seen = r.stats.versions_run
    assert len(seen) >= 2 and seen == sorted(seen) and len(set(seen)) == len(seen)
    assert ray_learner.status()["version"] >= seen[-1]
    r.client.close(flush_timeout=0)
    import urllib.request
    text = urllib.request.urlopen(f"http://127.0.0.1:{ray_learner.metrics_port}/metrics", timeout=10).read().decode()
    for name in ("fleetloop_learner_ingested_steps_total", "fleetloop_learner_staleness_versions_bucket",
                 "fleetloop_learner_policy_version", "fleetloop_learner_update_seconds_count",
                 "fleetloop_learner_publish_seconds_count", "fleetloop_learner_published_bytes_total",
                 "fleetloop_learner_actor_policy_version", "fleetloop_learner_episodes_total",
                 "fleetloop_learner_intervention_ratio", "fleetloop_learner_buffer_steps",
                 "fleetloop_learner_dropped_samples_total", "fleetloop_learner_duplicate_chunks_total"):
        assert name in text, name


def test_outage_keeps_spool_and_recovers(ray_learner, tmp_path):
    """The learner unreachable for a while: the robot keeps working into its spool, retries with
    backoff, does not crash, and everything arrives once when the learner is back."""
    proxy = TcpProxy(ray_learner.host, ray_learner.port)
    r = RobotThread(proxy.target, "robot-o", TASKS, tmp_path / "spool-o", "tok-a", episodes=12, seed=4)
    r.start()
    deadline = time.monotonic() + 60
    while r.client.sender.acked < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    proxy.refuse = True
    proxy.cut()
    time.sleep(3.0)
    spooled_during_outage = len(r.client.spool)
    proxy.refuse = False
    r.join(120)
    try:
        assert r.error is None, r.error
        assert spooled_during_outage > 0, "the robot should have kept recording into its spool"
        assert r.client.flush(60)
        audit = ray_learner.audit()
        assert audit["duplicates_stored"] == 0
        assert sum(audit["stored_steps"].values()) == r.stats.steps
    finally:
        r.client.close(flush_timeout=0)
        proxy.close()
