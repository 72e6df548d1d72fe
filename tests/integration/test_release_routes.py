"""Safe releases on the control plane's side, on real parts: a real redis-server, the real API over
HTTP (uvicorn on a free port, hold launcher: jobs are accepted, no learner process is started), the
real learner side of the contract (docs/notes/issue21-plan.md) in this process: a robot
:class:`~learner.core.LearnerCore` with a canary rollout and its :class:`~learner.control_agent.ControlAgent`
reporting to that Redis and executing ``release_promote`` / ``release_abort`` / ``set_rollout``, and the
real ``fleetloop job`` CLI in subprocesses. Episodes reach the core as robot chunks (no gRPC), so the
evidence, the decisions (an operator's and an automatic rollback) and the snapshot are the learner's own.
Read-only views (cohort sizes, decision history, the CLI's text) are also checked on the contract's
example snapshot (tests/helpers/releases.py) written where the agent writes it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from fleetloop import redis_keys as keys
from fleetloop.codec import encode
from fleetloop.v1 import fleetloop_pb2 as pb
from learner.config import LearnerConfig
from learner.control_agent import ControlAgent
from learner.core import LearnerCore
from learner.releases_config import RolloutPolicy
from services.control.api import create_app
from services.control.launchers.hold import HoldLauncher
from services.control.state import StateStore
from tests.helpers.chunks import robot_chunk
from tests.helpers.control_plane import ApiServer, client, start_redis, wait_for

pytestmark = pytest.mark.timeout(180)
ROOT = Path(__file__).resolve().parents[2]
TASKS = ["reach-v3", "push-v3"]
ROLLOUT = {"strategy": "canary", "canary_actors": ["arm-c"], "min_episodes": 3, "max_episodes": 10}


class Learner:
    """A robot learner core with release channels and its control agent (ticking every 0.1 s)."""

    def __init__(self, job: str, redis_url: str, state_dir: Path, rollout: dict | None = None) -> None:
        cfg = LearnerConfig(job_id=job, state_dir=state_dir, tasks=TASKS, device="cpu", rollout=rollout or ROLLOUT)
        self.job, self.core = job, LearnerCore(cfg)
        self.agent = ControlAgent(self.core, redis_url, interval_s=0.1)
        self.n = 0

    def __enter__(self) -> "Learner":
        self.agent.start()
        return self

    def __exit__(self, *exc) -> None:
        self.agent.stop()
        self.core.stop(checkpoint=False)

    def episode(self, actor: str, version: int, ok: bool, task: str = "reach-v3") -> None:
        """One whole episode of ``actor`` on ``version``: success without operator, or failure with 4 operator steps."""
        self.n += 1
        c = robot_chunk(self.job, actor, f"{actor}-e{self.n}", 0, version, n=8, end=pb.SUCCESS if ok else pb.FAILURE,
                        task=task, interventions=0 if ok else 4)
        c.rewards.CopyFrom(encode(np.full(8, 0.5, np.float32)))
        self.core.ingest(c, c.ByteSize(), self.core.version, raw=c.SerializeToString())

    def decisions(self, decision: str, by: str) -> float:
        return self.core.metrics.registry.get_sample_value(
            "fleetloop_release_decisions_total", {"job": self.job, "decision": decision, "by": by}) or 0.0


@pytest.fixture()
def stack(tmp_path):
    """Redis, the API (hold launcher, 5 s command timeout), keys of every role and one running job."""
    redis = start_redis(tmp_path)
    store = StateStore(redis.url)
    keys_ = {role: store.create_api_key(role, f"test-{role}")[0] for role in ("admin", "operator", "viewer")}
    server = ApiServer(create_app(store, HoldLauncher(store), command_timeout_s=5.0, reconcile=False)).start()
    try:
        r = client(server.url, keys_["operator"]).post("/v1/jobs", json={"name": "rel", "tasks": TASKS, "rollout": ROLLOUT})
        assert r.status_code == 201, r.text
        job = r.json()["id"]
        store.update_job(job, state="running")  # what a launcher does once the learner runs
        yield SimpleNamespace(url=server.url, keys=keys_, job=job, store=store, redis_url=redis.url, tmp=tmp_path,
                              op=client(server.url, keys_["operator"]), viewer=client(server.url, keys_["viewer"]))
    finally:
        server.stop()
        redis.stop()


def _learner(stack, **kw) -> Learner:
    return Learner(stack.job, stack.redis_url, stack.tmp / "learner", **kw)


def _releases(stack) -> dict:
    r = stack.viewer.get(f"/v1/jobs/{stack.job}/releases")
    assert r.status_code == 200, r.text
    return r.json()


def _queued(store: StateStore, job: str) -> list[dict]:
    return [json.loads(c) for c in store.r.lrange(keys.commands(job), 0, -1)]


def _key_id(stack, role: str) -> str:
    return stack.store.check_api_key(stack.keys[role]).id


# -- GET /releases ------------------------------------------------------------------------------------
def test_releases_before_the_learner_reports_is_the_spec_policy_or_strategy_all(stack):
    body = _releases(stack)
    assert body["reported"] is False and body["strategy"] == "canary"  # the job spec's rollout
    assert body["policy"] == RolloutPolicy(**ROLLOUT).model_dump()
    assert (body["stable"], body["candidate"], body["history"], body["cohorts"]) == (None, None, [], {"canary": [], "stable": []})
    assert body["cohort_sizes"] == {"canary": 0, "stable": 0} and body["evidence"] == {"candidate": None, "stable": None}
    r = stack.op.post("/v1/jobs", json={"name": "plain", "tasks": TASKS})
    body = stack.viewer.get(f"/v1/jobs/{r.json()['id']}/releases").json()
    assert body["reported"] is False and body["strategy"] == "all" and body["policy"] == RolloutPolicy().model_dump()
    assert stack.viewer.get("/v1/jobs/nope-000000/releases").status_code == 404
    assert client(stack.url, "flk_wrong").get(f"/v1/jobs/{stack.job}/releases").status_code == 401


def test_the_learner_reports_its_release_and_runs_the_operators_decisions(stack):
    with _learner(stack) as learner:
        core = learner.core
        v1 = core.publish()  # the learner offers it to the canary cohort
        learner.episode("arm-c", v1, True)
        learner.episode("arm-s", 0, True, task="push-v3")
        learner.episode("arm-s", 0, False)
        body = wait_for(lambda: (b := _releases(stack))["candidate"] == v1 and (b["evidence"]["stable"] or {}).get("episodes") == 2
                        and b, 15, what="the learner's snapshot with its evidence")
        assert body["reported"] is True and body["time"] > 0 and body["problem"] is None
        assert body["strategy"] == "canary" and body["policy"] == RolloutPolicy(**ROLLOUT).model_dump()
        assert body["stable"] == 0 and body["cohorts"] == {"canary": ["arm-c"], "stable": ["arm-s"]}
        assert body["cohort_sizes"] == {"canary": 1, "stable": 1}
        cand, stab = body["evidence"]["candidate"], body["evidence"]["stable"]
        assert {k: cand[k] for k in ("episodes", "autonomous_success", "intervention_rate", "episode_length", "reward")} == \
            {"episodes": 1, "autonomous_success": 1.0, "intervention_rate": 0.0, "episode_length": 8.0, "reward": 4.0}
        assert stab["autonomous_success"] == 0.5 and stab["per_task"]["reach-v3"]["intervention_rate"] == 0.5
        assert set(stab["per_task"]) == {"reach-v3", "push-v3"}

        # the operator promotes the candidate before the evidence is in
        r = stack.op.post(f"/v1/jobs/{stack.job}/releases/promote")
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "done" and r.json()["op"] == "release_promote"
        assert r.json()["result"] == {"promoted": v1, "stable": v1, "candidate": None}
        body = wait_for(lambda: (b := _releases(stack))["stable"] == v1 and b, 15, what="the promotion in the snapshot")
        last = body["history"][-1]
        assert (last["decision"], last["by"], last["candidate"], last["stable"]) == ("promoted", "operator", v1, 0)
        assert _key_id(stack, "operator") in last["reason"] and last["episodes"] == {"canary": 1, "stable": 2}
        # nothing open now: the learner refuses, the API answers its 409 with the learner's message
        r = stack.op.post(f"/v1/jobs/{stack.job}/releases/abort")
        assert r.status_code == 409, r.text
        assert r.json()["error"]["code"] == "FAILED_PRECONDITION" and "no release candidate" in r.json()["error"]["message"]
        v2 = core.publish()
        r = stack.op.post(f"/v1/jobs/{stack.job}/releases/abort")
        assert r.status_code == 200 and r.json()["result"] == {"aborted": v2, "stable": v1, "candidate": None}, r.text

        # an automatic rollback: the canary cohort fails where the stable cohort succeeds
        v3 = core.publish()
        assert core.releases.candidate == v3
        for _ in range(3):
            learner.episode("arm-c", v3, False)
            learner.episode("arm-s", v1, True)
        body = wait_for(lambda: (b := _releases(stack))["history"][-1]["decision"] == "rolled_back" and b, 15,
                        what="the automatic rollback in the snapshot")
        last = body["history"][-1]
        assert (last["by"], last["candidate"], last["stable"]) == ("auto", v3, v1) and body["stable"] == v1
        assert last["episodes"] == {"canary": 3, "stable": 3} and last["p_not_worse"] <= 0.05 and last["reason"]
        assert last["metrics"]["candidate"]["autonomous_success"] == 0.0 and last["metrics"]["stable"]["autonomous_success"] == 1.0
        assert [h["decision"] for h in body["history"]] == ["promoted", "aborted", "rolled_back"]
        assert learner.decisions("rolled_back", "auto") == 1  # what FleetloopReleaseRolledBack alerts on

        # the live view carries the same snapshot
        with stack.viewer.stream("GET", f"/v1/jobs/{stack.job}/live", params={"interval": 0.2}) as live:
            data = next(line[6:] for line in live.iter_lines() if line.startswith("data: "))
        live_rel = json.loads(data)["releases"]
        assert live_rel["history"] == body["history"] and live_rel["cohorts"] == body["cohorts"]
    decided = [e["data"] for e in stack.store.events(stack.job) if e["type"] == "release_decided"]
    assert [(d["decision"], d["by"]) for d in decided] == [("promoted", "operator"), ("aborted", "operator"), ("rolled_back", "auto")]
    commands = [(e["data"]["op"], e["data"]["ok"]) for e in stack.store.events(stack.job) if e["type"] == "command"]
    assert commands == [("release_promote", True), ("release_abort", False), ("release_abort", True)]


def test_releases_is_documented_in_openapi(stack):
    schema = stack.viewer.get("/openapi.json").json()
    paths = schema["paths"]
    assert set(paths["/v1/jobs/{job_id}/releases"]) == {"get"}
    assert set(paths["/v1/jobs/{job_id}/releases/promote"]) == set(paths["/v1/jobs/{job_id}/releases/abort"]) == {"post"}
    put = paths["/v1/jobs/{job_id}/rollout"]["put"]
    assert {"200", "202", "401", "403", "404", "409", "422"} <= set(put["responses"])
    assert put["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/RolloutPolicy")
    comps = schema["components"]["schemas"]
    for name in ("ReleasesView", "ReleaseDecision", "ReleaseEvidence", "CohortEvidence", "CohortCounts", "RolloutPolicy"):
        assert name in comps, name
    for name in ("ReleasesView", "ReleaseDecision", "CohortMetrics", "RolloutPolicy"):
        undocumented = [f for f, p in comps[name]["properties"].items() if not p.get("description")]
        assert undocumented == [] or name == "ReleasesView" and undocumented == ["job_id"], (name, undocumented)


# -- promote / abort without an answer, roles, states --------------------------------------------------
def test_promote_without_an_answer_is_queued_and_roles_and_states_are_checked(stack):
    r = stack.op.post(f"/v1/jobs/{stack.job}/releases/promote")  # no learner polls: queued after the timeout
    assert r.status_code == 202, r.text
    assert r.json()["status"] == "queued" and r.json()["op"] == "release_promote"
    (cmd,) = _queued(stack.store, stack.job)
    assert (cmd["id"], cmd["op"], cmd["args"], cmd["by"]) == (r.json()["command_id"], "release_promote", {},
                                                                _key_id(stack, "operator"))
    for path in ("releases/promote", "releases/abort"):
        r = stack.viewer.post(f"/v1/jobs/{stack.job}/{path}")
        assert r.status_code == 403 and r.json()["error"]["field"] == "role", r.text
    assert stack.viewer.put(f"/v1/jobs/{stack.job}/rollout", json={"strategy": "canary"}).status_code == 403
    stack.store.update_job(stack.job, state="stopped")
    r = stack.op.post(f"/v1/jobs/{stack.job}/releases/abort")
    assert r.status_code == 409 and r.json()["error"]["field"] == "state", r.text
    assert stack.op.put(f"/v1/jobs/{stack.job}/rollout", json={"strategy": "canary"}).status_code == 409
    assert len(_queued(stack.store, stack.job)) == 1  # refused requests queue nothing
    # the queued promote reaches a learner that starts later (it has no candidate: refused, reported)
    stack.store.update_job(stack.job, state="running")
    with _learner(stack):
        wait_for(lambda: any(e["type"] == "command" for e in stack.store.events(stack.job)), 15, what="the queued command run")
    (ev,) = [e["data"] for e in stack.store.events(stack.job) if e["type"] == "command"]
    assert (ev["op"], ev["ok"], ev["id"]) == ("release_promote", False, cmd["id"]) and "no release candidate" in ev["error"]


# -- PUT /rollout -------------------------------------------------------------------------------------
@pytest.mark.parametrize("body,field", [({"strategy": "canary", "canary_fraction": 1.5}, "canary_fraction"),
                                        ({"strategy": "blue-green"}, "strategy"),
                                        ({"min_episodes": 50, "max_episodes": 20}, None),
                                        ({"metrics": ["autonomous_success", "vibes"]}, "metrics"),
                                        ({"canary_actors": ["arm-1", "arm-1"]}, "canary_actors"),
                                        ({"confidence": 0.95, "typo_field": 1}, "typo_field")])
def test_an_invalid_rollout_policy_is_a_422_naming_the_field_and_nothing_is_queued(stack, body, field):
    r = stack.op.put(f"/v1/jobs/{stack.job}/rollout", json=body)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    if field is not None:
        assert any(d["loc"][:2] == ["body", field] for d in detail), detail
    else:
        assert any("min_episodes 50 must be <= max_episodes 20" in d["msg"] for d in detail), detail
    assert _queued(stack.store, stack.job) == []
    assert stack.store.get_job(stack.job).spec.rollout == RolloutPolicy(**ROLLOUT)  # the spec is untouched


def test_set_rollout_runs_on_the_learner_and_the_job_spec_keeps_it_for_a_relaunch(stack):
    from services.control.jobspec import learner_config

    policy = {"strategy": "canary", "canary_actors": ["arm-c", "arm-d"], "min_episodes": 20, "max_episodes": 80,
              "metrics": ["autonomous_success"], "confidence": 0.9}
    full = RolloutPolicy(**policy).model_dump()
    with _learner(stack) as learner:
        r = stack.op.put(f"/v1/jobs/{stack.job}/rollout", json=policy)
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "done" and r.json()["op"] == "set_rollout" and r.json()["result"] == {"policy": full}
        assert learner.core.releases.policy.model_dump() == full
        wait_for(lambda: _releases(stack)["policy"] == full, 15, what="the new policy in the snapshot")
        rec = stack.store.get_job(stack.job)
        assert rec.spec.rollout.model_dump() == full
        assert stack.viewer.get(f"/v1/jobs/{stack.job}").json()["spec"]["rollout"] == full
        assert learner_config(rec.spec, rec.id, stack.tmp / "relaunch", None).rollout.model_dump() == full

        # canary -> all: the learner aborts the open candidate, every robot runs the newest
        learner.core.publish()
        r = stack.op.put(f"/v1/jobs/{stack.job}/rollout", json={"strategy": "all"})
        assert r.status_code == 200 and r.json()["result"]["policy"]["strategy"] == "all", r.text
        body = wait_for(lambda: (b := _releases(stack))["strategy"] == "all" and b, 15, what="strategy all")
        assert body["candidate"] is None and body["history"][-1]["decision"] == "aborted"
    # queued (no learner): the spec still takes the policy, validated here as the learner validates it
    r = stack.op.put(f"/v1/jobs/{stack.job}/rollout", json={"strategy": "canary", "canary_fraction": 0.5})
    assert r.status_code == 202, r.text
    assert _queued(stack.store, stack.job)[0]["args"] == RolloutPolicy(strategy="canary", canary_fraction=0.5).model_dump()
    assert stack.store.get_job(stack.job).spec.rollout.canary_fraction == 0.5


# -- CLI ----------------------------------------------------------------------------------------------
def _cli(stack, *argv: str, key: str = "operator") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.cli", "job", "--api", stack.url, "--key", stack.keys[key], *argv],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_cli_shows_releases_promotes_aborts_and_sets_the_rollout(stack):
    with _learner(stack) as learner:
        v1 = learner.core.publish()
        learner.episode("arm-c", v1, True)
        learner.episode("arm-s", 0, False, task="push-v3")
        wait_for(lambda: (_releases(stack)["evidence"]["stable"] or {}).get("episodes") == 1, 15, what="evidence")
        out = _cli(stack, "releases", stack.job, key="viewer")
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()
        assert lines[0] == (f"job {stack.job}  strategy canary (canary_actors arm-c, min_episodes 3, max_episodes 10, "
                            "metrics autonomous_success,intervention_rate, max_regression 0.1, confidence 0.95)")
        assert lines[1] == f"stable v0  candidate v{v1}"
        canary = next(ln for ln in lines[3:] if ln.startswith("canary "))
        stable = next(ln for ln in lines[3:] if ln.startswith("stable "))
        assert canary.split()[:4] == ["canary", f"v{v1}", "1:", "arm-c"] and "100.0%" in canary
        assert stable.split()[:4] == ["stable", "v0", "1:", "arm-s"] and "0.0%" in stable and "50.0%" in stable
        assert "  stable push-v3: episodes 1" in out.stdout and lines[-1] == "no decision yet"
        out = _cli(stack, "releases", stack.job, "-o", "json", key="viewer")
        assert out.returncode == 0 and json.loads(out.stdout)["candidate"] == v1, out.stderr

        out = _cli(stack, "promote", stack.job, "-o", "json")
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["result"] == {"promoted": v1, "stable": v1, "candidate": None}
        out = _cli(stack, "abort-release", stack.job, "-o", "json")  # nothing open any more
        assert out.returncode == 1 and json.loads(out.stderr)["error"]["code"] == "FAILED_PRECONDITION", out.stderr
        assert "no release candidate" in json.loads(out.stderr)["error"]["message"]
        wait_for(lambda: "promoted by operator" in _cli(stack, "releases", stack.job, key="viewer").stdout, 15,
                 what="the decision in `job releases`")

        # flags change the policy in force; the rest is kept
        out = _cli(stack, "rollout", stack.job, "--min-episodes", "5", "--max-episodes", "40", "--canary-actors", "arm-c,arm-d",
                   "-o", "json")
        assert out.returncode == 0 and json.loads(out.stdout)["status"] == "done", out.stderr
        want = RolloutPolicy(**{**ROLLOUT, "min_episodes": 5, "max_episodes": 40, "canary_actors": ["arm-c", "arm-d"]})
        assert learner.core.releases.policy == want
        out = _cli(stack, "rollout", stack.job, "--min-episodes", "50")  # the API checks the whole policy
        assert out.returncode == 1 and "min_episodes 50 must be <= max_episodes 40" in out.stderr, out.stderr
        out = _cli(stack, "rollout", stack.job, "--canary-fraction", "2")
        assert out.returncode == 1 and "canary_fraction" in out.stderr and "less than or equal to 1" in out.stderr, out.stderr
        out = _cli(stack, "rollout", stack.job)
        assert out.returncode == 1 and "nothing to set" in out.stderr, out.stderr
        assert learner.core.releases.policy == want  # refused by the API: nothing reached the learner


def test_cli_rollout_from_a_file_and_watch_until_the_job_ends(stack, tmp_path):
    (tmp_path / "rollout.yaml").write_text("strategy: canary\ncanary_fraction: 0.5\nmin_episodes: 12\n")
    with _learner(stack) as learner:
        out = _cli(stack, "rollout", stack.job, "--file", str(tmp_path / "rollout.yaml"), "--max-episodes", "90")
        assert out.returncode == 0, out.stderr
        want = RolloutPolicy(strategy="canary", canary_fraction=0.5, min_episodes=12, max_episodes=90)
        assert json.loads(out.stdout)["result"] == {"policy": want.model_dump()}
        assert learner.core.releases.policy == want and stack.store.get_job(stack.job).spec.rollout == want
        wait_for(lambda: _releases(stack)["policy"] == want.model_dump(), 15, what="the policy in the snapshot")
        watch = subprocess.Popen([sys.executable, "-m", "services.cli", "job", "--api", stack.url, "--key",
                                  stack.keys["viewer"], "releases", stack.job, "--watch", "0.3", "-o", "json"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        try:
            time.sleep(3.0)
            stack.store.update_job(stack.job, state="stopped")
            out_text, err = watch.communicate(timeout=60)
        finally:
            if watch.poll() is None:
                watch.kill()
                watch.wait(10)
    assert watch.returncode == 0, err
    lines = [json.loads(ln) for ln in out_text.splitlines()]
    assert len(lines) >= 2 and all(ln["job_id"] == stack.job and ln["watched_at"] > 0 for ln in lines)
    assert lines[-1]["policy"] == want.model_dump() and lines[-1]["reported"] is True
