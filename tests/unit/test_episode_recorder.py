"""EpisodeRecorder: chunking (full chunks, the time cap max_chunk_wait_s, the end chunk, the
learner's max_message_bytes: split by steps, a lone oversized step set aside), the preallocated rows
(values survive reuse across chunks) and refusals of steps that do not match the job's specs
(nothing recorded). A real disk Spool; the chunks are parsed back and checked with the learner's
own validation."""

from __future__ import annotations

import logging
import time
from types import SimpleNamespace

import numpy as np
import pytest

from fleetloop.client.runtime import EpisodeRecorder
from fleetloop.client.spool import Spool
from fleetloop.codec import make_spec
from fleetloop.errors import InvalidArgument
from fleetloop.v1 import fleetloop_pb2 as pb
from learner.ingest import validate

JOB, TASK = "job-rec", "reach-v3"


def _client(tmp_path, chunk_steps: int, max_wait: float = 0.0, images: bool = False, cam_hw: int = 2,
            max_message_bytes: int = 0, metrics=None):
    obs = [make_spec("state", "float32", [3])]
    if images:
        obs.append(make_spec("cam", "uint8", [cam_hw, cam_hw, 3]))
    act = [make_spec("action", "float32", [2], [-1.0, -1.0], [1.0, 1.0])]
    closed = []
    client = SimpleNamespace(job_id=JOB, actor_id="a-1", observation_specs=obs, action_specs=act,
                             run_config=pb.RunConfig(chunk_steps=chunk_steps, task_ids=[TASK], max_chunk_wait_s=max_wait,
                                                     max_message_bytes=max_message_bytes),
                             spool=Spool(tmp_path / "spool"), _episode_closed=lambda rec, outcome: closed.append(outcome),
                             metrics=metrics)
    return client, closed


def _chunks(client) -> list:
    out = []
    entry = client.spool.next_after(-1, 0.0)
    while entry is not None:
        chunk = pb.EpisodeChunk()
        chunk.ParseFromString(entry.raw)
        out.append(chunk)
        entry = client.spool.next_after(entry.counter, 0.0)
    return out


def _validated(client, chunk):
    return validate(chunk, JOB, {TASK}, client.observation_specs, client.action_specs, 0)


def test_full_chunks_then_end_chunk_carry_every_step_in_order(tmp_path):
    client, closed = _client(tmp_path, chunk_steps=4)
    rec = EpisodeRecorder(client, TASK, "ep-1", 0)
    for t in range(10):
        rec.record(np.full(3, t, np.float64), np.array([t / 10, -t / 10]), float(t), intervened=t % 3 == 0)
    rec.end("success")
    chunks = _chunks(client)
    assert [len(c.rewards.data) // 4 for c in chunks] == [4, 4, 2]  # the end chunk carries the last steps
    assert [c.seq for c in chunks] == [0, 1, 2] and [c.first_step for c in chunks] == [0, 4, 8]
    decoded = [_validated(client, c) for c in chunks]
    obs = np.concatenate([d.obs["state"] for d in decoded])
    assert obs.dtype == np.float32 and obs[:, 0].tolist() == list(range(10))  # rows reused, values intact
    assert np.concatenate([d.rewards for d in decoded]).tolist() == list(range(10))
    assert np.concatenate([d.interventions for d in decoded]).tolist() == [t % 3 == 0 for t in range(10)]
    assert chunks[-1].end.outcome == pb.SUCCESS and chunks[-1].end.length == 10 and closed == ["success"]
    assert client.spool.open_episodes() == []  # the end chunk cleared the open-episode marker


def test_time_cap_seals_a_partial_chunk_at_the_next_step(tmp_path):
    client, _ = _client(tmp_path, chunk_steps=50, max_wait=0.05)
    rec = EpisodeRecorder(client, TASK, "ep-2", 0)
    rec.record(np.zeros(3), np.zeros(2), 0.0, False)
    rec.record(np.zeros(3), np.zeros(2), 0.0, False)
    assert _chunks(client) == []  # within the cap: nothing sealed yet
    time.sleep(0.06)
    rec.record(np.ones(3), np.zeros(2), 1.0, False)  # past the cap: the first two steps are sealed
    chunks = _chunks(client)
    assert len(chunks) == 1 and len(chunks[0].rewards.data) // 4 == 2 and not chunks[0].HasField("end")
    assert client.spool.open_episodes()[0]["next_seq"] == 1
    rec.end("timeout")
    chunks = _chunks(client)
    assert [len(c.rewards.data) // 4 for c in chunks] == [2, 1] and chunks[1].first_step == 2


def test_no_time_cap_when_zero(tmp_path):
    client, _ = _client(tmp_path, chunk_steps=3, max_wait=0.0)
    rec = EpisodeRecorder(client, TASK, "ep-3", 0)
    rec.record(np.zeros(3), np.zeros(2), 0.0, False)
    time.sleep(0.02)
    rec.record(np.zeros(3), np.zeros(2), 0.0, False)
    assert _chunks(client) == []


def test_episode_without_steps_sends_one_empty_end_chunk(tmp_path):
    client, _ = _client(tmp_path, chunk_steps=4, images=True)
    rec = EpisodeRecorder(client, TASK, "ep-4", 0)
    rec.end("aborted")
    (chunk,) = _chunks(client)
    assert chunk.end.outcome == pb.ABORTED and _validated(client, chunk).steps == 0


def test_mapping_observations_with_images(tmp_path):
    client, _ = _client(tmp_path, chunk_steps=2, images=True)
    rec = EpisodeRecorder(client, TASK, "ep-5", 0)
    for t in range(3):
        rec.record({"state": np.full(3, t, np.float32), "cam": np.full((2, 2, 3), t, np.uint8)}, np.zeros(2), 0.0, False)
    rec.end("failure")
    cams = [np.frombuffer(c.observations["cam"].data, np.uint8).reshape(-1, 2, 2, 3) for c in _chunks(client)]
    assert [int(c[i, 0, 0, 0]) for c in cams for i in range(len(c))] == [0, 1, 2]


@pytest.mark.parametrize("obs, action, field, value", [
    (np.zeros(4), np.zeros(2), "obs[state]", [4]),                          # wrong shape (never broadcast)
    (np.zeros(3), np.zeros((1, 2)), "action[action]", [1, 2]),
    (np.zeros(3, dtype=np.complex64), np.zeros(2), "obs[state]", "complex64"),  # does not cast within its kind
])
def test_step_not_matching_its_spec_is_refused_and_not_recorded(tmp_path, obs, action, field, value):
    client, _ = _client(tmp_path, chunk_steps=2)
    rec = EpisodeRecorder(client, TASK, "ep-6", 0)
    rec.record(np.zeros(3), np.zeros(2), 1.0, False)
    with pytest.raises(InvalidArgument) as err:
        rec.record(obs, action, 5.0, False)
    assert err.value.field == field and err.value.value == value
    assert rec.steps == 1 and rec.total_reward == 1.0
    rec.end("timeout")
    assert [len(c.rewards.data) // 4 for c in _chunks(client)] == [1]


def test_uint8_spec_refuses_float_images(tmp_path):
    client, _ = _client(tmp_path, chunk_steps=2, images=True)
    rec = EpisodeRecorder(client, TASK, "ep-7", 0)
    with pytest.raises(InvalidArgument) as err:
        rec.record({"state": np.zeros(3), "cam": np.zeros((2, 2, 3))}, np.zeros(2), 0.0, False)
    assert err.value.field == "obs[cam]" and err.value.value == "float64"


def test_one_array_for_several_observation_tensors_is_refused(tmp_path):
    client, _ = _client(tmp_path, chunk_steps=2, images=True)
    rec = EpisodeRecorder(client, TASK, "ep-8", 0)
    with pytest.raises(InvalidArgument) as err:
        rec.record(np.zeros(3), np.zeros(2), 0.0, False)
    assert err.value.field == "obs" and "pass a mapping" in str(err.value)


@pytest.mark.parametrize("codec", ["png", "jpeg"])
def test_image_encoding_compresses_camera_frames_and_the_learner_decodes_them(tmp_path, codec):
    from fleetloop.client.runtime import _check_image_encoding

    client, _ = _client(tmp_path, chunk_steps=2, images=True)
    client.image_encoding, client.jpeg_quality = _check_image_encoding({"cam": codec}, client.observation_specs, 90), 90
    rec = EpisodeRecorder(client, TASK, "ep-9", 0)
    frames = [np.full((2, 2, 3), 40 * t, np.uint8) for t in range(3)]
    for t, f in enumerate(frames):
        rec.record({"state": np.zeros(3, np.float32), "cam": f}, np.zeros(2), 0.0, False)
    rec.end("success")
    chunks = _chunks(client)
    cam = chunks[0].observations["cam"]
    assert cam.encoding == (pb.ENCODING_PNG if codec == "png" else pb.ENCODING_JPEG) and len(cam.frames) == 2
    assert not cam.data and list(cam.shape) == [2, 2, 2, 3]  # T=2 frames of 2x2 RGB
    for c in chunks:
        assert _validated(client, c).steps in (1, 2)  # the learner's validation decodes every frame
    from fleetloop.codec import decode

    got = np.concatenate([decode(c.observations["cam"]) for c in chunks])
    if codec == "png":  # lossless
        assert np.array_equal(got, np.stack(frames))
    else:
        assert np.abs(got.astype(int) - np.stack(frames).astype(int)).max() <= 8


@pytest.mark.parametrize("enc, field", [({"nope": "jpeg"}, "image_encoding[nope]"), ({"state": "jpeg"}, "image_encoding[state]"),
                                        ({"cam": "gif"}, "encoding")])
def test_image_encoding_refuses_what_it_cannot_encode(enc, field):
    from fleetloop.client.runtime import _check_image_encoding

    obs = [make_spec("state", "float32", [3]), make_spec("cam", "uint8", [2, 2, 3])]
    with pytest.raises(InvalidArgument) as err:
        _check_image_encoding(enc, obs, 90)
    assert err.value.field == field


# -- the learner's max_message_bytes ------------------------------------------------------------
def _raws(client) -> list[bytes]:
    out, entry = [], client.spool.next_after(-1, 0.0)
    while entry is not None:
        out.append(entry.raw)
        entry = client.spool.next_after(entry.counter, 0.0)
    return out


def _assert_contiguous_within(client, limit: int, steps: int) -> list:
    """Every chunk <= limit, seq 0, 1, 2, ..., first_step = previous first_step + previous steps, the
    learner's validation passes, the end chunk's length = the steps sent; returns the decoded chunks."""
    raws = _raws(client)
    assert max(len(r) for r in raws) <= limit, [len(r) for r in raws]
    chunks = [pb.EpisodeChunk.FromString(r) for r in raws]
    decoded = [_validated(client, c) for c in chunks]
    assert [c.seq for c in chunks] == list(range(len(chunks)))
    firsts = [0]
    for d in decoded[:-1]:
        firsts.append(firsts[-1] + d.steps)
    assert [c.first_step for c in chunks] == firsts
    assert sum(d.steps for d in decoded) == steps
    assert [c.HasField("end") for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert chunks[-1].end.length == steps
    return decoded


def test_chunks_split_by_steps_to_stay_within_max_message_bytes(tmp_path):
    limit = 2048  # ~7 steps of an 8x8 RGB camera + state + action
    client, _ = _client(tmp_path, chunk_steps=50, images=True, cam_hw=8, max_message_bytes=limit)
    rec = EpisodeRecorder(client, TASK, "ep-size", 0)
    for t in range(40):
        rec.record({"state": np.full(3, t, np.float32), "cam": np.full((8, 8, 3), t, np.uint8)}, np.zeros(2), float(t), False)
    rec.end("success")
    decoded = _assert_contiguous_within(client, limit, 40)
    assert len(decoded) >= 5 and rec.oversized_steps == 0
    assert all(len(r) >= limit * 3 // 4 for r in _raws(client)[:-1]), "split chunks should be nearly full"
    obs = np.concatenate([d.obs["state"] for d in decoded])
    assert obs[:, 0].tolist() == list(range(40))
    assert np.concatenate([d.rewards for d in decoded]).tolist() == list(range(40))


@pytest.mark.parametrize("codec", ["png", "jpeg"])
def test_compressed_frames_are_sized_as_encoded(tmp_path, codec):
    """Frames of very different compressed sizes (flat vs noise): the split uses each frame's real
    encoded length, so the chunks stay within the limit and every step arrives, in order."""
    from fleetloop.client.runtime import _check_image_encoding

    limit = 6000
    client, _ = _client(tmp_path, chunk_steps=50, images=True, cam_hw=16, max_message_bytes=limit)
    client.image_encoding, client.jpeg_quality = _check_image_encoding({"cam": codec}, client.observation_specs, 90), 90
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) if t % 3 == 0 else np.full((16, 16, 3), t, np.uint8)
              for t in range(30)]
    rec = EpisodeRecorder(client, TASK, "ep-codec", 0)
    for t, f in enumerate(frames):
        rec.record({"state": np.full(3, t, np.float32), "cam": f}, np.zeros(2), 0.0, False)
    rec.end("timeout")
    decoded = _assert_contiguous_within(client, limit, 30)
    assert len(decoded) >= 2 and rec.oversized_steps == 0
    assert np.concatenate([d.obs["state"] for d in decoded])[:, 0].tolist() == list(range(30))
    if codec == "png":
        from fleetloop.codec import decode

        cams = np.concatenate([decode(pb.EpisodeChunk.FromString(r).observations["cam"]) for r in _raws(client)])
        assert np.array_equal(cams, np.stack(frames))


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_a_lone_oversized_step_is_set_aside_counted_and_logged(tmp_path):
    """A step that alone exceeds the limit (a noise frame, PNG) is dropped: counted on the recorder
    and in fleetloop_actor_oversized_steps_total, one step_oversized line names episode, seq, size
    and limit; the steps sent stay contiguous and the episode's end is still sent."""
    from actor.metrics import ActorMetrics
    from fleetloop.client.runtime import _check_image_encoding

    limit = 2048
    metrics = ActorMetrics("a-1")
    client, closed = _client(tmp_path, chunk_steps=4, images=True, cam_hw=32, max_message_bytes=limit, metrics=metrics)
    client.image_encoding, client.jpeg_quality = _check_image_encoding({"cam": "png"}, client.observation_specs, 90), 90
    noise = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)  # ~3 KB as PNG: over the limit
    lines = _Lines()
    logging.getLogger("fleetloop.actor").addHandler(lines)
    try:
        rec = EpisodeRecorder(client, TASK, "ep-big", 0)
        for t in range(12):
            cam = noise if t in (3, 7) else np.zeros((32, 32, 3), np.uint8)
            rec.record({"state": np.full(3, t, np.float32), "cam": cam}, np.zeros(2), 1.0, intervened=t == 3)
        rec.end("success")
    finally:
        logging.getLogger("fleetloop.actor").removeHandler(lines)
    kept = [t for t in range(12) if t not in (3, 7)]
    decoded = _assert_contiguous_within(client, limit, len(kept))
    assert np.concatenate([d.obs["state"] for d in decoded])[:, 0].tolist() == kept
    assert rec.oversized_steps == 2 and rec.steps == 10 and rec.intervention_steps == 0
    assert rec.total_reward == 12.0 and closed == ["success"]  # the return still counts the dropped steps
    assert metrics.registry.get_sample_value("fleetloop_actor_oversized_steps_total", {"actor": "a-1", "task": TASK}) == 2
    found = [ln for ln in lines.lines if "event=step_oversized" in ln]
    assert len(found) == 2, lines.lines
    assert "episode=ep-big" in found[0] and "seq=0" in found[0] and f"limit={limit}" in found[0]
    assert "step=3" in found[0] and "seq=1" in found[1] and "step=6" in found[1]
    size = int(found[0].split("size=")[1].split()[0])
    assert size > limit


def test_only_oversized_steps_still_send_the_end(tmp_path):
    client, closed = _client(tmp_path, chunk_steps=4, images=True, cam_hw=32, max_message_bytes=2048)
    rec = EpisodeRecorder(client, TASK, "ep-none", 0)
    for t in range(3):  # raw 32x32 RGB = 3 KB per step: every step alone is over the limit
        rec.record({"state": np.zeros(3, np.float32), "cam": np.zeros((32, 32, 3), np.uint8)}, np.zeros(2), 0.0, False)
    rec.end("failure")
    (chunk,) = _chunks(client)
    assert chunk.seq == 0 and chunk.end.outcome == pb.FAILURE and chunk.end.length == 0
    assert _validated(client, chunk).steps == 0 and rec.oversized_steps == 3 and closed == ["failure"]


def test_seal_checks_the_real_size_when_the_estimate_is_short(tmp_path):
    """The estimate's framing allowance forced to 0: the seal measures the serialized chunk and
    splits it in halves, so still no chunk exceeds the limit and none of its steps is lost."""
    limit = 2048
    client, _ = _client(tmp_path, chunk_steps=64, images=True, cam_hw=8, max_message_bytes=limit)
    rec = EpisodeRecorder(client, TASK, "ep-short", 0)
    rec._base_bytes = 0
    for t in range(30):
        rec.record({"state": np.full(3, t, np.float32), "cam": np.full((8, 8, 3), t, np.uint8)}, np.zeros(2), 0.0, False)
    rec.end("success")
    decoded = _assert_contiguous_within(client, limit, 30)
    assert np.concatenate([d.obs["state"] for d in decoded])[:, 0].tolist() == list(range(30)) and rec.oversized_steps == 0
