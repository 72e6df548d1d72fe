"""A camera job under a small memory budget, over real gRPC (the learner in-process on a free
loopback port, without Ray), with frames stored compressed (``images.storage``, the default):

- a robot (the real FleetClient, JPEG per chunk) streams far more camera steps than the budget holds
  while the learner trains (sampling and decoding one batch ahead): the replay never passes its
  share of the budget, counting the frames' actual bytes; the overflow is evicted FIFO, counted in
  ``dropped_samples_total`` (evicted / evicted_unsampled), and received = live + evicted;
- a restart replays the ingest log into the same rows and bytes;
- a chunk with a bad JPEG header is still refused at ingest, naming the frame; one whose body is
  corrupt is acked, and is dropped at batch time as ``corrupt_frame``.
"""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest

from fleetloop.client.runtime import FleetClient
from fleetloop.codec import make_spec
from fleetloop.v1 import fleetloop_pb2_grpc as pb_grpc
from learner.backpressure import INFLIGHT_MESSAGES
from learner.config import LearnerConfig
from learner.process import build_learner
from tests.helpers.camera_chunks import camera_chunk, camera_specs, frames

pytestmark = [pytest.mark.timeout(240)]
TASK, JOB, SIZE, CAMS = "pick", "demo", 32, ("cam", "wrist")
MD = (("authorization", "Bearer tok"),)
MESSAGE = 64 * 1024
BUDGET_MB = 1.0


def _config(state_dir) -> LearnerConfig:
    return LearnerConfig(state_dir=state_dir, job_id=JOB, tasks=[TASK], robot_tokens=["tok"], device="cpu",
                         chunk_steps=20, max_message_bytes=MESSAGE, memory_budget_mb=BUDGET_MB, batch_size=16,
                         max_updates_per_s=20, publish_every=10, sampler={"mode": "fixed", "fixed_online_share": 1.0},
                         **camera_specs(SIZE, CAMS))


def _counter(impl, reason: str) -> float:
    return impl.core.metrics.registry.get_sample_value("fleetloop_learner_dropped_samples_total",
                                                       {"job": JOB, "reason": reason}) or 0.0


def _share() -> int:
    return (int(BUDGET_MB * (1 << 20)) - INFLIGHT_MESSAGES * MESSAGE)  # one task: the whole remainder


def test_camera_job_stays_within_its_budget_and_counts_evictions(tmp_path):
    impl = build_learner(_config(tmp_path / "learner").model_dump_json()).serve()
    spec = camera_specs(SIZE, CAMS)
    obs = [make_spec(**s) for s in spec["observation_specs"]]
    act = [make_spec(**s) for s in spec["action_specs"]]
    client = FleetClient(f"127.0.0.1:{impl.port}", JOB, "cam-robot", obs, act, [TASK], credential="tok",
                         spool_dir=str(tmp_path / "spool"), image_encoding={c: "jpeg" for c in CAMS})
    peaks, stop = [], threading.Event()

    def watch():  # the replay's bytes while ingest and training run
        while not stop.is_set():
            peaks.append(impl.core.memory_status()["online_bytes"])
            time.sleep(0.01)
    watcher = threading.Thread(target=watch, daemon=True)
    rng = np.random.default_rng(1)
    sent = 0
    try:
        client.connect()
        watcher.start()
        for episode in range(12):
            ep = client.begin_episode(TASK)
            cams = {c: frames(100, SIZE, 10 * episode + i) for i, c in enumerate(CAMS)}
            for t in range(100):
                ep.record({"proprio": rng.standard_normal(4).astype(np.float32), **{c: cams[c][t] for c in CAMS}},
                          rng.uniform(-1, 1, 2), 0.0, True)
            ep.end("timeout")
            sent += ep.steps
        assert client.flush(90), f"spool not drained: {client.sender.last_error}"
        deadline = time.monotonic() + 30
        while impl.core.step < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert impl.core.step >= 5, "the learner never trained on the camera rows"
    finally:
        stop.set()
        client.close(flush_timeout=0)
    core = impl.core
    mem, stats = core.memory_status(), core.replay.stats()[TASK]
    plan = core.memory_plan
    assert plan is not None and mem["budget_bytes"] == int(BUDGET_MB * (1 << 20))
    assert max(peaks) <= _share() and mem["online_bytes"] <= _share()  # the frames' actual bytes, within the share
    assert mem["buffer_bytes"] + mem["inflight_limit_bytes"] <= mem["budget_bytes"]
    ring = core.replay._buffers[(TASK, "online")]
    assert ring.max_bytes == _share() and ring.frame_bytes > 0.5 * (_share() - ring.capacity * ring.row_bytes)
    assert stats["online_steps"] < ring.capacity  # bytes, not rows, bound this ring
    assert stats["online_evicted"] > 0 and sent == 1200
    evicted = _counter(impl, "evicted") + _counter(impl, "evicted_unsampled") + _counter(impl, "evicted_ineligible")
    assert evicted == stats["online_evicted"]
    assert core.ingestor.steps_total == sent == stats["online_steps"] + stats["online_evicted"]
    assert core.batches.prefetch == 1 and core.batches.stats()["batches"] >= 5
    before = core.replay.export(TASK, "online")
    frame_bytes = ring.frame_bytes
    impl.stop()
    again = build_learner(_config(tmp_path / "learner").model_dump_json())  # restart: the log replayed, not served
    try:
        after = again.core.replay.export(TASK, "online")
        assert again.core.replay._buffers[(TASK, "online")].frame_bytes == frame_bytes
        assert (after["steps"] == before["steps"]).all() and (after["episode_keys"] == before["episode_keys"]).all()
        assert [bytes(c) for c in after["obs.cam"].reshape(-1)] == [bytes(c) for c in before["obs.cam"].reshape(-1)]
    finally:
        again.core.stop(checkpoint=False)


def test_bad_jpeg_header_is_refused_at_ingest_and_a_corrupt_body_dropped_at_batch_time(tmp_path):
    impl = build_learner(_config(tmp_path / "learner").model_dump_json()).serve()
    ch = grpc.insecure_channel(f"127.0.0.1:{impl.port}")
    stub = pb_grpc.LearnerStub(ch)
    try:
        bad = camera_chunk(JOB, "bad-robot", "ep-bad", 0, n=4, size=SIZE, cameras=CAMS, task=TASK)
        bad.observations["wrist"].frames[1] = b"\xff\xd8 not a JPEG header \xff\xd9"
        with pytest.raises(grpc.RpcError) as info:
            list(stub.StreamExperience(iter([bad]), metadata=MD, timeout=10))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "observations[wrist].frames[1]" in info.value.details()
        cut = camera_chunk(JOB, "bad-robot", "ep-cut", 0, n=4, size=SIZE, cameras=CAMS, task=TASK)
        cut.observations["cam"].frames[2] = cut.observations["cam"].frames[2][:-40]  # truncated: no end marker
        with pytest.raises(grpc.RpcError) as info:
            list(stub.StreamExperience(iter([cut]), metadata=MD, timeout=10))
        assert "observations[cam].frames[2]" in info.value.details() and "truncated" in info.value.details()
        assert impl.core.replay.size(TASK, "online") == 0
        good = [camera_chunk(JOB, "robot", "ep-1", s, n=4, size=SIZE, cameras=CAMS, task=TASK,
                             corrupt=[("cam", 0)] if s == 0 else []) for s in range(4)]
        acks = list(stub.StreamExperience(iter(good), metadata=MD, timeout=10))
        assert len(acks) == 4 and impl.core.replay.size(TASK, "online") == 16  # the corrupt body is acked
        deadline = time.monotonic() + 60
        while _counter(impl, "corrupt_frame") == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _counter(impl, "corrupt_frame") > 0 and impl.core.step > 0
    finally:
        ch.close()
        impl.stop()
