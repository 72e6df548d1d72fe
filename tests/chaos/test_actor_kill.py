"""Chaos 1: SIGKILL a robot process mid-episode, restart it on the same spool and actor id.

The robot (the real ``fleetloop actor``, journalled) first streams normally, then through a TCP
proxy that swallows the learner's acks (chunks stored but still spooled), then the link is cut
(chunks spooled that the learner never saw); it is killed inside an episode, so its spool holds
both kinds when the restarted process (straight to the learner) takes over.

Definitions used by the assertions:

- *sent* = the chunks that reached the spool (``Spool.put`` returned: the file is renamed into
  place), whether acknowledged later or not; read from the actor's journal (both processes) plus
  the spool folder as the killed process left it. Steps still in the recorder's memory at the kill
  never reached the spool: they are not sent, and nothing claims them.
- *stored* = on the learner: the ingest log's records (the durability point) and the online replay
  buffer (step indices per episode).

Holds: every sent chunk is in the learner's log exactly once and nothing else is; every sent step
is in the buffer exactly once (0 duplicates); every chunk the actor saw acknowledged is stored; the
episode the kill cut is *left open* (the runtime's default, see ``fleetloop/client/runtime.py``): its spooled
chunks 0..k are all stored (contiguous seqs and steps), it has no outcome, it is the only open
episode on the learner, and the restarted process reports it (``episode_left_open``) and clears
its marker; a torn spool file (a write cut by a power loss, planted here next to the temp file a
kill mid-write leaves) is set aside, never sent; the restarted actor drains its spool and exits 0.

Closing the cut episode as ``aborted`` instead (``FleetClient(abort_interrupted=True)``, off by
default) sends a zero-step end chunk: ``test_zero_step_end_chunk_is_ingested`` holds the learner
side, ``test_abort_chunk_of_an_interrupted_episode`` the actor's side.
"""

from __future__ import annotations

import time

import pytest

from fleetloop.v1 import fleetloop_pb2 as pb
from learner.config import LearnerConfig
from learner.process import build_learner
from learner.staleness import StalenessConfig
from tests.chaos.learner_process import buffer_contents
from tests.chaos.procs import (ActorProc, ProcGroup, frame_torn, journal_chunks, read_ingest_log, spool_snapshot,
                               wait_for, write_summary)
from tests.helpers.tcp_proxy import TcpProxy

pytestmark = [pytest.mark.timeout(300)]
TASK = "reach-v3"
ACTOR = "chaos-robot-1"


def _actor_flags(port: int, spool, extra: list[str]) -> list[str]:
    return ["--learner", f"127.0.0.1:{port}", "--job", "demo", "--actor-id", ACTOR, "--tasks", TASK, "--spool", str(spool),
            "--hz", "60", "--seed", "3", "--operator", "scripted", *extra]


def test_actor_sigkill_mid_episode_then_restart_same_spool(tmp_path):
    cfg = LearnerConfig(state_dir=tmp_path / "learner", tasks=[TASK], chunk_steps=10, max_episode_steps=120, batch_size=64,
                        publish_every=10, max_updates_per_s=4, checkpoint_every_s=30,
                        staleness=StalenessConfig(policy="admit"))  # every sent step is stored: exact accounting
    learner = build_learner(cfg.model_dump_json()).serve()
    procs = ProcGroup()
    spool = tmp_path / "spool"
    journal = tmp_path / "journal.jsonl"
    proxy = TcpProxy("127.0.0.1", learner.port)  # the first process talks through it, so acks can be lost
    try:
        first = procs.add(ActorProc("actor-1", journal, _actor_flags(proxy.port, spool, []), tmp_path / "actor-1.log"))
        puts = lambda: [r for r in first.records() if r["ev"] == "put"]  # noqa: E731

        # 1. two whole episodes go through normally
        wait_for(lambda: sum(1 for r in puts() if r["outcome"]) >= 2, 150, "two episodes done", alive=[first])
        # 2. acks lost: chunks reach the learner's log but stay in the spool (durable, unacknowledged)
        proxy.drop_downstream = True
        n_lost_acks = len(puts())
        wait_for(lambda: {(r["episode"], r["seq"]) for r in puts()[n_lost_acks:]} &
                 read_ingest_log(cfg.state_dir / "ingest.log").keys, 60, "a chunk stored whose ack is lost", alive=[first])
        # 3. the link goes down: chunks pile up in the spool that the learner never saw
        proxy.refuse = True
        proxy.cut()
        n_cut = len(puts())

        def mid_episode():
            p = puts()
            return len(p) >= n_cut + 3 and p[-1]["outcome"] is None and p[-1]

        def frozen_mid_episode():
            """Freeze the robot once it looks mid-episode; keep it frozen only if it still is (its
            newest chunk, in the journal or in the spool, is not an episode end)."""
            last = mid_episode()
            if not last:
                return None
            first.freeze()
            last = mid_episode()
            if last and not any(c.outcome for c in spool_snapshot(spool) if c.episode_id == last["episode"]):
                return last
            first.thaw()
            return None
        last = wait_for(frozen_mid_episode, 90, "chunks spooled after the cut, inside an episode", interval=0.02,
                        alive=[first])
        first.kill9()  # SIGKILL ends a stopped process too
        version_at_kill = learner.core.version
        killed_ep = last["episode"]

        # what the killed process left: its journal, its spool folder, its open-episode marker
        rec1 = first.records()
        assert [r for r in rec1 if r["ev"] == "put"][-1]["outcome"] is None, "the kill must land inside an episode"
        left = spool_snapshot(spool)
        markers = list((spool / "open").glob("*.json"))
        assert len(markers) == 1 and killed_ep in markers[0].read_text()
        log_at_kill = read_ingest_log(cfg.state_dir / "ingest.log")
        left_keys = {c.key for c in left}
        assert left_keys & log_at_kill.keys, "the spool holds chunks the learner stored (their acks were lost)"
        assert left_keys - log_at_kill.keys, "the spool holds chunks the learner never received"

        # a kill mid-write leaves a temp file; a power loss can leave a renamed file whose data never
        # reached the disk: plant both. The torn chunk is cut just before its `end` field, so it
        # still parses as a protobuf (only the spool's frame check tells it is torn).
        next_counter = 1 + max([int(p.stem) for p in spool.glob("*.chunk")] +
                               [int(r["counter"]) for r in rec1 if r["ev"] == "put"])
        (spool / f".{next_counter:012d}.tmp").write_bytes(b"FLS1\x00\x01")
        torn_payload, torn_file = frame_torn(ACTOR, killed_ep, seq=9_999, task=TASK)
        assert pb.EpisodeChunk.FromString(torn_payload).episode_id == killed_ep  # parses: dangerous without a frame
        (spool / f"{next_counter + 1:012d}.chunk").write_bytes(torn_file)

        t_restart = time.time()
        second = procs.add(ActorProc("actor-2", journal, _actor_flags(learner.port, spool, ["--episodes", "2"]),
                                     tmp_path / "actor-2.log"))
        assert second.wait(180) == 0, f"restarted actor did not drain its spool:\n{second.tail()}"

        records = second.records()  # one journal file, both processes
        rec2 = [r for r in records if r.get("pid") == second.pid]
        connected = [r for r in rec2 if r["ev"] == "connected"]
        assert connected and connected[0]["interrupted"] == [killed_ep] and connected[0]["torn"] == 1

        sent = journal_chunks(records)                        # every put of both processes
        for c in left:                                        # + whatever the spool held (a put the journal missed)
            sent.setdefault(c.key, {"episode": c.episode_id, "seq": c.seq, "first_step": c.first_step, "steps": c.steps,
                                    "outcome": c.outcome})
        acked = {(r["episode"], r["seq"]) for r in records if r["ev"] == "ack"}
        log = read_ingest_log(cfg.state_dir / "ingest.log")
        audit = learner.core.audit()
        buffer = buffer_contents(learner.core)[TASK]

        # exactly once, chunk level (the durable log) and step level (the replay buffer)
        assert log.duplicates() == 0
        lost = set(sent) - log.keys
        extra = log.keys - set(sent)
        assert not lost, f"sent but not stored: {sorted(lost)[:10]}"
        assert not extra, f"stored but never sent: {sorted(extra)[:10]}"
        assert acked <= log.keys
        assert audit["duplicates_stored"] == 0
        sent_steps = sum(int(r["steps"]) for r in sent.values())
        assert audit["stored_steps"][TASK] == sent_steps == log.steps
        expected: dict[str, set[int]] = {}
        for r in sent.values():
            expected.setdefault(r["episode"], set()).update(range(int(r["first_step"]), int(r["first_step"]) + int(r["steps"])))
        assert {e: set(v["steps"]) for e, v in buffer.items()} == {e: s for e, s in expected.items() if s}
        assert all(len(v["steps"]) == len(set(v["steps"])) for v in buffer.values())

        # the cut episode: contiguous chunks 0..k, all stored, no outcome: left open, and only it
        cut = sorted((r for r in log.records if r.episode_id == killed_ep), key=lambda r: r.seq)
        assert cut and [r.seq for r in cut] == list(range(len(cut))) and all(r.outcome is None for r in cut)
        assert [r.first_step for r in cut] == [sum(c.steps for c in cut[:i]) for i in range(len(cut))]
        spooled_steps = sum(r.steps for r in cut)
        assert spooled_steps == len(buffer[killed_ep]["steps"])
        assert {episode for _actor, episode in learner.core.ingestor.open_episodes()} == {killed_ep}, "only the cut episode is open on the learner"
        assert killed_ep not in {e.episode_id for e in learner.core.ingestor.episodes}

        # the spool is clean: nothing pending, no marker, the torn file set aside with its reason, never sent
        assert not list(spool.glob("*.chunk")) and not list(spool.glob(".*.tmp")) and not list((spool / "open").iterdir())
        reasons = [p.read_text() for p in (spool / "rejected").glob("*.reason.txt")]
        assert len(reasons) == 1 and reasons[0].startswith("torn")
        assert (killed_ep, 9_999) not in log.keys

        acks2 = [r for r in rec2 if r["ev"] == "ack"]
        dup_acks = {(r["episode"], r["seq"]) for r in acks2 if r["dup"]}
        assert dup_acks == left_keys & log_at_kill.keys, "exactly the stored-but-unacked chunks come back as duplicates"
        write_summary("actor_kill", {
            "definition": "sent = chunks that reached the spool (journal of Spool.put + spool folder after the kill); "
                          "stored = ingest log records and replay-buffer steps on the learner",
            "chunks_sent": len(sent), "steps_sent": sent_steps, "chunks_acked_seen_by_actor": len(acked),
            "steps_acked_seen_by_actor": sum(int(sent[k]["steps"]) for k in acked),
            "steps_recorded_not_spooled": "unknown: in the killed process's memory, never sent",
            "learner_version_at_kill": version_at_kill, "learner_version_after": learner.core.version,
            "chunks_stored": len(log.records), "steps_stored": audit["stored_steps"][TASK],
            "duplicates_stored": log.duplicates() + audit["duplicates_stored"], "lost": len(lost),
            "chunks_in_spool_at_kill": len(left_keys), "of_which_stored_ack_lost": len(left_keys & log_at_kill.keys),
            "of_which_never_received": len(left_keys - log_at_kill.keys), "resent_recognised_as_duplicates": len(dup_acks),
            "killed_episode": {"chunks_spooled": len(cut), "steps_spooled": spooled_steps, "handled_as": "left_open"},
            "torn_files_set_aside": len(reasons), "episodes_after_restart": 2,
            "restart_to_first_ack_seconds_info_only": round(acks2[0]["t"] - t_restart, 3) if acks2 else None,
        })
    finally:
        procs.cleanup()
        proxy.close()
        learner.stop()


def test_abort_chunk_of_an_interrupted_episode(tmp_path):
    """Actor side of ``abort_interrupted``: a marker left by a dead process becomes one zero-step
    ABORTED end chunk with the next seq and first step, also when the last put beat its marker
    update (the spool's own entries win); an episode whose end is already spooled just loses its marker."""
    from actor.main import robot_specs
    from fleetloop.client.runtime import close_interrupted_episodes
    from fleetloop.client.spool import Spool

    obs, act = robot_specs()
    spool = Spool(tmp_path / "spool")
    chunk = pb.EpisodeChunk(job_id="demo", actor_id="a", episode_id="ep-1", seq=3, task_id=TASK, first_step=30)
    chunk.rewards.shape.append(10)
    spool.put("ep-1", 3, chunk.SerializeToString())      # put landed, the marker still says seq 3
    spool.mark_open("ep-1", {"job_id": "demo", "actor_id": "a", "task_id": TASK, "behavior_version": 2, "next_seq": 3,
                             "first_step": 30, "total_reward": 1.5})
    done = pb.EpisodeChunk(job_id="demo", actor_id="a", episode_id="ep-2", seq=1, task_id=TASK)
    done.end.outcome = pb.SUCCESS
    spool.put("ep-2", 1, done.SerializeToString())
    spool.mark_open("ep-2", {"job_id": "demo", "actor_id": "a", "task_id": TASK, "next_seq": 1, "first_step": 5})

    reopened = Spool(tmp_path / "spool")
    assert close_interrupted_episodes(reopened, obs, act, abort=True) == ["ep-1"]
    end = pb.EpisodeChunk.FromString(reopened.entries_of("ep-1")[-1].raw)
    assert (end.seq, end.first_step, end.behavior_version, end.end.outcome, end.end.length) == (4, 40, 2, pb.ABORTED, 40)
    assert list(end.rewards.shape) == [0] and list(end.observations["state"].shape) == [0, 39]
    assert reopened.open_episodes() == [] and len(reopened) == 3


def test_zero_step_end_chunk_is_ingested(tmp_path):
    from actor.main import robot_specs
    from fleetloop.client.runtime import close_interrupted_episodes
    from fleetloop.client.spool import Spool
    from learner.ingest import validate

    obs, act = robot_specs()
    spool = Spool(tmp_path / "spool")
    spool.mark_open("ep-1", {"job_id": "demo", "actor_id": "a", "task_id": TASK, "behavior_version": 0, "next_seq": 2,
                             "first_step": 20})
    close_interrupted_episodes(spool, obs, act, abort=True)
    end = pb.EpisodeChunk.FromString(spool.entries_of("ep-1")[-1].raw)
    decoded = validate(end, "demo", {TASK}, obs, act, latest_version=0)
    assert decoded.steps == 0 and decoded.outcome == "aborted"
