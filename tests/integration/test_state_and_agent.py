"""Control-plane state on a real redis-server, and the learner's control agent against it:
jobs under concurrent updates, secrets stored as digests only, revocation, command execution
(pause, pin, rollback, bad commands), reports (status, actors, versions, series), and the
enrollment authenticator failing closed when Redis is gone."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest

from fleetloop import redis_keys as keys
from fleetloop.errors import NotFound, Unauthenticated, Unavailable
from learner.auth import EnrollmentTokens, StaticTokens
from learner.config import LearnerConfig
from learner.control_agent import ControlAgent
from learner.core import LearnerCore
from services.control.jobspec import JobSpec
from services.control.state import StateStore
from tests.helpers.chunks import robot_chunk

pytestmark = pytest.mark.timeout(120)


@pytest.fixture()
def store(redis_server):
    return StateStore(redis_server.url)


def test_jobs_roundtrip_and_concurrent_updates(store):
    rec = store.create_job(JobSpec(name="a", tasks=["reach-v3"]), created_by="k1")
    assert store.get_job(rec.id).state == "pending"
    threads = [threading.Thread(target=store.update_job, args=(rec.id,), kwargs={"fleet_robots": i}) for i in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    store.update_job(rec.id, state="running")
    got = store.get_job(rec.id)
    assert got.state == "running" and got.fleet_robots in range(8)
    assert [e["type"] for e in store.events(rec.id)] == ["submitted", "state"]
    with pytest.raises(NotFound):
        store.get_job("nope-000000")
    assert [j.id for j in store.list_jobs()] == [rec.id]


def test_secrets_are_stored_as_digests_only(store):
    rec = store.create_job(JobSpec(name="b", tasks=["reach-v3"]), created_by="k1")
    token, enr = store.enroll(rec.id, "robot-1", by="k1")
    key, _ = store.create_api_key("operator", "op")
    dump = json.dumps({k: store.r.dump(k).hex() if store.r.type(k) != "none" else "" for k in store.r.keys("*")})
    raw_values = " ".join(str(v) for k in store.r.keys("*") if store.r.type(k) == "hash" for v in store.r.hgetall(k).items())
    assert token not in raw_values and key not in raw_values and token not in dump and key not in dump
    assert keys.secret_hash(token) in store.r.hkeys(keys.enrollments(rec.id))
    assert store.check_api_key(key).role == "operator"
    with pytest.raises(Unauthenticated):
        store.check_api_key("flk_wrong")
    store.revoke_api_key(store.check_api_key(key).id)
    with pytest.raises(Unauthenticated):
        store.check_api_key(key)

    auth = EnrollmentTokens(store.r)
    assert auth.check(token, rec.id).startswith("enrollment-")
    with pytest.raises(Unauthenticated):
        auth.check(token, "other-job")
    store.revoke_enrollment(rec.id, enr.id, by="k1")
    with pytest.raises(Unauthenticated, match="revoked"):
        auth.check(token, rec.id)
    with pytest.raises(Unauthenticated):
        auth.check(None, rec.id)
    assert EnrollmentTokens(store.r, fallback=StaticTokens(["static"])).check("static", rec.id).startswith("robot-token")


def test_enrollment_check_fails_closed_without_redis(redis_server, store):
    rec = store.create_job(JobSpec(name="c", tasks=["reach-v3"]), created_by="k1")
    token, _ = store.enroll(rec.id, "r", by="k1")
    auth = EnrollmentTokens(store.r)
    redis_server.kill()
    with pytest.raises(Unavailable):
        auth.check(token, rec.id)


def _chunk(job, actor, episode, seq, version, n=10, end=None):
    return robot_chunk(job, actor, episode, seq, version, n=n, end=end)


def test_control_agent_reports_and_executes_commands(tmp_path, store):
    core = LearnerCore(LearnerConfig(job_id="agent-job", state_dir=tmp_path / "l", tasks=["reach-v3"], publish_every=2,
                                     batch_size=16, control_redis_url=store.url))
    agent = ControlAgent(core, store.url, sessions=lambda: {"s": {"actor_id": "r1", "tasks": ["reach-v3"], "since": 1.0,
                                                                  "kind": "robot"}})
    try:
        for seq in range(3):
            core.ingestor.ingest(_chunk("agent-job", "r1", "ep-1", seq, 0, end=1 if seq == 2 else None), 100, 0)
        for _ in range(6):
            assert core.train_step() is not None
        assert core.version >= 2
        agent.tick(point=True)
        row = store.actors("agent-job")[0]
        assert row["actor_id"] == "r1" and row["episodes"] == 1 and row["successes"] == 1 and row["steps"] == 30
        assert row["intervention_ratio"] == pytest.approx(0.3) and row["staleness"] == core.version and row["status"] == "active"
        assert [v["version"] for v in store.versions("agent-job")] == list(range(core.version + 1))
        assert store.learner_status("agent-job")["version"] == core.version and store.heartbeat("agent-job")
        assert store.series("agent-job")[-1]["version"] == core.version

        def run(op, **args):
            cid = store.push_command("agent-job", op, args, by="test")
            agent.run_commands()
            return store.wait_result(cid, 1.0)

        assert run("pause")["ok"] and core.paused and core.train_step() is None
        assert run("resume")["ok"] and not core.paused
        assert run("pin", version=1)["ok"] and core.weights.fleet_version().version == 1
        bad = run("pin", version=999)
        assert not bad["ok"] and bad["status"] == 404 and "999" in bad["error"]
        old_sha = core.weights.info(0).sha256
        latest = core.version
        res = run("rollback", version=0)
        assert res["ok"] and res["result"]["version"] == latest + 1
        assert core.weights.info(latest + 1).sha256 == old_sha and core.weights.pinned is None
        assert run("explode")["status"] == 422 and run("pin")["status"] == 422
        assert run("drain")["ok"] and core.job_state == "stopping"
        kinds = [e["type"] for e in store.events("agent-job")]
        assert kinds.count("command") == 8
    finally:
        core.stop(checkpoint=False)


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(120)
def test_api_container_bootstraps_admin_key_from_environment(redis_server, store, tmp_path):
    """`fleetloop api` (the control-plane container) registers $FLEETLOOP_ADMIN_KEY once: the key works, a
    restart does not duplicate it, a revoked key stays revoked, a short key is refused at start naming the variable."""
    import os
    import subprocess
    import sys

    import httpx

    from tests.helpers.control_plane import wait_for
    key = "flk_" + "k" * 40
    port = _free_port()
    env = {**os.environ, "REDIS_URL": redis_server.url, "FLEETLOOP_ADMIN_KEY": key, "RAY_AUTH_MODE": "disabled"}
    cmd = [sys.executable, "-m", "services.cli", "api", "--launcher", "hold", "--host", "127.0.0.1", "--port", str(port)]

    def run_once() -> None:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "api.err", "ab"))
        try:
            def ready() -> bool:
                try:
                    return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200
                except httpx.HTTPError:
                    return False
            wait_for(ready, 60, what="API ready")
            r = httpx.get(f"http://127.0.0.1:{port}/v1/apikeys", headers={"Authorization": f"Bearer {key}"}, timeout=5)
            assert r.status_code == 200, r.text
        finally:
            proc.terminate()
            proc.wait(timeout=20)

    run_once()
    run_once()
    (rec,) = store.api_keys()
    assert rec.role == "admin" and rec.name == "bootstrap"
    assert key not in json.dumps(store.r.hgetall(keys.API_KEYS))  # only the digest is stored
    assert key not in (tmp_path / "api.err").read_text()
    store.revoke_api_key(rec.id)
    assert store.ensure_api_key(key, "admin", "bootstrap").revoked_at is not None  # stays revoked
    short = subprocess.run(cmd, env={**env, "FLEETLOOP_ADMIN_KEY": "tooshort"}, capture_output=True, text=True, timeout=60)
    assert short.returncode == 2 and "bootstrap API key is too short (8 characters" in short.stderr, short.stderr
    assert "tooshort" not in short.stderr
