"""A learner that dies without a goodbye resumes from its checkpoint + ingest log: no
acknowledged step lost or duplicated, versions keep increasing."""

from __future__ import annotations

import time

import pytest

from learner.config import LearnerConfig
from learner.process import build_learner
from tests.integration.helpers import RobotThread

pytestmark = [pytest.mark.timeout(180)]
TASKS = ["reach-v3"]


def test_resume_after_abrupt_stop(tmp_path):
    cfg = LearnerConfig(state_dir=tmp_path / "learner", tasks=TASKS, chunk_steps=20, publish_every=5,
                        max_updates_per_s=50, checkpoint_every_s=0.5)
    first = build_learner(cfg.model_dump_json()).serve()
    robot = RobotThread(f"127.0.0.1:{first.port}", "r", TASKS, tmp_path / "spool", None, episodes=4, seed=1)
    robot.start()
    robot.join(90)
    assert robot.error is None and robot.client.flush(30)
    robot.client.close(flush_timeout=0)
    stored = first.core.audit()["stored_steps"]["reach-v3"]
    version_before = first.core.version
    # the property is "resume from a checkpoint": on a loaded machine training may start only just
    # before the robot finishes, so wait (bounded) until a checkpoint with step > 0 is on disk
    deadline = time.monotonic() + 60
    while not [c for c in first.core.ckpt_dir.glob("ckpt-*/state.json") if int(c.parent.name.split("-")[-1]) > 0]:
        assert time.monotonic() < deadline, "the learner wrote no checkpoint with step > 0 within 60 s"
        time.sleep(0.1)
    # abrupt: stop serving and training, but no final checkpoint and no log close
    first.kill()

    second = build_learner(cfg.model_dump_json()).serve()
    try:
        audit = second.core.audit()
        assert audit["stored_steps"]["reach-v3"] == stored == robot.stats.steps
        assert audit["duplicates_stored"] == 0
        assert second.core.version >= version_before
        assert second.core.publish() > version_before
        assert second.core.step > 0, "optimizer/step restored from the checkpoint"
    finally:
        second.stop()
