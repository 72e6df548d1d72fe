"""``fleetloop data export --format lerobot``: a real learner (in-process, real gRPC on a free loopback
port, not training) stores a camera job's chunks from two actors; once it is stopped its state dir is
exported offline and read back with :class:`fleetloop.lerobot.LeRobotReader`:

- every step's intervention flag, reward, action, proprio and behaviour policy version come back
  exactly, camera frames within codec tolerance (one actor sent JPEG frames, the other raw ones);
- episodes interleaved in the log are reassembled per (actor, episode) in seq order, a seq gap keeps
  what was stored, the open episode is skipped and counted (exported with ``include_open``);
- LLM group chunks are skipped and counted, a torn tail is reported and left in place (read-only);
- missing job / state dir / log and a non-empty output are clear errors;
- the round trip export -> ``fleetloop data import`` keeps the intervention flags.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest

from fleetloop.codec import decode, encode
from fleetloop.errors import FailedPrecondition, InvalidArgument, NotFound
from fleetloop.v1 import fleetloop_pb2 as pb
from fleetloop.v1 import fleetloop_pb2_grpc as pb_grpc
from learner.config import LearnerConfig
from learner.ingest_log import IngestLog
from learner.process import build_learner
from tests.helpers.camera_chunks import camera_chunk, camera_specs, frames

pytestmark = [pytest.mark.timeout(300)]
JOB, TASK, SIZE, N = "export-job", "pick", 32, 6
MD = (("authorization", "Bearer tok"),)
REPO = Path(__file__).resolve().parents[2]
#: (actor, episode, behaviour version, seqs sent, outcome or None = left open, camera encoding)
EPISODES = [
    ("arm-a", "a-0", 0, [0, 1, 2], pb.SUCCESS, "jpeg"),
    ("arm-a", "a-1", 1, [0, 1], pb.FAILURE, "jpeg"),
    ("arm-b", "b-0", 2, [0, 1], pb.TIMEOUT, None),
    ("arm-b", "b-gap", 2, [0, 2], pb.SUCCESS, None),  # seq 1 set aside by the actor: a gap
    ("arm-b", "b-open", 1, [0], None, None),
]
#: send order per actor: episodes interleaved in the log
ORDER = {"arm-a": [("a-0", 0), ("a-1", 0), ("a-0", 1), ("a-1", 1), ("a-0", 2)],
         "arm-b": [("b-0", 0), ("b-gap", 0), ("b-open", 0), ("b-0", 1), ("b-gap", 2)]}
OUTCOMES = {pb.SUCCESS: "success", pb.FAILURE: "failure", pb.TIMEOUT: "timeout"}


@dataclass
class Expected:
    """What one episode must export to (per-step arrays, chunks in seq order)."""

    actor: str
    outcome: str | None
    proprio: list = field(default_factory=list)
    cam: list = field(default_factory=list)
    actions: list = field(default_factory=list)
    rewards: list = field(default_factory=list)
    inter: list = field(default_factory=list)
    versions: list = field(default_factory=list)

    def cat(self, name: str) -> np.ndarray:
        return np.concatenate(getattr(self, name))


def _chunk(actor: str, episode: str, version: int, seq: int, end, encoding) -> tuple[pb.EpisodeChunk, dict]:
    """A camera chunk with a known intervention pattern (operator and policy steps) and known rewards."""
    c = camera_chunk(JOB, actor, episode, seq, n=N, size=SIZE, encoding=encoding, task=TASK, version=version, end=end)
    rng = np.random.default_rng(zlib.crc32(f"{episode}/{seq}".encode()))
    inter = rng.random(N) < 0.5
    inter[0], inter[-1] = True, False  # both kinds in every chunk
    rewards = (rng.normal(size=N) + 10 * seq).astype(np.float32)
    encode(rewards, c.rewards)
    encode(inter, c.interventions)
    steps = {"proprio": decode(c.observations["proprio"]).copy(), "cam": frames(N, SIZE, seq * 31, seq * N),
             "actions": decode(c.actions["action"]).copy(), "rewards": rewards, "inter": inter,
             "versions": np.full(N, version, np.int64)}
    return c, steps


@pytest.fixture(scope="module")
def stored(tmp_path_factory) -> dict:
    """Stream EPISODES to a real learner over gRPC, stop it; returns the data dir, its state dir and
    the expected episodes. The state dir sits where a local job's does: DATA/jobs/<id>/learner."""
    data = tmp_path_factory.mktemp("data")
    state_dir = data / "jobs" / JOB / "learner"
    cfg = LearnerConfig(state_dir=state_dir, job_id=JOB, tasks=[TASK], robot_tokens=["tok"], device="cpu",
                        chunk_steps=N, batch_size=8, **camera_specs(SIZE, ("cam",)))
    impl = build_learner(cfg.model_dump_json()).serve(train=False)
    chunks: dict[tuple[str, int], pb.EpisodeChunk] = {}
    expected: dict[str, Expected] = {}
    for actor, episode, version, seqs, end, enc in EPISODES:
        exp = expected[episode] = Expected(actor, OUTCOMES.get(end))
        for seq in seqs:
            c, steps = _chunk(actor, episode, version, seq, end if seq == seqs[-1] else None, enc)
            chunks[(episode, seq)] = c
            for k, v in steps.items():
                getattr(exp, k).append(v)
    channel = grpc.insecure_channel(f"127.0.0.1:{impl.port}")
    try:
        impl.core.publish()
        impl.core.publish()  # version 2: every behaviour version above is one the learner has published
        stub = pb_grpc.LearnerStub(channel)
        for actor, order in ORDER.items():
            acks = list(stub.StreamExperience(iter([chunks[k] for k in order]), metadata=MD, timeout=30))
            assert [(a.episode_id, a.seq, a.duplicate) for a in acks] == [(e, s, False) for e, s in order]
    finally:
        channel.close()
        impl.stop()
    return {"data": data, "state_dir": state_dir, "expected": expected}


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _check_episode(ep, exp: Expected, episode_id: str) -> None:
    """Every step of an exported episode against what was sent."""
    f = ep.frames
    t = len(exp.cat("rewards"))
    assert ep.task == TASK and ep.extra["fleetloop.episode_id"] == episode_id
    assert ep.extra["fleetloop.actor_id"] == exp.actor and ep.extra["fleetloop.outcome"] == (exp.outcome or "open")
    assert f["intervention"].reshape(t).dtype == np.bool_
    np.testing.assert_array_equal(f["intervention"].reshape(t), exp.cat("inter"))
    np.testing.assert_array_equal(f["next.reward"].reshape(t), exp.cat("rewards"))
    np.testing.assert_array_equal(f["action"], exp.cat("actions"))
    np.testing.assert_array_equal(f["observation.state"], exp.cat("proprio"))
    np.testing.assert_array_equal(f["policy_version"].reshape(t), exp.cat("versions"))
    done = np.zeros(t, np.bool_)
    done[-1] = exp.outcome is not None
    np.testing.assert_array_equal(f["next.done"].reshape(t), done)
    assert ep.extra["fleetloop.total_reward"] == pytest.approx(float(exp.cat("rewards").astype(np.float64).sum()), abs=1e-4)
    cam, want = np.asarray(f["observation.images.cam"]), exp.cat("cam")
    assert cam.shape == want.shape == (t, SIZE, SIZE, 3) and cam.dtype == np.uint8
    err = np.abs(cam.astype(np.int16) - want.astype(np.int16))
    assert err.mean() < 8, f"{episode_id}: frames differ by {err.mean():.2f} on average (JPEG + video codec)"
    # the frames' brightness encodes the step (+5 per step): the exported frames keep that order
    np.testing.assert_allclose(cam.mean(axis=(1, 2, 3)), want.mean(axis=(1, 2, 3)), atol=3)


def test_export_reads_back_every_step(stored, tmp_path):
    from fleetloop.lerobot import LeRobotReader
    from services.data.exporter import export_job

    log = stored["state_dir"] / "ingest.log"
    before = _digest(log)
    out = tmp_path / "lerobot"
    summary = export_job(JOB, out, data_dir=stored["data"], vcodec="libx264", progress=False)
    assert _digest(log) == before, "the export must not touch the ingest log"
    json.dumps(summary)  # JSON-able
    assert summary["dataset"]["total_episodes"] == 4 and summary["dataset"]["total_frames"] == 18 + 12 + 12 + 12
    counts = summary["counts"]
    assert counts["episodes_exported"] == 4 and counts["episodes_open_skipped"] == 1
    assert counts["llm_chunks"] == 0 and counts["seq_gaps"] == 1 and counts["torn_tail_bytes"] == 0
    reader = LeRobotReader(out)
    assert len(reader) == 4 and reader.fps == 10
    assert reader.features["observation.images.cam"].dtype == "video"
    assert reader.features["observation.state"].shape == (4,) and reader.features["action"].shape == (2,)
    episodes = [reader.episode(i) for i in range(len(reader))]
    ids = [e.extra["fleetloop.episode_id"] for e in episodes]
    assert ids == ["a-0", "a-1", "b-0", "b-gap"]  # order of first chunk in the log; the open one skipped
    for ep in episodes:
        _check_episode(ep, stored["expected"][ep.extra["fleetloop.episode_id"]], ep.extra["fleetloop.episode_id"])
    gap = episodes[ids.index("b-gap")]
    assert len(gap.frames["action"]) == 2 * N and gap.extra["fleetloop.seq_gaps"] == 1  # seqs 0 and 2 kept
    prov = json.loads((out / "meta" / "fleetloop.json").read_text())
    assert prov["job_id"] == JOB and Path(prov["state_dir"]) == stored["state_dir"].resolve()
    assert prov["mapping"] == {"observations": {"proprio": "observation.state", "cam": "observation.images.cam"},
                               "actions": {"action": "action"}, "reward": "next.reward", "intervention": "intervention"}
    assert prov["fps_source"] == "default" and prov["layout"]["action_slices"] == {"action": [0, 2]}
    assert prov["counts"]["episodes_open_skipped"] == 1 and prov["exported_at"]


def test_include_open_llm_chunks_and_a_torn_tail(stored, tmp_path):
    """A copy of the log plus one LLM group chunk and a torn record: the open episode exported with
    include_open (outcome 'open', no done), the LLM chunk counted, the torn tail reported and kept."""
    from fleetloop.lerobot import LeRobotReader
    from services.data.exporter import export_job

    state = tmp_path / "state"
    state.mkdir()
    shutil.copy(stored["state_dir"] / "ingest.log", state / "ingest.log")
    group = pb.EpisodeChunk(job_id=JOB, actor_id="llm-0", episode_id="g-1", task_id=TASK,
                            group=pb.CompletionGroup(prompt_id="p", completions=[pb.Completion(token_ids=[1], reward=1)]))
    group.end.outcome = pb.SUCCESS
    log = IngestLog(state / "ingest.log")
    log.append(group.SerializeToString())
    log.close()
    torn = b"FLR1\x00\x10\x00\x00garbage"
    with open(state / "ingest.log", "ab") as fh:
        fh.write(torn)
    size = (state / "ingest.log").stat().st_size
    summary = export_job(str(state), tmp_path / "out", vcodec="libx264", include_open=True, progress=False)
    assert (state / "ingest.log").stat().st_size == size, "read-only: the torn tail stays"
    c = summary["counts"]
    assert c["llm_chunks"] == 1 and c["torn_tail_bytes"] == len(torn) and c["episodes_exported"] == 5
    assert c["episodes_open_exported"] == 1 and c["episodes_open_skipped"] == 0
    assert summary["job_id"] == JOB  # a state dir path: the job id comes from the log
    reader = LeRobotReader(tmp_path / "out")
    opened = [ep for ep in reader if ep.extra["fleetloop.episode_id"] == "b-open"]
    assert len(opened) == 1
    _check_episode(opened[0], stored["expected"]["b-open"], "b-open")


def test_missing_job_state_dir_or_log_and_a_busy_output_are_clear_errors(tmp_path):
    from services.data.exporter import export_job

    with pytest.raises(NotFound) as info:
        export_job("no-such-job", tmp_path / "o1", data_dir=tmp_path, progress=False)
    assert "no-such-job" in str(info.value) and str(tmp_path / "jobs" / "no-such-job" / "learner") in str(info.value)
    with pytest.raises(NotFound) as info:
        export_job(str(tmp_path / "nowhere"), tmp_path / "o2", progress=False)
    assert "nowhere" in str(info.value)
    empty = tmp_path / "jobs" / "idle" / "learner"
    empty.mkdir(parents=True)
    with pytest.raises(NotFound) as info:
        export_job("idle", tmp_path / "o3", data_dir=tmp_path, progress=False)
    assert "ingest.log" in str(info.value) and info.value.field == "ingest_log"
    (empty / "ingest.log").write_bytes(b"")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "file").write_text("x")
    with pytest.raises(InvalidArgument) as info:
        export_job("idle", busy, data_dir=tmp_path, progress=False)
    assert info.value.field == "out" and "busy" in str(info.value)
    with pytest.raises(FailedPrecondition) as info:  # a log with nothing in it: nothing to export
        export_job("idle", tmp_path / "o5", data_dir=tmp_path, progress=False)
    assert "idle" in str(info.value) and "no episode" in str(info.value)
    with pytest.raises(InvalidArgument):
        export_job("  ", tmp_path / "o4", progress=False)


def _cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "services.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_round_trip_export_then_import_keeps_interventions(stored, tmp_path):
    """``fleetloop data export`` then ``fleetloop data import`` (both through the CLI, the import with the
    mapping the export recorded in ``meta/fleetloop.json``): the imported native dataset has every
    episode's steps, intervention flags included, as sent."""
    from fleetloop.dataset import iter_episodes

    out, demos = tmp_path / "lerobot", tmp_path / "demos"
    res = _cli("data", "export", "--format", "lerobot", "--data-dir", str(stored["data"]), JOB, str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["counts"]["episodes_exported"] == 4 and summary["counts"]["episodes_open_skipped"] == 1
    mapping = tmp_path / "mapping.json"
    mapping.write_text(json.dumps(json.loads((out / "meta" / "fleetloop.json").read_text())["mapping"]))
    spec = tmp_path / "job.json"
    spec.write_text(json.dumps({"name": JOB, "tasks": [TASK], **camera_specs(SIZE, ("cam",))}))
    res = _cli("data", "import", "--format", "lerobot", str(out), "--mapping", str(mapping), "--job-spec", str(spec),
               "--out", str(demos), "--quiet")
    assert res.returncode == 0, res.stderr[-3000:]
    imported = list(iter_episodes(demos))
    assert len(imported) == 4
    want = {e: stored["expected"][e] for e in ("a-0", "a-1", "b-0", "b-gap")}
    for got, (episode_id, exp) in zip(imported, want.items()):  # the export's episode order is kept
        assert got.task_id == TASK and got.outcome == exp.outcome, episode_id
        np.testing.assert_array_equal(np.asarray(got.interventions, np.bool_), exp.cat("inter"))
        np.testing.assert_array_equal(got.rewards, exp.cat("rewards"))
        np.testing.assert_array_equal(got.actions, exp.cat("actions"))
        np.testing.assert_array_equal(got.obs["proprio"], exp.cat("proprio"))
