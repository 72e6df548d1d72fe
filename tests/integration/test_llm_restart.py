"""A restarted LLM learner keeps its promises (issue 5): acknowledged groups survive, exactly once, and
training continues with the saved optimizer.

Real parts: an :class:`~learner.llm.core.LlmLearnerCore` (tiny random Llama, GRPO on the CPU) behind the
real gRPC servicer on a free loopback port; groups go over ``StreamExperience`` and their acks are checked.
The test drives the learner steps itself (no training thread), so which groups a step consumed is exact.
A crash is simulated in process as the robot restart test does: the server stops, the core is abandoned
without ``stop()`` (no optimizer save, no log close), and a torn record is appended to the group log.

- ``test_crash_keeps_acknowledged_groups_exactly_once``: consumed groups are not retrained, unconsumed ones
  are re-queued (a stale one is dropped, not trained), resends of compacted / consumed / re-queued groups
  are duplicates, the optimizer state equals the saved one, the log is compacted once all is consumed.
- ``test_crash_around_the_publish``: the two-phase marker: a crash before a step's publish re-queues its
  groups, a crash after it (before the commit) does not.
- ``test_corrupt_optimizer_checkpoint_and_marker``: the background optimizer save holds the step's state;
  corrupt checkpoints and marker: a warning each, a fresh optimizer, every logged group re-queued (at
  least once), no crash.
- ``test_consumed_set``, ``test_journal_rotates_compacts_and_survives_a_failed_append``: the journal alone
  (files only): rotation by size, compaction into the ledger, replay order, a failed append moving writing
  to a fresh segment, a marker ahead of the published step treated as unreadable.
"""

from __future__ import annotations

import copy
import logging

import grpc
import pytest
import torch

import transformers  # noqa: F401  (the LLM extra is part of `make install`)

from fleetloop.v1 import fleetloop_pb2 as pb
from fleetloop.v1 import fleetloop_pb2_grpc as pb_grpc
from learner.checkpoint import load_latest
from learner.llm.config import LlmLearnerConfig
from learner.llm.core import LlmLearnerCore
from learner.process import build_learner

pytestmark = [pytest.mark.timeout(300)]
JOB, TOKEN = "llmjob", "tok"
MD = (("authorization", f"Bearer {TOKEN}"),)


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("llm-models")


@pytest.fixture()
def events():
    """Structured log lines of the fleetloop loggers (they do not propagate to pytest's caplog)."""
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    handler, root = Keep(level=logging.WARNING), logging.getLogger("fleetloop")
    root.addHandler(handler)
    yield lines
    root.removeHandler(handler)


def _config(state_dir, model_cache) -> LlmLearnerConfig:
    return LlmLearnerConfig(job_id=JOB, state_dir=state_dir, model_cache_dir=str(model_cache), robot_tokens=[TOKEN],
                            tasks=["arith"], group_size=4, batch_groups=2, eta=1, max_new_tokens=8, device="cpu",
                            grpc_workers=8, algorithm_params={"lr": 1e-2})


class Served:
    """A core behind the real servicer on a free loopback port (no training thread: the test steps)."""

    def __init__(self, cfg: LlmLearnerConfig) -> None:
        self.proc = build_learner(cfg).serve(train=False)
        self.core, self.server, self.port = self.proc.core, self.proc.server, self.proc.port
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.stub = pb_grpc.LearnerStub(self.channel)

    def send(self, *chunks: pb.EpisodeChunk) -> list[bool]:
        """Stream ``chunks``; returns each ack's duplicate flag (in order)."""
        acks = list(self.stub.StreamExperience(iter(chunks), metadata=MD, timeout=30))
        assert [a.episode_id for a in acks] == [c.episode_id for c in chunks]
        return [a.duplicate for a in acks]

    def queued(self) -> list[str]:
        return self.core.queued_episode_ids()  # the queues themselves: which groups, in which order

    def step(self) -> dict:
        rec = self.core.train_step(timeout=5)
        assert rec is not None
        return rec

    def crash(self) -> None:
        """Stop serving; abandon the core without stop(): no optimizer save, no log close."""
        self.channel.close()
        self.server.stop(grace=0).wait(5)

    def stop(self) -> None:
        self.channel.close()
        self.proc.stop(checkpoint=True, grace_s=1.0, wait_s=5.0, announce=False)


def group(episode: str, version: int, ticket: str = "") -> pb.EpisodeChunk:
    """One group of 4 completions produced by ``version`` with rewards 0/1 (GRPO has a signal)."""
    comps = [pb.Completion(token_ids=[5 + i, 6, 7], logprobs=[-1.0, -1.5, -2.0], reward=float(i % 2),
                           policy_version=version) for i in range(4)]
    return pb.EpisodeChunk(job_id=JOB, actor_id="llm-a", episode_id=episode, seq=0, task_id="arith",
                           behavior_version=version,
                           group=pb.CompletionGroup(prompt_token_ids=[1, 2, 3], completions=comps, task_id="arith",
                                                    ticket_id=ticket, admitted_version=version))


def optimizer_state(core: LlmLearnerCore) -> tuple[int, dict]:
    return core.algorithm.step, copy.deepcopy(core.algorithm.optimizer.state_dict())


def assert_same_optimizer(core: LlmLearnerCore, saved: tuple[int, dict]) -> None:
    step, want = saved
    got = core.algorithm.optimizer.state_dict()
    assert core.algorithm.step == step > 0
    assert want["state"] and set(got["state"]) == set(want["state"])
    for pid, st in want["state"].items():
        for name, value in st.items():
            assert torch.equal(got["state"][pid][name], value), (pid, name)
    strip = lambda groups: [{k: v for k, v in g.items() if k != "params"} for g in groups]  # noqa: E731
    assert strip(got["param_groups"]) == strip(want["param_groups"])


def segments(state_dir) -> list:
    return sorted((state_dir / "llm").glob("groups-*.log"))


def test_crash_keeps_acknowledged_groups_exactly_once(tmp_path, model_cache):
    state = tmp_path / "learner"
    cfg = _config(state, model_cache)
    a = Served(cfg)
    a.core.optimizer_ckpt.every_s = 1e9                           # no periodic save: checkpoint() below is the last
    tickets = a.core.admit("llm-a", 4, 0).ticket_ids
    assert len(tickets) == 4
    assert a.send(*(group(f"g{i}", 0, t) for i, t in enumerate(tickets))) == [False] * 4
    assert [a.step()["version"], a.step()["version"]] == [1, 2]           # g0..g3 trained
    a.core.checkpoint()                                                   # optimizer saved at step 2 ...
    saved = optimizer_state(a.core)
    assert a.send(group("g4", 2), group("g5", 2)) == [False, False]
    rec = a.step()                                                        # ... then g4, g5 consumed at step 3
    assert (rec["version"], rec["groups"]) == (3, 2)
    dur = a.core.status()["durability"]                                 # all consumed after steps 2 and 3: the
    assert (dur["compacted_segments"], dur["compacted_records"], dur["log_bytes"]) == (2, 6, 0)  # log was compacted
    assert a.send(group("g6", 2), group("g7", 1), group("g8", 3)) == [False] * 3
    assert a.send(group("g6", 2)) == [True]                               # a resend in the same process
    assert a.queued() == ["g6", "g7", "g8"]
    a.crash()
    (log,) = segments(state)
    good = log.stat().st_size
    with open(log, "ab") as fh:                                           # a record torn by the crash
        fh.write(b"FLR1\x00\x10\x00\x00\x00\x00\x00\x00partial")

    b = Served(cfg)
    try:
        st = b.core.status()
        assert (st["version"], st["step"], st["groups_requeued"]) == (3, 3, 3)
        assert b.queued() == ["g6", "g7", "g8"]                           # unconsumed, in log order; g0..g5 not
        assert log.stat().st_size == good                                 # torn tail truncated
        rec = st["durability"]["recovery"]
        assert (rec["ledger_keys"], rec["requeued"], rec["consumed"], rec["skipped"]) == (6, 3, 0, 0)
        opt = st["durability"]["optimizer"]
        assert (opt["restored"], opt["step"], opt["behind_steps"], opt["reason"]) == (True, 2, 1, "ok")
        assert_same_optimizer(b.core, saved)
        # resends: compacted (g0), consumed (g4), re-queued (g6) are duplicates; a new group is stored
        assert b.send(group("g0", 0), group("g4", 2), group("g6", 2), group("g9", 3)) == [True, True, True, False]
        assert b.queued() == ["g6", "g7", "g8", "g9"] and b.core.status()["duplicates"] == 3
        rec = b.step()                                                    # g6 (staleness 1) and g7 (2 > eta: dropped)
        assert (rec["version"], rec["groups"], rec["dropped_stale"], rec["staleness"]) == (4, 1, 1, [1])
        rec = b.step()
        assert (rec["version"], rec["groups"], rec["staleness"]) == (5, 2, [1, 1])
        dur = b.core.status()["durability"]
        assert dur["log_bytes"] == 0 and dur["consumed_low"] == dur["next_index"] == 10
        final = optimizer_state(b.core)
    finally:
        b.stop()                                                          # clean stop: optimizer saved
    c = Served(cfg)
    try:
        st = c.core.status()
        assert (st["version"], st["step"], st["groups_requeued"], st["groups_queued"]) == (5, 5, 0, 0)
        assert st["durability"]["optimizer"]["behind_steps"] == 0
        assert_same_optimizer(c.core, final)
        assert c.send(group("g9", 3), group("g3", 0)) == [True, True]
        assert c.core.status()["durability"]["ledger_bytes"] > 0
    finally:
        c.stop()


def test_crash_around_the_publish(tmp_path, model_cache):
    state = tmp_path / "learner"
    cfg = _config(state, model_cache)
    a = Served(cfg)
    assert a.send(group("g0", 0), group("g1", 0)) == [False, False]

    def disk_full(*_a, **_k):
        raise OSError(28, "No space left on device")

    a.core.weights.publish = disk_full                                   # the step's marker is written, no publish
    with pytest.raises(OSError):
        a.core.train_step(timeout=5)
    a.crash()
    b = Served(cfg)
    try:
        st = b.core.status()
        assert (st["version"], st["step"], st["durability"]["marker"]) == (0, 0, "committed")
        assert b.queued() == ["g0", "g1"]                                 # not published: trained again, not lost
        assert (b.step()["groups"], b.core.version) == (2, 1)
        assert b.send(group("g2", 1), group("g3", 1)) == [False, False]

        def crash_now(step):
            raise SystemExit("killed after the publish, before the commit")

        b.core.journal.commit = crash_now
        with pytest.raises(SystemExit):
            b.core.train_step(timeout=5)
        assert b.core.version == 2
    finally:
        b.crash()
    c = Served(cfg)
    try:
        st = c.core.status()
        assert (st["version"], st["step"], st["durability"]["marker"], st["groups_requeued"]) == (2, 2, "pending", 0)
        assert c.send(group("g2", 1), group("g1", 0), group("g4", 2)) == [True, True, False]
        assert c.queued() == ["g4"]
    finally:
        c.stop()


def test_corrupt_optimizer_checkpoint_and_marker(tmp_path, model_cache, events):
    state = tmp_path / "learner"
    cfg = _config(state, model_cache)
    a = Served(cfg)
    a.core.optimizer_ckpt.every_s = 0                                    # a background save after every step
    assert a.send(*(group(f"g{i}", 0) for i in range(4))) == [False] * 4
    a.step()
    a.core.optimizer_ckpt.wait(30)
    found = load_latest(state / "llm" / "optimizer")
    assert found is not None and found[0] == 1 and a.core.optimizer_ckpt.saves == 1
    for pid, st in a.core.algorithm.optimizer.state_dict()["state"].items():   # the snapshot of that step
        assert all(torch.equal(found[1]["optimizer"]["state"][pid][k], v) for k, v in st.items())
    a.stop()
    assert a.core.optimizer_ckpt.saves == 1                               # unchanged since: stop wrote nothing
    ckpts = sorted((state / "llm" / "optimizer").glob("ckpt-*"))
    assert ckpts
    for folder in ckpts:
        (folder / "tensors.safetensors").write_bytes(b"not a safetensors file")
    (state / "llm" / "consumed.json").write_text("{torn")
    b = Served(cfg)
    try:
        st = b.core.status()
        assert st["version"] == 1 and st["step"] == 1
        assert st["durability"]["optimizer"]["restored"] is False
        assert not b.core.algorithm.optimizer.state_dict()["state"]      # fresh optimizer
        assert st["durability"]["marker"] == "unreadable"
        assert b.queued() == ["g0", "g1", "g2", "g3"]                     # at least once, never lost
        text = "\n".join(events)
        assert "event=optimizer_fresh" in text and "event=consumed_marker_unusable" in text
        assert b.step()["groups"] == 2                                    # training goes on
        assert b.core.algorithm.optimizer.state_dict()["state"]
    finally:
        b.stop()


# -- the journal alone (pure: files only) -----------------------------------------------------------
def test_consumed_set():
    from learner.llm.durability import Consumed
    c = Consumed()
    for i in (2, 0, 5):
        c.add(i)
    assert (c.low, c.extra, 1 in c, 2 in c) == (1, {2, 5}, False, True)
    c.add(1)
    assert (c.low, c.extra) == (3, {5})
    c.advance_to(5)
    assert (c.low, c.extra) == (6, set())
    assert Consumed.from_json(c.to_json()) == c
    with pytest.raises(ValueError, match="consumed.low"):
        Consumed.from_json({"low": -1})


def test_journal_rotates_compacts_and_survives_a_failed_append(tmp_path):
    from learner.llm.durability import GroupJournal
    root = tmp_path / "llm"

    def opened(latest_step: int) -> tuple[GroupJournal, list]:
        j = GroupJournal(root, key_of=lambda p: (p.decode()[:2], 0), segment_bytes=64)
        j.load_marker(latest_step)
        return j, [(r.index, r.key[0], r.consumed) for r in j.replay()]

    j, items = opened(0)
    assert items == [] and j.marker_note == "fresh"
    assert [j.append(f"a{i}".encode() * 10, (f"a{i}", 0)) for i in range(2)] == [0, 1]  # 2 x 32-byte records
    j.mark_consumed([0])
    j.prepare(1)
    j.commit(1)                                   # segment full (64 bytes): rotated, not compacted (a1 unconsumed)
    assert j.stats()["segments"] == 1 and j.append(b"a2" * 10, ("a2", 0)) == 2
    assert [p.name for p in segments(tmp_path)] == ["groups-0000000000000000.log", "groups-0000000000000002.log"]
    j.mark_consumed([1])
    j.prepare(2)
    j.commit(2)                                   # low = 2: segment 0 compacted into the ledger
    assert [p.name for p in segments(tmp_path)] == ["groups-0000000000000002.log"]
    assert (j.compacted_segments, j.compacted_records) == (1, 2)

    j, items = opened(2)                          # restart: ledger keys, then the live record
    assert items == [(-1, "a0", True), (-1, "a1", True), (2, "a2", False)] and j.marker_note == "pending"
    assert j.append(b"a3", ("a3", 0)) == 3

    def fail(payload):
        raise OSError(28, "No space left on device")

    j._active.append = fail
    with pytest.raises(OSError):
        j.append(b"a4", ("a4", 0))
    assert j.append(b"a4", ("a4", 0)) == 4        # the index was not used; writing moved to a fresh segment
    assert segments(tmp_path)[-1].name == "groups-0000000000000004.log"
    j.close()
    j, items = opened(2)
    assert [i[:2] for i in items] == [(-1, "a0"), (-1, "a1"), (2, "a2"), (3, "a3"), (4, "a4")]
    (root / "consumed.json").write_text('{"pending": {"step": 9, "low": 5}}')   # ahead of every published step
    j, items = opened(2)
    assert j.marker_note == "unreadable" and [i[2] for i in items if i[0] >= 0] == [False] * 3
