"""Oversized messages on the actor side, against a real learner (in-process, real gRPC on a free
loopback port) with a small ``max_message_bytes``:

- an actor recording camera-sized steps (raw and JPEG) gets every step stored once: its recorder
  splits chunks to the learner's announced limit, so nothing is refused, neither by the learner nor
  by the transport (whose limit is max_message_bytes + 1 MiB);
- a chunk already in the spool that is over the limit (spooled for an earlier learner with a larger
  one) is set aside, logged and counted, and the chunks after it flow: by the actor's own check
  against the handshake's limit, and, for a sender that knows no limit, on the learner's refusal
  (pushback -1) and on the transport's ("Received message larger than max", no trailer).
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from actor.metrics import ActorMetrics
from fleetloop.client.runtime import FleetClient
from fleetloop.client.sender import Sender
from fleetloop.client.spool import Spool
from fleetloop.channels import channel_options
from fleetloop.codec import encode, make_spec
from fleetloop.v1 import fleetloop_pb2 as pb
from learner.config import LearnerConfig
from learner.process import build_learner

pytestmark = [pytest.mark.timeout(240)]
TASK = "reach-v3"
MD = (("authorization", "Bearer tok"),)
LIMIT = 256 * 1024                 # the learner's max_message_bytes; its transport refuses > LIMIT + 1 MiB
CAM = [2, 96, 96, 3]               # two 96x96 RGB cameras: 55 KB per step raw, ~4 steps per chunk


@pytest.fixture()
def learner(tmp_path):
    cfg = LearnerConfig(state_dir=tmp_path / "learner", tasks=[TASK], robot_tokens=["tok"], chunk_steps=50,
                        max_message_bytes=LIMIT, max_updates_per_s=5, publish_every=10,
                        observation_specs=[{"name": "state", "dtype": "float32", "shape": [39]},
                                           {"name": "cam", "dtype": "uint8", "shape": CAM}])
    impl = build_learner(cfg.model_dump_json()).serve()
    yield impl
    impl.stop()


def _specs():
    obs = [make_spec("state", "float32", [39]), make_spec("cam", "uint8", CAM)]
    return obs, [make_spec("action", "float32", [4], [-1.0] * 4, [1.0] * 4)]


def _counter_total(impl, name: str) -> float:
    """Sum of every sample of counter ``name`` in the learner's registry."""
    total = 0.0
    for family in impl.core.metrics.registry.collect():
        for s in family.samples:
            if s.name == name:
                total += s.value
    return total


def _chunk(episode: str, steps: int, actor: str, seq: int = 0) -> bytes:
    """A valid one-chunk episode of ``steps`` camera steps (raw), as an actor would have spooled it."""
    rng = np.random.default_rng(seq + steps)
    c = pb.EpisodeChunk(job_id="demo", actor_id=actor, episode_id=episode, seq=seq, task_id=TASK, behavior_version=0,
                        first_step=0)
    encode(rng.standard_normal((steps, 39), dtype=np.float32), c.observations["state"])
    encode(rng.integers(0, 256, (steps, *CAM), dtype=np.uint8), c.observations["cam"])
    encode(rng.uniform(-1, 1, (steps, 4)).astype(np.float32), c.actions["action"])
    encode(np.zeros(steps, np.float32), c.rewards)
    encode(np.zeros(steps, np.bool_), c.interventions)
    c.end.CopyFrom(pb.EpisodeEnd(outcome=pb.TIMEOUT, length=steps))
    return c.SerializeToString()


@pytest.mark.parametrize("encoding", [None, "jpeg"])
def test_camera_steps_are_split_to_the_learners_limit_and_all_stored(learner, tmp_path, encoding):
    obs, act = _specs()
    client = FleetClient(f"127.0.0.1:{learner.port}", "demo", f"cam-{encoding}", obs, act, [TASK], credential="tok",
                         spool_dir=str(tmp_path / "spool"), image_encoding={"cam": encoding} if encoding else None)
    rng = np.random.default_rng(3)
    try:
        run = client.connect()
        assert run.max_message_bytes == LIMIT and run.chunk_steps == 50  # 50 camera steps would be ~2.8 MB
        sent = 0
        for _ in range(3):
            ep = client.begin_episode(TASK)
            for t in range(40):
                ep.record({"state": rng.standard_normal(39, dtype=np.float32),
                           "cam": rng.integers(0, 256, CAM, dtype=np.uint8)}, rng.uniform(-1, 1, 4), 0.5, t % 5 == 0)
            ep.end("timeout")
            sent += ep.steps
        assert client.flush(60), f"spool not drained: {client.sender.last_error}"
        audit = learner.core.audit()
        assert sent == 120 and audit["stored_steps"][TASK] == sent and audit["duplicates_stored"] == 0
        assert client.sender.rejected == 0 and client.sender.throttled == 0, client.sender.last_error
        assert _counter_total(learner, "fleetloop_learner_rejected_chunks_total") == 0
        assert _counter_total(learner, "fleetloop_learner_ingested_chunks_total") >= 3 * 3  # split: >= 3 chunks per episode
        assert client.sender.oversized == 0
    finally:
        client.close(flush_timeout=0)


def test_spooled_oversized_chunk_is_set_aside_before_sending(learner, tmp_path):
    """Chunks spooled before this learner (limit 256 KiB) was met: the 2.2 MB one is set aside by
    the sender (never sent), the ones before and after it are stored, and the actor goes on."""
    spool_dir = tmp_path / "spool"
    old = Spool(spool_dir)
    for episode, steps in (("ep-a", 2), ("ep-big", 40), ("ep-c", 3)):
        old.put(episode, 0, _chunk(episode, steps, "robot-s"))
    metrics = ActorMetrics("robot-s")
    obs, act = _specs()
    client = FleetClient(f"127.0.0.1:{learner.port}", "demo", "robot-s", obs, act, [TASK], credential="tok",
                         spool_dir=str(spool_dir), metrics=metrics)
    try:
        client.connect()
        ep = client.begin_episode(TASK)
        for _ in range(3):
            ep.record({"state": np.zeros(39, np.float32), "cam": np.zeros(CAM, np.uint8)}, np.zeros(4), 0.0, False)
        ep.end("success")
        assert client.flush(60), f"stuck: {client.sender.last_error}"
        assert learner.core.audit()["stored_steps"][TASK] == 2 + 3 + 3
        assert client.sender.rejected == 1 and client.sender.oversized == 1
        (aside,) = (spool_dir / "rejected").glob("*.chunk")
        reason = aside.with_suffix(".reason.txt").read_text()
        assert "oversized" in reason and str(LIMIT) in reason, reason
        assert metrics.registry.get_sample_value("fleetloop_actor_set_aside_chunks_total",
                                                 {"actor": "robot-s", "reason": "oversized"}) == 1
        assert _counter_total(learner, "fleetloop_learner_rejected_chunks_total") == 0  # it never reached the learner
    finally:
        client.close(flush_timeout=0)


def test_sender_without_a_known_limit_sets_aside_what_learner_or_transport_refuse(learner, tmp_path):
    """A sender that knows no limit sends them: the 2.2 MB chunk is refused by the transport
    (RESOURCE_EXHAUSTED "Received message larger than max", no pushback trailer), the 330 KB one by
    the learner (pushback -1). Each is set aside once; the small chunks around them are stored."""
    spool = Spool(tmp_path / "spool")
    sizes = {}
    for episode, steps in (("ep-a", 2), ("ep-huge", 40), ("ep-b", 1), ("ep-mid", 6), ("ep-c", 3)):
        raw = _chunk(episode, steps, "raw-sender")
        sizes[episode] = len(raw)
        spool.put(episode, 0, raw)
    assert sizes["ep-huge"] > LIMIT + (1 << 20) and LIMIT < sizes["ep-mid"] < LIMIT + (1 << 20)
    channel = grpc.insecure_channel(f"127.0.0.1:{learner.port}", options=channel_options())
    stream = channel.stream_stream("/fleetloop.v1.Learner/StreamExperience", request_serializer=lambda b: b,
                                   response_deserializer=pb.Ack.FromString)
    sender = Sender(lambda it: stream(it, metadata=MD), spool, "demo", "raw-sender")  # up to 32 in flight
    sender.start()
    try:
        assert spool.wait_empty(60), f"stuck: {sender.last_error}"
        assert learner.core.audit()["stored_steps"][TASK] == 2 + 1 + 3
        assert sender.rejected == 2 and sender.throttled == 0, sender.last_error
        reasons = sorted(p.read_text() for p in (tmp_path / "spool" / "rejected").glob("*.reason.txt"))
        assert len(reasons) == 2 and any("larger than max" in r for r in reasons), reasons
        assert any("max_message_bytes" in r for r in reasons), reasons
        assert sender.oversized == 2
        # only the learner's own refusal is on its books; the transport's leaves no trace there
        assert _counter_total(learner, "fleetloop_learner_rejected_chunks_total") == 1
    finally:
        sender.stop()
        channel.close()
