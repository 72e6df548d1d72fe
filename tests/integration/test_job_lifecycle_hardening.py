"""Issue 17 hardening of a job's life, on real parts: a real redis-server, the REST API over HTTP,
real Ray, the real learner and simulated Meta-World robots (or the learner core and its control
agent in this process, where exact counts matter).

- A stopped job keeps its final numbers (version, step, loss, episodes) once the learner's heartbeat
  is gone, with ingest rate 0 and robot rows in a final state: from the control agent's last report,
  and from the launcher when the learner died without one.
- Per-robot drops by reason reach the API's actor rows.
- Task names are checked at submission: unknown Meta-World names for a simulated fleet (or a
  bootstrap) are refused with 422 naming ``tasks[i]`` and the value; real-robot jobs declare their
  own task names.
"""

from __future__ import annotations

import os
import signal

import pytest

from fleetloop import redis_keys as keys
from learner.config import LearnerConfig
from learner.control_agent import ControlAgent
from learner.core import LearnerCore
from learner.staleness import StalenessConfig
from services.control.api import create_app
from services.control.jobspec import JobSpec
from services.control.launchers.local import LocalLauncher
from services.control.state import StateStore
from tests.helpers.chunks import robot_chunk
from tests.helpers.control_plane import ApiServer, client, wait_for

pytestmark = pytest.mark.timeout(600)

JOB = {"publish_every": 5, "batch_size": 64, "max_updates_per_s": 20}


@pytest.fixture()
def plane(tmp_path, redis_server, ray_cluster):
    """Redis state, a local launcher (no supervisor: a killed learner stays dead) and the API; yields
    (store, launcher, operator client)."""
    store = StateStore(redis_server.url)
    key, _ = store.create_api_key("operator", "op")
    launcher = LocalLauncher(store, tmp_path / "data")
    api = ApiServer(create_app(store, launcher, command_timeout_s=20.0, supervise=False)).start()
    try:
        yield store, launcher, client(api.url, key)
    finally:
        api.stop()
        launcher.shutdown()


def _job(c, job_id: str) -> dict:
    r = c.get(f"/v1/jobs/{job_id}")
    assert r.status_code == 200, r.text
    return r.json()


def _actors(c, job_id: str) -> list[dict]:
    r = c.get(f"/v1/jobs/{job_id}/actors")
    assert r.status_code == 200, r.text
    return r.json()


def test_stopped_job_keeps_final_numbers_and_robot_drops(plane):
    """Item 10 and 13 through the launcher: a robot pinned behind the bound has its drops per reason
    in /actors; after stop, and after the heartbeat is gone, the job view still shows the final
    version, step, loss and episodes, ingest rate 0, the robot 'stopped' with its drops kept."""
    store, launcher, c = plane
    spec = {"name": "final", "tasks": ["reach-v3"], **JOB, "staleness_bound": 1, "fleet": {"robots": 1, "operator": "scripted"}}
    r = c.post("/v1/jobs", json=spec)
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    wait_for(lambda: (_job(c, job_id).get("status") or {}).get("version", 0) >= 4, 240, what="version >= 4")
    r = c.post(f"/v1/jobs/{job_id}/policies/1/pin")
    assert r.status_code in (200, 202), r.text

    def behind_with_drops():
        rows = [a for a in _actors(c, job_id) if a["version"] == 1 and a["staleness"] > 1 and sum(a["dropped"].values()) > 0]
        return rows and rows[0]
    row = wait_for(behind_with_drops, 180, what="the pinned robot behind the bound, with drops")
    assert set(row["dropped"]) <= {"stale", "stale_expert_only"} and all(n > 0 for n in row["dropped"].values()), row
    live = _job(c, job_id)
    assert live["learner_alive"] and not (live["status"] or {}).get("final")

    assert c.post(f"/v1/jobs/{job_id}/stop").status_code == 202
    wait_for(lambda: _job(c, job_id)["state"] == "stopped", 180, what="stopped")
    store.r.delete(keys.heartbeat(job_id))  # the heartbeat expires (its TTL, without waiting for it)
    job = _job(c, job_id)
    st = job["status"]
    assert st is not None and st["final"] is True and not job["learner_alive"], job
    stopped = [e for e in c.get(f"/v1/jobs/{job_id}/events").json() if e["type"] == "stopped"][-1]["data"]
    assert st["version"] == stopped["version"] >= 4 and st["step"] == stopped["step"] > 0
    assert isinstance(st["loss"], float) and st["episodes_total"] > 0 and st["tasks"]["reach-v3"]["steps"] > 0
    assert st["ingest_steps_per_s"] == 0 and st["updates_per_s"] == 0 and st["job_state"] == "stopped"
    listed = next(j for j in c.get("/v1/jobs").json() if j["id"] == job_id)
    assert listed["status"]["version"] == st["version"]
    (final_row,) = _actors(c, job_id)
    assert final_row["status"] == "stopped", final_row  # it was with the job to the end, not "stopping" forever
    assert final_row["dropped"] == store.final_status(job_id)["actors"][final_row["actor_id"]]["dropped"]
    assert sum(final_row["dropped"].values()) >= sum(row["dropped"].values())


def test_launcher_keeps_last_status_of_a_learner_that_died(plane):
    """The learner dies (SIGKILL: no final report); stopping the job makes the launcher keep the last
    status it reported as the final one, and the robot rows final."""
    store, launcher, c = plane
    spec = {"name": "died", "tasks": ["reach-v3"], **JOB, "fleet": {"robots": 1}}
    job_id = c.post("/v1/jobs", json=spec).json()["id"]
    wait_for(lambda: (_job(c, job_id).get("status") or {}).get("version", 0) >= 2 and
             [a for a in _actors(c, job_id) if a["episodes"] > 0], 240, what="version >= 2 and a robot with episodes")
    assert c.post(f"/v1/jobs/{job_id}/fleet", json={"robots": 0}).status_code == 200
    job = _job(c, job_id)
    os.kill(job["learner"]["pid"], signal.SIGKILL)
    last = store.learner_status(job_id)
    assert c.post(f"/v1/jobs/{job_id}/stop").status_code == 202
    wait_for(lambda: _job(c, job_id)["state"] == "stopped", 180, what="stopped")
    job = _job(c, job_id)
    st = job["status"]
    assert st is not None and st["final"] is True and not job["learner_alive"], job
    assert st["version"] == last["version"] >= 2 and st["step"] == last["step"] and st["ingest_steps_per_s"] == 0
    assert store.heartbeat(job_id) is None
    rows = _actors(c, job_id)
    assert rows and {a["status"] for a in rows} <= {"stopped", "left"}, rows


def test_control_agent_reports_drops_per_reason_and_a_final_status(redis_server, tmp_path):
    """The learner core and its control agent in this process, the API over HTTP: exact per-reason
    drop counts per robot in /actors, then the agent's final report on stop (no launcher)."""
    store = StateStore(redis_server.url)
    key, _ = store.create_api_key("viewer", "view")
    rec = store.create_job(JobSpec(name="agent", tasks=["reach-v3"]), created_by="test")
    store.update_job(rec.id, state="running")
    core = LearnerCore(LearnerConfig(job_id=rec.id, state_dir=tmp_path / "l", tasks=["reach-v3"], publish_every=1,
                                     batch_size=16, staleness=StalenessConfig(bound=1), control_redis_url=store.url))
    agent = ControlAgent(core, store.url)
    api = ApiServer(create_app(store, LocalLauncher(store, tmp_path / "data"), reconcile=False, supervise=False)).start()
    try:
        c = client(api.url, key)
        for seq in range(3):  # r1 at the learner's version: fresh, nothing dropped
            core.ingestor.ingest(robot_chunk(rec.id, "r1", "e1", seq, 0, end=1 if seq == 2 else None), 100, core.version)
        while core.version < 3:
            assert core.train_step() is not None
        # r2 runs v0, 3+ versions behind a bound of 1: a mixed chunk keeps its 3 operator steps, an autonomous one is dropped
        core.ingestor.ingest(robot_chunk(rec.id, "r2", "e2", 0, 0, interventions=3), 100, core.version)
        core.ingestor.ingest(robot_chunk(rec.id, "r2", "e2", 1, 0, interventions=0), 100, core.version)
        agent.tick(point=True)
        rows = {a["actor_id"]: a for a in _actors(c, rec.id)}
        assert rows["r1"]["dropped"] == {} and rows["r1"]["status"] == "active"
        assert rows["r2"]["dropped"] == {"stale_expert_only": 7, "stale": 10}, rows["r2"]
        assert rows["r2"]["staleness"] == core.version and rows["r2"]["steps"] == 20

        agent.stop(final_tick=True)  # the learner's last report
        store.update_job(rec.id, state="stopped")
        job = _job(c, rec.id)
        assert job["status"]["final"] is True and job["status"]["version"] == core.version and not job["learner_alive"]
        assert job["status"]["ingest_steps_per_s"] == 0 and job["status"]["episodes_total"] == 1
        final_rows = {a["actor_id"]: a for a in _actors(c, rec.id)}
        assert {a["status"] for a in final_rows.values()} == {"stopped"}
        assert final_rows["r2"]["dropped"] == {"stale_expert_only": 7, "stale": 10}
    finally:
        api.stop()
        core.stop(checkpoint=False)


def test_submit_checks_task_names(plane):
    """Unknown Meta-World tasks for a simulated fleet or a bootstrap: 422 naming tasks[i] and the value,
    with close matches, and no job is created; duplicates: 422 naming both places; a real-robot job
    declares its own task names and runs."""
    store, launcher, c = plane
    r = c.post("/v1/jobs", json={"name": "typo", "tasks": ["reach-v3", "reach-v2"], "fleet": {"robots": 1}})
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["field"] == "tasks[1]" and err["value"] == "reach-v2" and err["code"] == "INVALID_ARGUMENT"
    assert "tasks[1] 'reach-v2'" in err["message"] and "did you mean 'reach-v3'" in err["message"]
    r = c.post("/v1/jobs", json={"name": "boot", "tasks": ["pick-plaec-v3"], "bootstrap": {}})
    assert r.status_code == 422 and r.json()["error"]["field"] == "tasks[0]", r.text
    assert "'pick-place-v3'" in r.json()["error"]["message"]
    r = c.post("/v1/jobs", json={"name": "none", "tasks": ["zzz"], "fleet": {"robots": 0}})
    assert r.status_code == 422 and "valid tasks: " in r.json()["error"]["message"] and "reach-v3" in r.text
    r = c.post("/v1/jobs", json={"name": "dup", "tasks": ["a", "b", "a"]})
    assert r.status_code == 422 and "tasks[2] 'a' repeats tasks[0]" in r.text, r.text
    assert c.get("/v1/jobs").json() == []

    r = c.post("/v1/jobs", json={"name": "real", "tasks": ["kitchen-wipe", "shelf.pick_2"], **JOB})
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    job = wait_for(lambda: (j := _job(c, job_id))["state"] in ("running", "failed") and j, 240, what="real-robot job running")
    assert job["state"] == "running" and job["spec"]["tasks"] == ["kitchen-wipe", "shelf.pick_2"], job
    assert c.post(f"/v1/jobs/{job_id}/stop").status_code == 202
    wait_for(lambda: _job(c, job_id)["state"] == "stopped", 120, what="stopped")
