"""A chunk that trips a learner bug (not bad input) gets INTERNAL, is counted, and cannot hold back the
actor's other chunks: the sender resends it a few times (a transient fault heals), then sets it aside
in the spool's rejected/ folder (kept on disk, never silently lost) and drains the rest. Real learner
on a free port; the bug is planted by wrapping its ingest for one episode."""

from __future__ import annotations

import numpy as np
import pytest

from actor.main import robot_specs
from fleetloop.client.runtime import FleetClient
from learner.config import LearnerConfig
from learner.process import build_learner

pytestmark = pytest.mark.timeout(120)
TASKS = ["reach-v3"]


@pytest.fixture()
def learner(tmp_path):
    impl = build_learner(LearnerConfig(state_dir=tmp_path / "learner", tasks=TASKS, robot_tokens=["tok"],
                                         chunk_steps=10).model_dump_json()).serve()
    yield impl
    impl.stop()


def test_internal_error_on_one_chunk_does_not_block_the_spool(learner, tmp_path):
    ingest, bad = learner.core.ingestor.ingest, {}

    def buggy(chunk, *args, **kwargs):
        bad.setdefault("episode", chunk.episode_id)
        if chunk.episode_id == bad["episode"] and chunk.seq == 0:
            raise RuntimeError("planted bug")
        return ingest(chunk, *args, **kwargs)

    learner.core.ingestor.ingest = buggy
    obs_specs, act_specs = robot_specs()
    client = FleetClient(f"127.0.0.1:{learner.port}", "demo", "bug-robot", obs_specs, act_specs, TASKS, credential="tok",
                         spool_dir=str(tmp_path / "spool"))
    try:
        client.connect()
        client.sender.backoff_max_s = 0.2
        for _ in range(3):
            ep = client.begin_episode(TASKS[0])
            for i in range(25):
                ep.record(np.full(39, 0.01 * i, np.float32), np.zeros(4, np.float32), 0.0, intervened=False)
            ep.end("success")
        assert client.flush(60), f"spool not drained: {client.sender.last_error}"
        assert client.sender.rejected == 1 and "INTERNAL" in (client.sender.last_error or "")
    finally:
        client.close(flush_timeout=0)
    reasons = [p.read_text() for p in (tmp_path / "spool" / "rejected").glob("*.reason.txt")]
    assert len(reasons) == 1 and "planted bug" in reasons[0]
    strikes = learner.core.metrics.registry.get_sample_value("fleetloop_learner_rejected_chunks_total",
                                                             {"job": "demo", "reason": "internal"})
    assert strikes == client.sender.max_internal_strikes == 5
    assert learner.core.audit()["stored_steps"]["reach-v3"] == 3 * 25 - 10  # every chunk but the one set aside
