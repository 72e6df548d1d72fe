"""The learner slower than the fleet.

1. A learner throttled to 4 updates/s with a 1 MiB memory budget (its own process) and four fast
   actors on the real runtime: the online ring evicts steps nobody trained on, acks ask for backoff
   (memory pressure), the actors honour it and the backpressure reaches their control loops (their
   spools fill to their cap, the producer blocks instead of dropping); the share of received steps
   wasted (evicted unsampled) falls; buffer bytes stay within the budget (gauge, every scrape);
   every step received is stored or counted as dropped with a reason; every acknowledged chunk is
   in the ingest log, once.
2. Per-actor rate limits: acks carry growing backoff hints past the actor's rate; an actor that
   ignores them is refused with RESOURCE_EXHAUSTED naming it and the rate (counted as
   rate_limited, nothing stored); the real sender meeting that refusal backs off and resends,
   keeping every chunk.
"""

from __future__ import annotations

import threading
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from actor.main import robot_specs
from fleetloop.client.runtime import FleetClient
from fleetloop.v1 import fleetloop_pb2 as pb
from learner.config import LearnerConfig
from learner.process import build_learner
from tests.chaos.procs import LearnerProc, ProcGroup, read_ingest_log, wait_for, write_summary
from tests.helpers.chunks import robot_chunk

TASKS = ["reach-v3"]
MD = (("authorization", "Bearer tok"),)
BUDGET_MB = 1.0
SPOOL_CAP = 40 * 9_000  # bytes: about 40 chunks of 50 steps


class FastActor(threading.Thread):
    """A fleet member on the real actor runtime (FleetClient, spool, sender) that records random
    50-step chunks as fast as it can, one step in three taken by the 'operator'. Its spool is capped
    like a robot's disk: when full, recording blocks (the robot waits) rather than dropping data."""

    def __init__(self, target: str, actor_id: str, spool_dir: Path, seed: int) -> None:
        super().__init__(daemon=True, name=actor_id)
        obs, act = robot_specs()
        self.client = FleetClient(target, "demo", actor_id, obs, act, TASKS, credential="tok", spool_dir=str(spool_dir))
        self.client.spool.max_bytes = SPOOL_CAP
        self.seed, self.stop_flag, self.error = seed, threading.Event(), None
        self.acked: list[tuple[str, int]] = []
        self.max_spool_bytes = 0
        inner = self.client._on_ack

        def on_ack(ack):
            self.acked.append((ack.episode_id, int(ack.seq)))
            inner(ack)
        self.client.sender.on_ack = on_ack

    def run(self) -> None:
        try:
            self.client.connect()
            rng = np.random.default_rng(self.seed)
            obs = rng.standard_normal((200, 39)).astype(np.float32)
            act = rng.uniform(-1, 1, (200, 4)).astype(np.float32)
            while not self.stop_flag.is_set():
                ep = self.client.begin_episode("reach-v3")
                for t in range(200):
                    if self.stop_flag.is_set():
                        return  # the open episode's spooled chunks stay valid; nothing else is sent
                    ep.record(obs[t], act[t], 0.0, intervened=t % 3 == 0)
                    self.max_spool_bytes = max(self.max_spool_bytes, self.client.spool.bytes)
                ep.end("success")
        except BaseException as exc:  # surfaced by the test
            self.error = exc


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "job")))] = s.value
    return out


def total(samples: dict, name: str, **labels) -> float:
    want = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == name and want <= set(lab))


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


@pytest.mark.timeout(300)
def test_slow_learner_tight_budget_fast_fleet(tmp_path):
    state = tmp_path / "learner"
    cfg = LearnerConfig(state_dir=state, tasks=TASKS, robot_tokens=["tok"], metrics_port=0, chunk_steps=50,
                        batch_size=32, max_updates_per_s=4, publish_every=10_000, memory_budget_mb=BUDGET_MB,
                        max_message_bytes=32 * 1024, max_backoff_ms=2000)
    cfg_path = tmp_path / "learner.json"
    cfg_path.write_text(cfg.model_dump_json())
    procs = ProcGroup()
    actors: list[FastActor] = []
    samples: list[dict] = []
    try:
        lp = procs.add(LearnerProc(cfg_path, tmp_path / "final.json", tmp_path / "learner.log"))
        addr = lp.wait_ready()
        rss0 = rss_bytes(addr["pid"])
        budget = int(BUDGET_MB * (1 << 20))
        inflight_limit = 4 * cfg.serving.max_message_bytes
        capacity = (budget - inflight_limit) // (4 * 43 + 37 + 8 + 1)
        actors = [FastActor(f"127.0.0.1:{addr['port']}", f"fast-{i}", tmp_path / f"spool-{i}", seed=i) for i in range(4)]
        for a in actors:
            a.start()

        def sample():
            m = scrape(addr["metrics_port"])
            samples.append({"received": total(m, "fleetloop_learner_received_steps_total"),
                            "wasted": total(m, "fleetloop_learner_dropped_samples_total", reason="evicted_unsampled"),
                            "updates": total(m, "fleetloop_learner_steps_total"),
                            "buffer_bytes": total(m, "fleetloop_learner_buffer_bytes"),
                            "inflight_bytes": total(m, "fleetloop_learner_ingest_inflight_bytes"),
                            "pressure_acks": total(m, "fleetloop_learner_backoff_acks_total", reason="memory_pressure"),
                            "rss": rss_bytes(addr["pid"])})
            s = samples[-1]
            return (s["updates"] >= 60 and s["received"] >= 4 * capacity
                    and all(a.client.sender.backoff_acks >= 3 for a in actors))
        wait_for(sample, 150, "the fleet throttled by a slow learner for 60 updates", interval=0.25, alive=[lp])
        rss1 = rss_bytes(addr["pid"])
    finally:
        for a in actors:
            a.stop_flag.set()
        for a in actors:
            a.join(30)
            a.client.close(flush_timeout=0)
        procs.cleanup()  # SIGTERM: the learner checkpoints and writes its final report
    final = lp.final()
    for a in actors:
        assert a.error is None, a.error
    # -- the fleet slowed down: hints sent and honoured, backpressure reached the producers ---------
    for a in actors:
        s = a.client.sender
        assert s.backoff_acks > 0 and s.rejected == 0, (a.name, s.backoff_acks, s.rejected)
        assert 0.7 * SPOOL_CAP <= a.max_spool_bytes <= SPOOL_CAP, (a.name, a.max_spool_bytes)
    assert samples[-1]["pressure_acks"] > 0
    # the early window: from the last sample before the buffer filled to the first with 3 buffers
    # received. It must span at least one sampling interval: a fast ingest path fills 3 buffers
    # between two samples 0.25 s apart, and a window starting at the first full sample was then empty
    # (rate 0).
    first_full = max(0, next(i for i, s in enumerate(samples) if s["received"] >= capacity) - 1)
    early_end = next((i for i, s in enumerate(samples) if s["received"] >= 3 * capacity), len(samples) - 1)
    early_end = max(early_end, first_full + 1)
    late_start = next(i for i, s in enumerate(samples) if s["updates"] >= 0.75 * samples[-1]["updates"])

    def waste(a: int, b: int) -> float:
        return (samples[b]["wasted"] - samples[a]["wasted"]) / max(1.0, samples[b]["received"] - samples[a]["received"])

    def per_update(a: int, b: int) -> float:
        return (samples[b]["received"] - samples[a]["received"]) / max(1.0, samples[b]["updates"] - samples[a]["updates"])
    early_waste, late_waste = waste(first_full, early_end), waste(late_start, len(samples) - 1)
    early_rate, late_rate = per_update(first_full, early_end), per_update(late_start, len(samples) - 1)
    assert late_rate < 0.25 * early_rate, (early_rate, late_rate)      # steps received per learner update
    assert late_waste < 0.75 * early_waste, (early_waste, late_waste)  # share of received steps evicted unseen
    # -- memory stayed within the budget ----------------------------------------------------------
    mem = final["status"]["memory"]
    assert mem["budget_bytes"] == budget and mem["inflight_limit_bytes"] == inflight_limit
    assert mem["online_capacity"] == capacity
    peak_buffer = max(s["buffer_bytes"] for s in samples)
    assert peak_buffer + inflight_limit <= budget, (peak_buffer, inflight_limit, budget)
    assert mem["buffer_bytes"] + mem["inflight_peak_bytes"] <= budget
    assert max(s["inflight_bytes"] for s in samples) <= inflight_limit
    # -- nothing dropped silently: received = in the buffer + dropped (with a reason) -------------
    metrics = {(m["name"], tuple(sorted((k, v) for k, v in m["labels"].items() if k != "job"))): m["value"]
               for m in final["metrics"]}
    received = total(metrics, "fleetloop_learner_received_steps_total")
    dropped = {lab[0][1]: v for (n, lab), v in metrics.items()
               if n == "fleetloop_learner_dropped_samples_total" and lab[0][1] != "stale_at_training"}
    in_buffer = final["status"]["tasks"]["reach-v3"]["online_buffer"]
    assert received == in_buffer + sum(dropped.values()), (received, in_buffer, dropped)
    assert dropped["evicted_unsampled"] > 0 and dropped["evicted_ineligible"] > 0
    # -- every acknowledged chunk is in the ingest log, once ---------------------------------------
    log = read_ingest_log(state / "ingest.log")
    acked = {k for a in actors for k in a.acked}
    assert acked <= log.keys and log.duplicates() == 0
    assert log.steps == received and final["audit"]["duplicates_stored"] == 0
    write_summary("backpressure", {
        "budget_bytes": budget, "inflight_limit_bytes": inflight_limit, "online_capacity_steps": capacity,
        "peak_buffer_bytes": peak_buffer, "peak_inflight_bytes": mem["inflight_peak_bytes"],
        "learner_rss_growth_bytes": rss1 - rss0, "learner_rss_bytes": rss1, "actors": len(actors),
        "received_steps": received, "dropped_steps": dropped, "acked_chunks": len(acked),
        "backoff_acks": {a.name: a.client.sender.backoff_acks for a in actors},
        "max_backoff_ms_seen": max(a.client.sender.backoff_ms_max for a in actors),
        "wasted_share_early": early_waste, "wasted_share_late": late_waste,
        "received_per_update_early": early_rate, "received_per_update_late": late_rate,
        "learner_updates": samples[-1]["updates"]})


@pytest.fixture()
def rate_limited_learner(tmp_path):
    # soft bucket: 50 steps/s, 200 deep; hard: 100 steps/s, 400 deep
    cfg = LearnerConfig(state_dir=tmp_path / "learner", tasks=TASKS, robot_tokens=["tok"], chunk_steps=50,
                        max_actor_steps_per_s=50, actor_burst_s=4.0, actor_hard_factor=2.0, max_updates_per_s=10)
    impl = build_learner(cfg.model_dump_json()).serve()
    yield impl
    impl.stop()


@pytest.mark.timeout(120)
def test_rate_limit_hints_refuses_the_deaf_and_the_sender_keeps_its_chunks(rate_limited_learner, tmp_path):
    impl = rate_limited_learner
    target = f"127.0.0.1:{impl.port}"
    obs, act = robot_specs()
    reg = impl.core.metrics.registry

    def rejected_rate_limited() -> float:
        return reg.get_sample_value("fleetloop_learner_rejected_chunks_total", {"job": "demo", "reason": "rate_limited"}) or 0
    # the real actor: connected, six chunks spooled, its sender not started yet
    client = FleetClient(target, "demo", "arm-7", obs, act, TASKS, credential="tok", spool_dir=str(tmp_path / "spool"),
                         send_experience=False)
    client.connect()
    for seq in range(6):
        client.spool.put("ep-arm", seq, robot_chunk("demo", "arm-7", "ep-arm", seq, 0, n=50,
                                                    end=1 if seq == 5 else None).SerializeToString())
    ch = grpc.insecure_channel(target)
    try:
        # an actor that ignores backoff hints, under the same actor id: 20 chunks of 50 steps at once
        raw = ch.stream_stream("/fleetloop.v1.Learner/StreamExperience", request_serializer=lambda b: b,
                               response_deserializer=pb.Ack.FromString)
        call = raw(iter([robot_chunk("demo", "arm-7", "ep-deaf", i, 0, n=50).SerializeToString() for i in range(20)]),
                   metadata=MD, timeout=30)
        hints = []
        with pytest.raises(grpc.RpcError) as info:
            for ack in call:
                hints.append(ack.backoff_ms)
        passed = len(hints)
        assert 8 <= passed < 20, hints                               # the hard bucket holds 8 chunks (plus its refill)
        assert hints[:4] == [0, 0, 0, 0] and max(hints) >= 1000 and max(hints) <= 5000, hints
        err = info.value
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "'arm-7'" in err.details() and "100 steps/s" in err.details() and "max_actor_steps_per_s 50" in err.details()
        assert 0 < int(dict(err.trailing_metadata())["grpc-retry-pushback-ms"]) <= 501
        assert rejected_rate_limited() == 1
        assert impl.core.replay.size("reach-v3", "online") == passed * 50   # the refused chunk was not stored
        assert not impl.core.ingestor.ledger.seen("arm-7", "ep-deaf", passed)
        # the real sender meets the same exhausted bucket: it backs off, resends, and loses nothing
        client.sender.start()
        assert client.flush(60), "the rate-limited actor's spool did not drain"
        s = client.sender
        assert s.throttled >= 1 and s.rejected == 0 and s.backoff_acks >= 1, (s.throttled, s.rejected, s.backoff_acks)
        assert not list((tmp_path / "spool" / "rejected").glob("*.chunk"))
        assert rejected_rate_limited() >= 2
        assert reg.get_sample_value("fleetloop_learner_backoff_acks_total", {"job": "demo", "reason": "actor_rate"}) >= 2
        audit = impl.core.audit()
        assert audit["stored_steps"]["reach-v3"] == passed * 50 + 6 * 50 and audit["duplicates_stored"] == 0
        log_keys = read_ingest_log(Path(impl.core.cfg.state_dir) / "ingest.log").keys
        assert {("ep-arm", i) for i in range(6)} <= log_keys and ("ep-deaf", passed) not in log_keys
    finally:
        client.close(flush_timeout=0)
        ch.close()


def test_fast_actor_spool_cap_blocks_recording(tmp_path):
    """The test's own producer: a full spool blocks recording (nothing is dropped) until an ack."""
    from fleetloop.client.spool import Spool
    spool = Spool(tmp_path / "s", max_bytes=100)
    spool.put("e", 0, b"x" * 80)
    with pytest.raises(TimeoutError):
        spool.put("e", 1, b"y" * 80, timeout=0.2)
    threading.Timer(0.2, lambda: spool.ack(spool.next_after(-1, 0.1))).start()
    spool.put("e", 1, b"y" * 80, timeout=30)  # returns once the first chunk is acknowledged
    assert len(spool) == 1 and spool.next_after(-1, 0.1).seq == 1
