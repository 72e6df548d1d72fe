"""Release channels end to end (issue 21): a real learner (build_learner(...).serve(): gRPC, training
thread, weight store) with ``rollout: canary`` and a fleet of fake-but-real-wire robots: each one
handshakes, subscribes to weights (real SubscribeWeights stream), fetches and verifies the version it
is announced (real FetchWeights), and streams episodes (real StreamExperience) whose outcome depends
on those weights: a policy whose output bias carries the test's perturbation (|bias| > 20, the
"broken" marker) succeeds 10 % of the time, any other 90 %.

The test lets the learner promote a good version, then perturbs the learner's training weights and
publishes them (the broken candidate; training goes on from them, so every later version is broken
too until the rollback retrains from stable). It checks: the canary cohort runs the broken candidate,
the learner rolls it back after N <= max_episodes canary episodes (N printed), the stable cohort is
never announced a broken version and never streams an episode with one, training goes on throughout
(learner steps increase in every phase), a following good version is promoted, and the release state
survives a learner restart."""

from __future__ import annotations

import queue
import random
import threading
import time

import grpc
import pytest
import torch

from fleetloop.codec import PROTOCOL_VERSION
from fleetloop.v1 import fleetloop_pb2 as pb
from fleetloop.v1 import fleetloop_pb2_grpc as pb_grpc
from fleetloop.weights import load_verified
from learner.config import LearnerConfig
from learner.process import build_learner
from learner.specs import to_proto_specs
from tests.helpers.chunks import robot_chunk
from tests.integration.helpers import wait_until

pytestmark = pytest.mark.timeout(420)

JOB, TASKS = "rel", ["reach-v3", "push-v3"]
CANARY, STABLE = ["canary-0", "canary-1"], ["stable-0", "stable-1"]
MARK = 20.0  # |net.4.bias| above this = the test's perturbation


def _broken(state: dict) -> bool:
    return float(state["net.4.bias"].abs().max()) > MARK


class FakeRobot(threading.Thread):
    """Real wire, fake world: see the module docstring. Swaps weights only between episodes."""

    def __init__(self, target: str, actor: str, cfg: LearnerConfig, seed: int) -> None:
        super().__init__(daemon=True, name=actor)
        self.actor, self.cfg, self.rng = actor, cfg, random.Random(seed)
        self.channel = grpc.insecure_channel(target)
        self.stub = pb_grpc.LearnerStub(self.channel)
        self.announced: list[tuple[int, str]] = []   # (version, channel) of every announcement
        self.ran: list[tuple[int, bool]] = []        # (version, broken) of every episode streamed
        self.health: dict[int, bool] = {}            # version -> broken, as fetched and verified
        self.stop_flag, self.error = threading.Event(), None
        self._latest: pb.WeightAnnouncement | None = None

    def _subscribe(self) -> None:
        try:
            for ann in self.stub.SubscribeWeights(pb.SubscribeRequest(job_id=JOB, actor_id=self.actor)):
                self.announced.append((ann.version, ann.channel))
                self._latest = ann
        except grpc.RpcError:
            pass

    def _fetch(self, ann: pb.WeightAnnouncement) -> bool:
        if ann.version not in self.health:
            blob = b"".join(c.data for c in self.stub.FetchWeights(
                pb.FetchRequest(job_id=JOB, actor_id=self.actor, version=ann.version), timeout=30))
            self.health[ann.version] = _broken(load_verified(blob, ann.sha256))
        return self.health[ann.version]

    def run(self) -> None:
        outbox: queue.Queue = queue.Queue()
        try:
            hs = self.stub.Handshake(pb.HandshakeRequest(
                protocol_version=PROTOCOL_VERSION, job_id=JOB, actor_id=self.actor, kind=pb.ROBOT, tasks=TASKS,
                observation_specs=to_proto_specs(self.cfg.observation_specs),
                action_specs=to_proto_specs(self.cfg.action_specs)), timeout=30)
            self._latest = hs.current_policy
            threading.Thread(target=self._subscribe, daemon=True).start()
            acks = self.stub.StreamExperience(iter(outbox.get, None))
            n = 0
            while not self.stop_flag.is_set():
                ann = self._latest  # the version to run this episode (swaps only here, between episodes)
                broken = self._fetch(ann)
                ok = self.rng.random() < (0.1 if broken else 0.9)
                chunk = robot_chunk(JOB, self.actor, f"{self.actor}-{n}", 0, ann.version, n=10, task=TASKS[n % 2],
                                    end=pb.SUCCESS if ok else pb.FAILURE, interventions=0 if ok else 5)
                outbox.put(chunk)
                ack = next(acks)
                assert ack.episode_id == chunk.episode_id
                self.ran.append((ann.version, broken))
                n += 1
                time.sleep(0.03)
        except Exception as exc:  # surfaced by the test
            if not self.stop_flag.is_set():
                self.error = exc
        finally:
            outbox.put(None)
            self.channel.close()


def _wait(what: str, cond, timeout: float, robots=()) -> None:
    wait_until(what, cond, timeout, robots, poll_s=0.1)


def _config(tmp_path) -> LearnerConfig:
    return LearnerConfig(
        job_id=JOB, state_dir=tmp_path / "state", tasks=TASKS, device="cpu", seed=3,
        serving={"host": "127.0.0.1", "port": 0},
        optimisation={"batch_size": 32, "publish_every": 10, "max_updates_per_s": 25, "checkpoint_every_s": 1e6},
        episodes={"max_episode_steps": 10},
        rollout={"strategy": "canary", "canary_actors": CANARY, "min_episodes": 10, "max_episodes": 60,
                 "retrain_from_stable_on_rollback": True})


def test_canary_rolls_back_a_broken_version_and_promotes_the_next_good_one(tmp_path, capsys):
    cfg = _config(tmp_path)
    impl = build_learner(cfg).serve()
    core, rm = impl.core, impl.core.releases
    robots = [FakeRobot(f"127.0.0.1:{impl.port}", a, cfg, seed=i) for i, a in enumerate(CANARY + STABLE)]
    try:
        for r in robots:
            r.start()
        history = lambda: rm.snapshot()["history"]  # noqa: E731
        # 1. a good version is judged and promoted
        _wait("a first promotion", lambda: any(h["decision"] == "promoted" for h in history()), 120, robots)
        # 2. the broken candidate: no window open, then the perturbed training weights published
        core.set_paused(True)
        _wait("no open window", lambda: rm.candidate is None and not rm.retraining, 120, robots)
        with core._train_lock:
            with torch.no_grad():
                core.algorithm.policy.state_dict()["net.4.bias"].add_(50.0)
            broken = core.publish()
        stable_then = rm.stable
        assert rm.candidate == broken and stable_then is not None and stable_then < broken
        core.set_paused(False)
        step_at_broken = core.step
        _wait("the broken candidate's decision", lambda: any(h["candidate"] == broken for h in history()), 120, robots)
        entry = next(h for h in history() if h["candidate"] == broken)
        assert (entry["decision"], entry["by"], entry["stable"]) == ("rolled_back", "auto", stable_then), entry
        n_canary = entry["episodes"]["canary"]
        with capsys.disabled():
            print(f"\nbroken v{broken} rolled back after N = {n_canary} canary episodes ({entry['episodes']['stable']} "
                  f"stable); p_not_worse {entry['p_not_worse']}; reason: {entry['reason']}")
        assert cfg.rollout.min_episodes <= n_canary <= cfg.rollout.max_episodes
        _wait("the retrain from stable", lambda: not rm._holding and rm.floor > broken, 60, robots)
        retrained = rm.floor  # the copy of stable; every version from here on descends from stable
        assert core.step > step_at_broken  # training went on while the broken candidate was judged
        # 3. a following good version is promoted
        step_at_retrain = core.step
        _wait("a good version promoted after the rollback",
              lambda: any(h["decision"] == "promoted" and h["candidate"] > retrained for h in history()), 180, robots)
        assert core.step > step_at_retrain
        promoted = next(h for h in history() if h["decision"] == "promoted" and h["candidate"] > retrained)
        assert promoted["stable"] == stable_then and rm.stable >= promoted["candidate"]
    finally:
        for r in robots:
            r.stop_flag.set()
        for r in robots:
            r.join(timeout=30)
    assert not [r.error for r in robots if r.error is not None]
    bad = set(range(broken, retrained))  # the broken version and its descendants
    for r in robots:
        assert r.ran, f"{r.actor} streamed no episode"
        if r.actor in STABLE:  # the stable cohort never sees the broken versions
            assert not [v for v, _ in r.announced if v in bad], (r.actor, r.announced)
            assert not [v for v, b in r.ran if v in bad or b], r.actor
            assert {c for _, c in r.announced} <= {"stable"}
        else:
            assert (broken, "candidate") in r.announced and any(v == broken and b for v, b in r.ran)
    assert not any(b for v, b in sum((r.ran for r in robots), []) if v >= retrained)  # retrained from stable: healthy
    m = core.metrics
    assert m.release_decisions.labels(JOB, "rolled_back", "auto")._value.get() >= 1
    assert m.release_exposure.labels(JOB, "candidate")._value.get() > 0
    assert m.release_version.labels(JOB, "stable")._value.get() == rm.stable
    impl.stop(checkpoint=False, grace_s=1.0, wait_s=10.0)
    before = rm.snapshot()
    # 4. the release state survives a restart: cohorts, channels, history
    again = build_learner(cfg)
    try:
        after = again.core.releases.snapshot()
        assert (after["stable"], after["candidate"], after["history"]) == (before["stable"], before["candidate"], before["history"])
        assert after["cohorts"] == before["cohorts"] and set(after["cohorts"]["canary"]) == set(CANARY)
    finally:
        again.stop(checkpoint=False, grace_s=0.5, wait_s=5.0, announce=False)


@pytest.mark.timeout(120)
def test_control_agent_reports_releases_and_runs_release_commands(tmp_path, redis_server):
    """The control agent on a real redis-server: the ``releases`` key every tick (the contract's shape
    plus ``time``), one ``release_decided`` event per decision, and the three release commands
    through the command list (results under ``fl:cmd:{id}``)."""
    import json

    import redis

    from fleetloop import redis_keys as keys
    from learner.control_agent import ControlAgent
    from learner.core import LearnerCore

    cfg = LearnerConfig(job_id=JOB, state_dir=tmp_path / "s", tasks=TASKS, device="cpu",
                        rollout={"strategy": "canary", "canary_actors": ["c0"], "min_episodes": 3, "max_episodes": 6})
    core = LearnerCore(cfg)
    agent = ControlAgent(core, redis_server.url)
    r = redis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        cand = core.publish()
        for i in range(3):
            for actor, version, ok in (("c0", cand, False), ("s0", 0, True)):
                c = robot_chunk(JOB, actor, f"{actor}-{i}", 0, version, n=5, end=pb.SUCCESS if ok else pb.FAILURE,
                                interventions=0 if ok else 5)
                core.ingest(c, c.ByteSize(), core.version, raw=c.SerializeToString())
        agent.tick()
        snap = json.loads(r.get(keys.releases(JOB)))
        assert set(snap) == {"strategy", "policy", "stable", "candidate", "cohorts", "evidence", "history", "time"}
        assert snap["history"][0]["decision"] == "rolled_back" and snap["cohorts"] == {"canary": ["c0"], "stable": ["s0"]}
        decided = [json.loads(f["data"]) for _, f in r.xrange(keys.events(JOB)) if f["type"] == "release_decided"]
        assert [(d["decision"], d["by"], d["candidate"]) for d in decided] == [("rolled_back", "auto", cand)]
        agent.tick()  # not sent twice
        assert sum(f["type"] == "release_decided" for _, f in r.xrange(keys.events(JOB))) == 1
        core.publish()  # after the retrain's copy of stable: the next candidate
        for i, (op, args) in enumerate((("release_promote", None), ("set_rollout", {"strategy": "canary", "confidence": 2}),
                                        ("set_rollout", {"strategy": "all"}), ("release_abort", None))):
            r.rpush(keys.commands(JOB), json.dumps({"id": f"c{i}", "op": op, "args": args, "by": "ann"}))
        assert agent.run_commands() == 4
        results = [json.loads(r.get(keys.command_result(f"c{i}"))) for i in range(4)]
        assert [x["status"] for x in results] == [200, 422, 200, 409]
        assert "rollout.confidence" in results[1]["error"] and results[0]["result"]["stable"] == core.version
        agent.tick()
        snap = json.loads(r.get(keys.releases(JOB)))
        assert snap["strategy"] == "all" and [h["by"] for h in snap["history"]] == ["auto", "operator"]
        assert [json.loads(f["data"])["decision"] for _, f in r.xrange(keys.events(JOB)) if f["type"] == "release_decided"] \
            == ["rolled_back", "promoted"]
    finally:
        core.stop(checkpoint=False)


@pytest.mark.timeout(400)
def test_metaworld_robots_follow_their_release_channel(tmp_path, capsys):
    """Real Meta-World robots on the real robot runtime (fleetloop.client, scripted operator) against a
    canary learner: every episode of a stable-cohort robot ran a version that was stable (the first
    one or a promoted candidate), the canary robot ran candidates, and decisions were taken."""
    from tests.integration.helpers import RobotThread

    cfg = LearnerConfig(job_id=JOB, state_dir=tmp_path / "state", tasks=TASKS, device="cpu",
                        serving={"host": "127.0.0.1", "port": 0},
                        optimisation={"batch_size": 64, "publish_every": 10, "max_updates_per_s": 20,
                                      "checkpoint_every_s": 1e6},
                        episodes={"max_episode_steps": 60, "chunk_steps": 20},
                        rollout={"strategy": "canary", "canary_actors": ["mw-canary"], "min_episodes": 3,
                                 "max_episodes": 6})
    impl = build_learner(cfg).serve()
    actors = {"mw-canary": 30, "mw-stable-0": 20, "mw-stable-1": 20}
    robots = [RobotThread(impl.target, a, TASKS, tmp_path / f"spool-{a}", None, episodes=n, seed=10 * i, job=JOB)
              for i, (a, n) in enumerate(actors.items())]
    try:
        for r in robots:
            r.start()
        for r in robots:
            r.join(360)
        assert not [r.error for r in robots if r.error is not None]
        for r in robots:
            assert r.client.flush(30)
        snap = impl.core.releases.snapshot()
        _, episodes = impl.core.episodes_since(0)
    finally:
        for r in robots:
            r.client.close(flush_timeout=0)
        impl.stop(checkpoint=False, grace_s=1.0, wait_s=10.0)
    history = snap["history"]
    stable_versions = {0} | {h["candidate"] for h in history if h["decision"] == "promoted"}
    candidates = {h["candidate"] for h in history} | ({snap["candidate"]} - {None})
    with capsys.disabled():
        print(f"\nMeta-World canary run: {[(h['candidate'], h['decision'], h['episodes']) for h in history]}")
    assert history, "no release decision in the run"
    by_actor: dict[str, set[int]] = {}
    for e in episodes:
        by_actor.setdefault(e["actor_id"], set()).add(e["behavior_version"])
    assert by_actor["mw-stable-0"] | by_actor["mw-stable-1"] <= stable_versions, (by_actor, history)
    assert by_actor["mw-canary"] & candidates and by_actor["mw-canary"] <= stable_versions | candidates
