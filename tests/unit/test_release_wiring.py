"""The release channels wired into a robot LearnerCore (no gRPC): every new episode end reaches the
release manager with its outcome, interventions, length, return, behaviour version, actor and task (the
start-up replay of the ingest log does not re-feed it); publishes open windows; ``weights_for``
answers per actor; an automatic rollback retrains from stable through ``core.rollback``; the control
agent's release commands and the JobSpec's ``rollout`` field."""

from __future__ import annotations

import numpy as np
import pytest

from fleetloop.codec import encode
from fleetloop.v1 import fleetloop_pb2 as pb
from learner.config import LearnerConfig
from learner.control_agent import ControlAgent
from learner.core import LearnerCore
from services.control.jobspec import JobSpec, learner_config
from tests.helpers.chunks import robot_chunk

ROLLOUT = {"strategy": "canary", "canary_actors": ["c0"], "min_episodes": 3, "max_episodes": 10}


def _core(tmp_path, **rollout) -> LearnerCore:
    cfg = LearnerConfig(job_id="rw", state_dir=tmp_path / "l", tasks=["reach-v3", "push-v3"], device="cpu",
                        rollout={**ROLLOUT, **rollout})
    return LearnerCore(cfg)


def _episode(core: LearnerCore, actor: str, n: int, version: int, ok: bool, task: str = "reach-v3") -> None:
    c = robot_chunk("rw", actor, f"{actor}-e{n}", 0, version, n=8, end=pb.SUCCESS if ok else pb.FAILURE, task=task,
                    interventions=0 if ok else 4)
    c.rewards.CopyFrom(encode(np.full(8, 0.5, np.float32)))
    core.ingest(c, c.ByteSize(), core.version, raw=c.SerializeToString())


def test_episode_ends_and_publishes_reach_the_release_manager(tmp_path):
    core = _core(tmp_path)
    rm = core.releases
    assert (rm.stable, rm.candidate) == (0, None)  # version 0 published at start-up
    v1 = core.publish()
    assert rm.candidate == v1
    assert core.weights_for("c0")[0].version == v1 and core.weights_for("c0")[1] == "candidate"
    assert core.weights_for("s0")[0].version == 0 and core.weights_for("s0")[1] == "stable"
    _episode(core, "c0", 0, v1, True, task="push-v3")
    _episode(core, "s0", 0, 0, False)
    snap = rm.snapshot()
    cand = snap["evidence"]["candidate"]["per_task"]["push-v3"]
    assert cand == {"episodes": 1, "autonomous_success": 1.0, "intervention_rate": 0.0, "episode_length": 8.0, "reward": 4.0}
    assert snap["evidence"]["stable"]["per_task"]["reach-v3"]["intervention_rate"] == 0.5
    assert snap["cohorts"] == {"canary": ["c0"], "stable": ["s0"]}
    core.stop(checkpoint=False)
    again = _core(tmp_path)  # the ingest log replay does not count the episodes twice
    assert again.releases.snapshot()["evidence"] == snap["evidence"]
    again.stop(checkpoint=False)


def test_automatic_rollback_retrains_from_stable(tmp_path):
    core = _core(tmp_path)
    stable_weights = {k: v.clone() for k, v in core.algorithm.policy_state_dict().items()}
    with core._train_lock:
        for v in core.algorithm.policy.parameters():
            v.data.add_(1.0)  # the candidate's weights differ from stable's
        bad = core.publish()
    core.publish()  # a descendant of the bad one, not offered while it is judged
    for i in range(3):
        _episode(core, "c0", i, bad, False)
        _episode(core, "s0", i, 0, True)
    last = core.releases.snapshot()["history"][-1]
    assert (last["decision"], last["candidate"]) == ("rolled_back", bad)
    copy = core.version
    assert copy == bad + 2 and core.releases.floor == copy and core.releases.candidate is None
    for k, v in core.algorithm.policy_state_dict().items():
        assert np.allclose(v.cpu().numpy(), stable_weights[k].cpu().numpy()), k
    nxt = core.publish()
    assert core.releases.candidate == nxt
    core.stop(checkpoint=False)


def test_pin_overrides_the_channels(tmp_path):
    core = _core(tmp_path)
    core.publish()
    core.pin(0)
    assert core.weights_for("c0")[0].version == 0 and core.weights_for("c0")[1] == ""
    core.pin(None)
    assert core.weights_for("c0")[1] == "candidate"
    core.stop(checkpoint=False)


def test_control_agent_release_commands(tmp_path):
    core = _core(tmp_path)
    agent = ControlAgent(core, "redis://127.0.0.1:1/0")  # execute() needs no Redis
    assert agent.execute({"op": "release_promote"})["status"] == 409
    core.publish()
    out = agent.execute({"op": "release_promote", "by": "ann"})
    assert out["ok"] and out["result"] == {"promoted": 1, "stable": 1, "candidate": None}
    core.publish()
    assert agent.execute({"op": "release_abort"})["result"]["aborted"] == 2
    bad = agent.execute({"op": "set_rollout", "args": {"strategy": "canary", "max_regression": -1}})
    assert not bad["ok"] and bad["status"] == 422 and "rollout.max_regression" in bad["error"]
    ok = agent.execute({"op": "set_rollout", "args": {"strategy": "all"}})
    assert ok["ok"] and ok["result"]["policy"]["strategy"] == "all" and core.weights_for("c0")[1] == ""
    core.stop(checkpoint=False)


@pytest.mark.parametrize("rollout", [None, ROLLOUT])
def test_jobspec_rollout_reaches_the_learner_config(tmp_path, rollout):
    spec = JobSpec(name="r", tasks=["reach-v3"], **({"rollout": rollout} if rollout else {}))
    cfg = learner_config(spec, "r-1", tmp_path, None)
    assert cfg.rollout.strategy == ("canary" if rollout else "all")
    if rollout:
        assert cfg.rollout.canary_actors == ["c0"] and cfg.rollout.max_episodes == 10
