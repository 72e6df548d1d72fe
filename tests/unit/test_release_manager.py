"""ReleaseManager (learner.releases) over a real WeightStore: cohorts (deterministic, persisted across a
reload), channels, evidence and decisions, history, operator promote/abort, pin override, the next
candidate after a rollback (with and without retraining from stable), policy changes, snapshot shape,
retention of the channel versions, metrics."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from fleetloop.errors import FailedPrecondition, InvalidArgument
from learner.metrics import LearnerMetrics
from learner.releases import ReleaseManager, canary_score
from learner.releases_config import RolloutPolicy
from learner.weight_store import WeightStore

CANARY = RolloutPolicy(strategy="canary", canary_actors=["c0", "c1"], min_episodes=5, max_episodes=30)


def _ep(actor: str, version: int, ok: bool, task: str = "reach-v3", steps: int = 50) -> SimpleNamespace:
    return SimpleNamespace(actor_id=actor, task_id=task, outcome="success" if ok else "failure", steps=steps,
                           intervention_steps=0 if ok else steps // 2, behavior_version=version, reward=float(ok))


class Harness:
    """A weight store and a release manager on one state folder (rebuildable: a learner restart)."""

    def __init__(self, tmp_path, policy: RolloutPolicy = CANARY, retrain: bool = False, keep_on_disk: int = 100) -> None:
        self.tmp, self.policy, self.keep_on_disk = tmp_path, policy, keep_on_disk
        self.retrained: list[int] = []
        self.use_retrain = retrain
        self.build()

    def build(self) -> ReleaseManager:
        self.weights = WeightStore(self.tmp / "weights", keep_on_disk=self.keep_on_disk)
        self.metrics = LearnerMetrics("job")
        self.rm = ReleaseManager("job", self.tmp / "releases.json", self.policy, self.weights, self.metrics,
                                 retrain=self._retrain if self.use_retrain else None)
        self.weights.retain = self.rm.protected
        self.weights.add_listener(self.rm.on_publish)
        return self.rm

    def _retrain(self, version: int) -> int:
        self.retrained.append(version)
        return self.publish(b"copy of %d" % version)

    def publish(self, blob: bytes | None = None) -> int:
        n = len(self.weights.versions())
        return self.weights.publish(blob or b"weights %d" % n, n).version

    def episodes(self, actor: str, version: int, ok: bool, n: int, task: str = "reach-v3") -> None:
        for _ in range(n):
            self.rm.on_episode_end(_ep(actor, version, ok, task))


def test_canary_score_and_cohorts_are_deterministic_and_survive_a_reload(tmp_path):
    h = Harness(tmp_path, RolloutPolicy(strategy="canary", canary_fraction=0.3))
    actors = [f"robot-{i}" for i in range(400)]
    first = {a: h.rm.cohort(a) for a in actors}
    assert 0.22 < sum(c == "canary" for c in first.values()) / len(actors) < 0.38
    assert all(h.rm.cohort(a) == first[a] for a in actors)
    assert canary_score("job", "robot-1") == canary_score("job", "robot-1") != canary_score("job", "robot-2")
    for a in actors[:10]:
        h.rm.assignment(a)  # seen actors are persisted
    h.build()
    assert {a: h.rm.cohort(a) for a in actors} == first and h.rm.actors == set(actors[:10])
    wider = ReleaseManager("job", tmp_path / "other.json", RolloutPolicy(strategy="canary", canary_fraction=0.6), h.weights)
    assert all(wider.cohort(a) == "canary" for a in actors if first[a] == "canary")  # raising only adds actors
    listed = ReleaseManager("job", tmp_path / "listed.json", CANARY, h.weights)
    assert [listed.cohort(a) for a in ("c0", "c1", "robot-1")] == ["canary", "canary", "stable"]


def test_strategy_all_announces_the_newest_to_everyone(tmp_path):
    h = Harness(tmp_path, RolloutPolicy())
    h.publish(), h.publish()
    assert h.rm.assignment("c0") == (None, "") and h.rm.target_version("c0") == 1 and h.rm.channel("x") == ""
    snap = h.rm.snapshot()
    assert (snap["strategy"], snap["stable"], snap["candidate"]) == ("all", 1, None)


def test_canary_cohort_gets_the_candidate_and_a_broken_one_is_rolled_back(tmp_path):
    h = Harness(tmp_path)
    h.publish()  # v0: stable
    assert h.rm.snapshot()["stable"] == 0 and h.rm.snapshot()["candidate"] is None
    h.publish()  # v1: candidate
    assert h.rm.assignment("c0") == (1, "candidate") and h.rm.assignment("s0") == (0, "stable")
    h.publish()  # v2: published while v1 is judged: not offered yet
    assert h.rm.candidate == 1
    n = 0
    while h.rm.candidate == 1:
        h.episodes("s0", 0, True, 1)
        h.episodes("c0", 1, False, 1)
        n += 1
        assert n <= CANARY.max_episodes
    assert n == CANARY.min_episodes  # a clearly broken candidate goes at the first look
    last = h.rm.snapshot()["history"][-1]
    assert last["decision"] == "rolled_back" and last["by"] == "auto" and last["candidate"] == 1 and last["stable"] == 0
    assert last["episodes"] == {"canary": n, "stable": n} and last["p_not_worse"] < 0.05
    assert last["metrics"]["candidate"]["autonomous_success"] == 0.0 and last["metrics"]["stable"]["autonomous_success"] == 1.0
    assert "autonomous_success" in last["reason"] or "intervention_rate" in last["reason"]
    # no retrain: the next candidate is the newest version newer than the rejected one
    assert h.rm.candidate == 2 and h.rm.stable == 0 and h.rm.assignment("c1") == (2, "candidate")
    assert h.metrics.release_decisions.labels("job", "rolled_back", "auto")._value.get() == 1
    assert h.metrics.release_version.labels("job", "candidate")._value.get() == 2


def test_a_good_candidate_is_promoted_and_the_next_one_offered(tmp_path):
    h = Harness(tmp_path)
    h.publish(), h.publish()
    h.publish()  # v2 waits
    for _ in range(CANARY.max_episodes):
        if h.rm.candidate != 1:
            break
        h.episodes("s0", 0, True, 1)
        h.episodes("c0", 1, True, 1)
    last = h.rm.snapshot()["history"][-1]
    assert last["decision"] == "promoted" and last["by"] == "auto" and h.rm.stable == 1 and h.rm.candidate == 2
    assert h.rm.assignment("s0") == (1, "stable")


def test_rollback_with_retrain_skips_the_copy_of_stable_and_descendants(tmp_path):
    h = Harness(tmp_path, CANARY.model_copy(update={"retrain_from_stable_on_rollback": True}), retrain=True)
    h.publish(), h.publish()  # v0 stable, v1 candidate
    h.publish()               # v2: a descendant of the broken v1
    h.episodes("s0", 0, True, CANARY.min_episodes)
    h.episodes("c0", 1, False, CANARY.min_episodes)
    assert h.retrained == [0]          # training weights back to stable: published as v3
    assert h.rm.candidate is None and h.rm.floor == 3
    h.publish()                        # v4: trained from stable
    assert h.rm.candidate == 4


def test_operator_promote_abort_and_their_refusals(tmp_path):
    h = Harness(tmp_path)
    h.publish()
    with pytest.raises(FailedPrecondition) as info:
        h.rm.promote("ann")
    assert info.value.field == "candidate"
    with pytest.raises(FailedPrecondition):
        h.rm.abort()
    h.publish()
    assert h.rm.promote("ann") == {"promoted": 1, "stable": 1, "candidate": None}
    h.publish()
    assert h.rm.abort("bob") == {"aborted": 2, "stable": 1, "candidate": None}
    hist = h.rm.snapshot()["history"]
    assert [(e["decision"], e["by"], e["id"]) for e in hist] == [("promoted", "operator", 1), ("aborted", "operator", 2)]
    assert "bob" in hist[1]["reason"] and hist[1]["p_not_worse"] is None  # no evidence yet
    h.publish()  # v3 newer than the aborted v2: offered
    assert h.rm.candidate == 3


def test_pin_overrides_releases_and_suspends_the_window(tmp_path):
    h = Harness(tmp_path)
    h.publish(), h.publish()
    h.weights.pin(0)
    assert h.rm.assignment("c0") == (0, "") and h.rm.assignment("s0") == (0, "")
    h.episodes("c0", 1, False, 20)
    h.episodes("s0", 0, True, 20)
    assert h.rm.candidate == 1 and h.rm.snapshot()["evidence"]["candidate"]["episodes"] == 0
    assert h.metrics.release_exposure.labels("job", "pinned")._value.get() == 40
    h.weights.pin(None)
    assert h.rm.assignment("c0") == (1, "candidate")


def test_state_survives_a_reload(tmp_path):
    h = Harness(tmp_path)
    h.publish(), h.publish()
    h.rm.promote()
    h.publish()
    h.episodes("c0", 2, True, 3)
    h.episodes("s0", 1, True, 2, task="push-v3")
    h.rm.set_policy({**CANARY.model_dump(), "min_episodes": 7})
    h.rm.flush()
    before = h.rm.snapshot()
    h.build()
    after = h.rm.snapshot()
    assert after == before and after["policy"]["min_episodes"] == 7
    assert after["evidence"]["candidate"]["episodes"] == 3 and after["evidence"]["stable"]["per_task"]["push-v3"]["episodes"] == 2
    data = json.loads((tmp_path / "releases.json").read_text())
    assert data["policy_by"] == "operator" and data["salt"] == "job"


def test_config_policy_applies_on_restart_unless_an_operator_set_one(tmp_path):
    h = Harness(tmp_path)
    h.publish()
    h.policy = CANARY.model_copy(update={"max_episodes": 40})
    assert h.build().policy.max_episodes == 40  # set by config: the new config wins
    h.rm.set_policy(CANARY.model_dump())
    h.policy = RolloutPolicy()
    assert h.build().policy.strategy == "canary"  # set by an operator: kept


def test_set_policy_transitions_and_validation(tmp_path):
    h = Harness(tmp_path, RolloutPolicy())
    h.publish(), h.publish()
    h.rm.set_policy(CANARY)
    assert (h.rm.stable, h.rm.candidate) == (1, None)  # all -> canary: the newest is stable
    h.publish()
    assert h.rm.candidate == 2
    h.rm.set_policy({"strategy": "all"})
    last = h.rm.snapshot()["history"][-1]
    assert (last["decision"], last["reason"], h.rm.stable, h.rm.candidate) == ("aborted", "strategy set to all", 2, None)
    with pytest.raises(InvalidArgument) as info:
        h.rm.set_policy({"strategy": "canary", "confidence": 1.5})
    assert info.value.field == "rollout.confidence"
    with pytest.raises(InvalidArgument) as info:
        h.rm.set_policy({"strategy": "canary", "min_episodes": 9, "max_episodes": 3})
    assert info.value.field == "rollout" and "min_episodes" in str(info.value)
    with pytest.raises(InvalidArgument) as info:
        h.rm.set_policy({"strategy": "blue-green"})
    assert info.value.field == "rollout.strategy"


def test_snapshot_has_the_contract_shape(tmp_path):
    h = Harness(tmp_path)
    h.publish(), h.publish()
    h.episodes("c0", 1, True, 2)
    h.episodes("s0", 0, False, 2)
    h.rm.abort()
    snap = h.rm.snapshot()
    assert set(snap) == {"strategy", "policy", "stable", "candidate", "cohorts", "evidence", "history"}
    assert snap["cohorts"] == {"canary": ["c0"], "stable": ["s0"]}
    assert set(snap["policy"]) == set(RolloutPolicy.model_fields)
    cohort_keys = {"episodes", "autonomous_success", "intervention_rate", "episode_length", "reward", "per_task"}
    assert set(snap["evidence"]["candidate"]) == cohort_keys and set(snap["evidence"]["stable"]) == cohort_keys
    entry = snap["history"][0]
    assert set(entry) == {"id", "candidate", "stable", "opened_at", "decided_at", "decision", "by", "reason", "episodes",
                          "metrics", "p_not_worse"}
    assert entry["metrics"]["candidate"]["per_task"]["reach-v3"] == {
        "episodes": 2, "autonomous_success": 1.0, "intervention_rate": 0.0, "episode_length": 50.0, "reward": 1.0}
    assert entry["metrics"]["stable"]["intervention_rate"] == 0.5
    json.dumps(snap, allow_nan=False)


def test_stable_and_candidate_are_never_pruned(tmp_path):
    h = Harness(tmp_path, keep_on_disk=2)
    for _ in range(6):
        h.publish()
    kept = {v.version for v in h.weights.versions()}
    assert {0, 1} <= kept and h.rm.stable == 0 and h.rm.candidate == 1 and 2 not in kept
