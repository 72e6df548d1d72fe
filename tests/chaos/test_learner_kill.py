"""Chaos 2: SIGKILL the learner under load (two robot processes streaming), restart it on the same
port with the same state folder, leave the robots alone.

The learner runs as its own process (``tests.chaos.learner_process``: the Ray actor's body, no Ray
around it); the robots are the real ``fleetloop actor`` with a journal (``tests.chaos.actor_process``).

Holds:
- the robots keep recording into their spools while the learner is down and reconnect by
  themselves (an ack from the new process reaches each), then follow new versions (they run a
  version published after the restart);
- no acknowledged chunk is lost: every chunk a robot saw acknowledged before the kill is in the log
  prefix the killed process left, and every chunk a robot spooled is in the final log exactly once;
- none is duplicated: 0 duplicate log records, 0 duplicate (episode, step) pairs in the buffers;
  every step of the log is either in the buffers or counted as dropped with a reason;
- the restart copes with a half-written log record (truncated, later appends readable), an
  unfinished checkpoint temp folder (removed) and a torn newest checkpoint (skipped for the newest
  intact one);
- versions keep increasing: the versions that existed at the kill keep their digests, every version
  the new process publishes is newer than all of them;
- staleness stays accounted: the autonomous staleness trained on after the restart is within the
  configured bound, no chunk claims a version newer than the learner's (no ``future_version``
  drops, no refused chunks), and the robots' behaviour versions never exceed the learner's.
"""

from __future__ import annotations

import shutil
import time

import pytest

from learner.config import LearnerConfig
from tests.chaos.procs import (ActorProc, LearnerProc, ProcGroup, free_port, journal_chunks, read_ingest_log,
                               versions_on_disk, wait_for, write_summary)

pytestmark = [pytest.mark.timeout(420)]
TASKS = ["reach-v3", "push-v3"]
ACTORS = ["chaos-r1", "chaos-r2"]


def _dropped(metrics: list[dict]) -> dict[str, float]:
    """Samples dropped before storing, by reason (training-time drops excluded)."""
    out: dict[str, float] = {}
    for m in metrics:
        if m["name"] == "fleetloop_learner_dropped_samples_total" and m["labels"]["reason"] != "stale_at_training":
            out[m["labels"]["reason"]] = out.get(m["labels"]["reason"], 0.0) + m["value"]
    return out


def test_learner_sigkill_under_load_then_restart_same_port(tmp_path):
    state = tmp_path / "learner"
    cfg = LearnerConfig(state_dir=state, port=free_port(), tasks=TASKS, chunk_steps=20, max_episode_steps=100, batch_size=64,
                        publish_every=5, max_updates_per_s=10, checkpoint_every_s=2,
                        algorithm_params={"train_on": "all"})  # autonomous frames are trained on: the bound is exercised
    cfg_path = tmp_path / "learner.json"
    cfg_path.write_text(cfg.model_dump_json())
    procs = ProcGroup()
    try:
        first = procs.add(LearnerProc(cfg_path, tmp_path / "final-1.json", tmp_path / "learner-1.log"))
        first.wait_ready()
        robots = [procs.add(ActorProc(a, tmp_path / f"{a}.jsonl",
                                      ["--learner", f"127.0.0.1:{cfg.serving.port}", "--job", "demo", "--actor-id", a,
                                       "--tasks", ",".join(TASKS), "--spool", str(tmp_path / f"spool-{a}"), "--hz", "50",
                                       "--seed", str(10 + i), "--operator", "scripted"], tmp_path / f"{a}.log"))
                  for i, a in enumerate(ACTORS)]

        def acks(r, after: float = 0.0):
            return [x for x in r.records() if x["ev"] == "ack" and x["t"] > after]
        # past version bound + 2, so replaying the log after the restart finds stale chunks too
        wait_for(lambda: all(len(acks(r)) >= 10 for r in robots) and max(versions_on_disk(state), default=0) >= 12, 180,
                 "both robots acknowledged and version >= 12", alive=[first, *robots])

        # -- kill -9 under load ------------------------------------------------------------------
        first.kill9()
        t_kill = time.time()
        acked_before = {(x["episode"], x["seq"]) for r in robots for x in acks(r) if x["t"] <= t_kill}
        log_at_kill = read_ingest_log(state / "ingest.log")
        versions_at_kill = versions_on_disk(state)
        v_kill = max(versions_at_kill)
        # the robots keep recording into their spools while nobody listens
        wait_for(lambda: all(sum(1 for x in r.records() if x["ev"] == "put" and x["t"] > t_kill + 0.5) >= 2 for r in robots),
                 60, "robots spool during the outage", alive=robots)

        # what else a kill (or a power loss) can leave in the state folder: a half-written log record,
        # a checkpoint temp folder never renamed, a torn newest checkpoint; the restart must cope
        ckpts = sorted(p for p in (state / "checkpoints").glob("ckpt-*") if p.is_dir())
        assert ckpts, "the killed learner had checkpointed"
        intact_step = int(ckpts[-1].name.split("-")[1])
        torn_ckpt = state / "checkpoints" / f"ckpt-{intact_step + 1:012d}"
        shutil.copytree(ckpts[-1], torn_ckpt)
        blob = (torn_ckpt / "tensors.safetensors").read_bytes()
        (torn_ckpt / "tensors.safetensors").write_bytes(blob[:len(blob) // 2])
        partial = state / "checkpoints" / f".tmp-ckpt-{intact_step + 2:012d}-999999"
        partial.mkdir()
        (partial / "tensors.safetensors").write_bytes(blob[:100])
        log_bytes = (state / "ingest.log").read_bytes()
        with open(state / "ingest.log", "ab") as fh:  # the first half of a copy of the first record
            fh.write(log_bytes[:12 + (int.from_bytes(log_bytes[4:8], "little") // 2)])

        # -- restart: same port, same state folder; robots untouched -------------------------------
        t_up0 = time.time()
        second = procs.add(LearnerProc(cfg_path, tmp_path / "final-2.json", tmp_path / "learner-2.log"))
        ready = second.wait_ready()
        t_up = time.time()
        # read from what start-up restored: the server and the training thread are already running at
        # READY, so the live step/version/steps_total may have moved on (a CI run saw step 44 for 43)
        restored = ready["restored"]
        assert restored["version"] == v_kill, "the version counter continues from disk"
        assert restored["replayed_steps"] == sum(r.steps for r in log_at_kill.records), "the torn log tail is not replayed"
        assert restored["checkpoint_step"] == intact_step, "restored from the newest intact checkpoint, the torn one skipped"
        assert not partial.exists(), "the unfinished checkpoint's temp folder is removed"
        wait_for(lambda: all(acks(r, t_up0) for r in robots), 90, "every robot reconnected by itself",
                 alive=[second, *robots])
        reconnect_s = {r.name: round(acks(r, t_up0)[0]["t"] - t_up, 3) for r in robots}
        wait_for(lambda: all(any(x["ev"] == "put" and x["version"] > v_kill for x in r.records()) for r in robots), 120,
                 "every robot runs a version published after the restart", alive=[second, *robots])

        # -- orderly end: robots flush and exit 0, the learner checkpoints and reports ------------
        codes = [r.stop(timeout=90) for r in robots]
        assert codes == [0, 0], "a robot could not drain its spool:\n" + "\n".join(r.tail() for r in robots)
        assert second.stop(timeout=60) == 0, second.tail()
        final = second.final()

        records = [x for r in robots for x in r.records()]
        sent = journal_chunks(records)
        acked = set(journal_chunks(records, "ack"))
        log = read_ingest_log(state / "ingest.log")

        # no acknowledged chunk lost; nothing stored twice; nothing stored that was not sent
        assert acked_before <= log_at_kill.keys, "an ack was sent before the chunk was durable"
        assert log.duplicates() == 0
        assert set(sent) == log.keys, (sorted(set(sent) - log.keys)[:5], sorted(log.keys - set(sent))[:5])
        assert acked <= set(sent)
        assert not [x for x in records if x["ev"] == "reject"]
        audit = final["audit"]
        assert audit["duplicates_stored"] == 0
        expected: dict[str, set[int]] = {}
        for r in log.records:
            expected.setdefault(r.episode_id, set()).update(range(r.first_step, r.first_step + r.steps))
        buffered = 0
        for task in TASKS:
            for ep, rec in final["buffer"][task].items():
                assert len(rec["steps"]) == len(set(rec["steps"])) and set(rec["steps"]) <= expected[ep], ep
                buffered += len(rec["steps"])
        dropped = _dropped(final["metrics"])
        assert buffered == sum(audit["stored_steps"].values())
        assert buffered + sum(dropped.values()) == log.steps, ("every logged step is stored or counted dropped", dropped)

        # versions: old digests untouched, new versions newer, strictly increasing
        final_versions = {v["version"]: v["sha256"] for v in final["versions"]}
        assert all(final_versions[v] == sha for v, sha in versions_at_kill.items())
        new_versions = sorted(set(final_versions) - set(versions_at_kill))
        assert new_versions and new_versions[0] == v_kill + 1 and new_versions == list(range(v_kill + 1, max(final_versions) + 1))
        # staleness: within the bound after the restart; no robot ever ahead of the learner
        status = final["status"]
        assert status["step"] > ready["step"], "the restarted learner trained"
        assert 0 <= status["staleness_max_autonomous"] <= status["staleness_bound"]
        assert dropped.get("future_version", 0) == 0 and status["gate"]["train_samples"]["dropped_future_version"] == 0
        assert max(x["version"] for x in sent.values()) <= max(final_versions)
        # staleness at ingest of what the new process acknowledged (ack's learner version - behaviour version)
        ingest_staleness = [x["lv"] - sent[(x["episode"], x["seq"])]["version"] for x in records
                            if x["ev"] == "ack" and x["t"] > t_up0]
        assert min(ingest_staleness) >= 0

        write_summary("learner_kill", {
            "definition": "acked = chunks a robot saw acknowledged (journal); stored = the learner's ingest log records "
                          "and replay-buffer steps; lost = acked before the kill but missing after the restart",
            "actors": len(robots), "chunks_sent": len(sent), "steps_sent": sum(x["steps"] for x in sent.values()),
            "chunks_acked": len(acked), "chunks_acked_before_kill": len(acked_before),
            "steps_acked": sum(sent[k]["steps"] for k in acked), "steps_acked_before_kill": sum(sent[k]["steps"] for k in acked_before),
            "chunks_durable_at_kill": len(log_at_kill.records), "chunks_stored": len(log.records), "steps_stored_log": log.steps,
            "steps_in_buffers": buffered, "steps_dropped_by_reason": dropped,
            "duplicates_stored": log.duplicates() + audit["duplicates_stored"],
            "lost": len(acked_before - log.keys),
            "resent_recognised_as_duplicates": sum(1 for x in records if x["ev"] == "ack" and x["dup"]),
            "version_at_kill": v_kill, "first_version_after_restart": new_versions[0], "final_version": max(final_versions),
            "versions_reused": 0, "staleness_bound": status["staleness_bound"],
            "max_autonomous_staleness_after_restart": status["staleness_max_autonomous"],
            "max_ingest_staleness_after_restart": max(ingest_staleness),
            "staleness_histogram_samples_after_restart": next(m["value"] for m in final["metrics"]
                                                              if m["name"] == "fleetloop_learner_staleness_versions_count"),
            "reconnect_seconds_info_only": reconnect_s, "outage_seconds_info_only": round(t_up - t_kill, 3),
        })
    finally:
        procs.cleanup()
