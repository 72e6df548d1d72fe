"""Learner metrics that ops/ rules depend on: received vs stored steps, windowed intervention counts,
and per-actor version series that disappear when an actor leaves (so alerts do not fire forever)."""

from __future__ import annotations

import time

from learner.config import LearnerConfig
from learner.core import LearnerCore
from tests.helpers.chunks import robot_chunk


def _value(core: LearnerCore, name: str, **labels) -> float | None:
    return core.metrics.registry.get_sample_value(name, {"job": core.job, **labels})


def test_received_intervention_and_idle_actor_series(tmp_path):
    core = LearnerCore(LearnerConfig(job_id="m", state_dir=tmp_path / "l", tasks=["reach-v3"], batch_size=16,
                                     actor_metrics_ttl_s=60))
    for seq in range(3):
        core.ingestor.ingest(robot_chunk("m", "r1", "ep-1", seq, 0, n=10, interventions=4), 100, 0)
    core.ingestor.ingest(robot_chunk("m", "r1", "ep-1", 1, 0, n=10, interventions=4), 100, 0)  # a resend: not counted twice
    core.ingestor.ingest(robot_chunk("m", "r2", "ep-2", 0, 0, n=5, interventions=0), 100, 0)
    assert _value(core, "fleetloop_learner_received_steps_total", task="reach-v3") == 35
    assert _value(core, "fleetloop_learner_intervention_steps_total", task="reach-v3") == 12
    assert _value(core, "fleetloop_learner_actor_policy_version", actor="r1") == 0

    core.ingestor.actor_stats["r1"].last_seen = time.time() - 120  # r1 left the fleet two minutes ago
    core.refresh_gauges()
    assert _value(core, "fleetloop_learner_actor_policy_version", actor="r1") is None
    assert _value(core, "fleetloop_learner_actor_policy_version", actor="r2") == 0
    assert core.ingestor.actor_stats["r1"].steps == 30  # the fleet table keeps its tally
    core.ingestor.ingest(robot_chunk("m", "r1", "ep-3", 0, 0), 100, 0)  # back: the series returns
    assert _value(core, "fleetloop_learner_actor_policy_version", actor="r1") == 0


def test_published_is_logged_at_info_once_per_interval(tmp_path, caplog):
    """A version a second must not bury an operator's console: the first publish and then one per
    PUBLISH_LOG_INTERVAL_S are info lines (counting the versions in between), the rest debug."""
    import logging

    from learner import core as core_mod

    core = LearnerCore(LearnerConfig(job_id="p", state_dir=tmp_path / "l", tasks=["reach-v3"], metrics_port=None))
    logger = logging.getLogger("fleetloop")
    logger.addHandler(caplog.handler)
    caplog.handler.setLevel(logging.DEBUG)
    old_level = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        caplog.clear()
        core._last_publish_log = -core_mod.PUBLISH_LOG_INTERVAL_S  # as after start-up: the next one is logged
        for _ in range(4):
            core.publish()
        core._last_publish_log -= core_mod.PUBLISH_LOG_INTERVAL_S  # the interval has passed
        core.publish()
    finally:
        logger.removeHandler(caplog.handler)
        logger.setLevel(old_level)
    lines = [(r.levelno, r.getMessage()) for r in caplog.records if "event=published" in r.getMessage()]
    assert [lv for lv, _ in lines] == [logging.INFO] + [logging.DEBUG] * 3 + [logging.INFO]
    assert "versions_since_last_line=1" in lines[0][1] and "versions_since_last_line=4" in lines[-1][1]
