"""The control plane end to end on real parts: a real redis-server, real Ray, the real learner,
simulated Meta-World robots as processes, the REST API over HTTP.

One job goes through its life: submit over REST, the launcher starts its learner and two enrolled
simulated robots; they appear in /actors; pause stops versions from advancing, resume restarts them;
pin makes the robots switch to the pinned version at their next episode; rollback republishes an
old version's weights as a new version; the API restarts and finds the job; a revoked robot token
is refused at handshake; stop drains the fleet and the learner.
"""

from __future__ import annotations

import time

import pytest

from services.control.api import create_app
from services.control.launchers.local import LocalLauncher
from services.control.state import StateStore
from tests.helpers.control_plane import ApiServer, client, wait_for

pytestmark = pytest.mark.timeout(600)


def _job_state(c, job_id):
    return c.get(f"/v1/jobs/{job_id}").json()


def test_job_lifecycle_over_rest(tmp_path, redis_server, ray_cluster, capfd):
    store = StateStore(redis_server.url)
    admin_key, _ = store.create_api_key("admin", "test-admin")
    launcher = LocalLauncher(store, tmp_path / "data")
    api = ApiServer(create_app(store, launcher, command_timeout_s=20.0)).start()
    api2 = None
    try:
        admin = client(api.url, admin_key)
        op_key = admin.post("/v1/apikeys", json={"role": "operator", "name": "op"}).json()["key"]
        viewer_key = admin.post("/v1/apikeys", json={"role": "viewer", "name": "view"}).json()["key"]
        op, viewer = client(api.url, op_key), client(api.url, viewer_key)

        spec = {"name": "cp-test", "tasks": ["reach-v3", "push-v3"], "publish_every": 5, "batch_size": 64,
                "max_updates_per_s": 20, "fleet": {"robots": 2, "operator": "scripted"}}
        assert viewer.post("/v1/jobs", json=spec).status_code == 403
        r = op.post("/v1/jobs", json=spec)
        assert r.status_code == 201, r.text
        job_id = r.json()["id"]
        wait_for(lambda: _job_state(viewer, job_id)["state"] == "running", 240, what="job running")

        rows = wait_for(lambda: [a for a in viewer.get(f"/v1/jobs/{job_id}/actors").json() if a["episodes"] > 0
                                 and a["status"] == "active"] if len(viewer.get(f"/v1/jobs/{job_id}/actors").json()) == 2 else None,
                        180, what="two active robots with episodes")
        assert {a["actor_id"] for a in viewer.get(f"/v1/jobs/{job_id}/actors").json()} == {"sim-0", "sim-1"}
        assert all(a["kind"] == "robot" and a["version"] >= 0 for a in rows)

        # pause: the version stops advancing; resume: it advances again
        v_before = wait_for(lambda: (_job_state(viewer, job_id)["status"] or {}).get("version", 0) >= 2 and
                            _job_state(viewer, job_id)["status"]["version"], 180, what="version >= 2")
        assert viewer.post(f"/v1/jobs/{job_id}/pause").status_code == 403
        r = op.post(f"/v1/jobs/{job_id}/pause")
        assert r.status_code == 200 and r.json()["status"] == "done", r.text
        assert _job_state(viewer, job_id)["state"] == "paused"
        time.sleep(2.5)
        v_paused = _job_state(viewer, job_id)["status"]["version"]
        time.sleep(4.0)
        assert _job_state(viewer, job_id)["status"]["version"] == v_paused >= v_before
        assert op.post(f"/v1/jobs/{job_id}/resume").json()["status"] == "done"
        wait_for(lambda: _job_state(viewer, job_id)["status"]["version"] > v_paused, 120, what="versions advance after resume")

        # pin an old version: every robot runs it after its next episode boundary
        pols = viewer.get(f"/v1/jobs/{job_id}/policies").json()
        assert pols["latest"] >= 1 and [v["version"] for v in pols["versions"]][0] == 0
        assert op.post(f"/v1/jobs/{job_id}/policies/999999/pin").status_code == 404
        r = op.post(f"/v1/jobs/{job_id}/policies/1/pin")
        assert r.status_code == 200, r.text
        assert viewer.get(f"/v1/jobs/{job_id}/policies").json()["pinned"] == 1
        t_pin = time.time()

        def all_on_v1():
            rows = viewer.get(f"/v1/jobs/{job_id}/actors").json()
            return all(a["version"] == 1 and a["last_seen"] > t_pin + 1 for a in rows) and rows
        wait_for(all_on_v1, 180, what="robots running pinned v1")

        # rollback to v0: a new version with v0's weights, unpinned
        latest = viewer.get(f"/v1/jobs/{job_id}/policies").json()["latest"]
        r = op.post(f"/v1/jobs/{job_id}/policies/0/rollback")
        assert r.status_code == 200, r.text
        new = r.json()["result"]["version"]
        assert new > latest
        pols = viewer.get(f"/v1/jobs/{job_id}/policies").json()
        assert pols["pinned"] is None
        by_v = {v["version"]: v for v in wait_for(lambda: [v for v in viewer.get(f"/v1/jobs/{job_id}/policies").json()["versions"]
                                                          if v["version"] == new] and
                                                  viewer.get(f"/v1/jobs/{job_id}/policies").json()["versions"], 30, what="new version")}
        assert by_v[new]["sha256"] == by_v[0]["sha256"]

        # evaluate a version on held-out seeds (background); the result shows in /policies
        assert viewer.post(f"/v1/jobs/{job_id}/policies/0/evaluate?trials=2").status_code == 403
        assert op.post(f"/v1/jobs/{job_id}/policies/0/evaluate?trials=2").status_code == 202

        def evaluated():
            v0 = viewer.get(f"/v1/jobs/{job_id}/policies").json()["versions"][0]
            return (v0["evaluation"] or {}).get("state") in ("done", "failed") and v0["evaluation"]
        ev = wait_for(evaluated, 240, what="evaluation of v0")
        assert ev["state"] == "done" and set(ev["tasks"]) == {"reach-v3", "push-v3"}, ev
        assert 0.0 <= ev["mean_success"] <= 1.0

        # an enrolled robot token can be revoked: the learner refuses it at the next handshake
        enr = op.post(f"/v1/jobs/{job_id}/enrollments", json={"name": "outside-robot", "actors": ["outside-*"]}).json()
        target = _job_state(viewer, job_id)["learner"]["target"]
        from actor.main import robot_specs
        from fleetloop.client.runtime import FleetClient
        from fleetloop.errors import Unauthenticated
        obs, act = robot_specs()
        ok = FleetClient(target, job_id, "outside-1", obs, act, ["reach-v3"], credential=enr["token"],
                         spool_dir=str(tmp_path / "sp1"), connect_timeout_s=30, send_experience=False)
        ok.connect()
        ok.close()
        assert op.delete(f"/v1/jobs/{job_id}/enrollments/{enr['id']}").json()["revoked_at"] is not None
        bad = FleetClient(target, job_id, "outside-2", obs, act, ["reach-v3"], credential=enr["token"],
                          spool_dir=str(tmp_path / "sp2"), connect_timeout_s=30, send_experience=False)
        with pytest.raises(Unauthenticated):
            bad.connect()
        no_token = FleetClient(target, job_id, "outside-3", obs, act, ["reach-v3"], spool_dir=str(tmp_path / "sp3"),
                               connect_timeout_s=30, send_experience=False)
        with pytest.raises(Unauthenticated):
            no_token.connect()

        # the API restarts (same Redis, same Ray): the job is found, still running, and reattached
        api.stop()
        api2 = ApiServer(create_app(store, LocalLauncher(store, tmp_path / "data"), command_timeout_s=20.0)).start()
        op2 = client(api2.url, op_key)
        job = op2.get(f"/v1/jobs/{job_id}").json()
        assert job["state"] == "running" and job["learner_alive"], job
        events = [e["type"] for e in op2.get(f"/v1/jobs/{job_id}/events").json()]
        wait_for(lambda: "reattached" in [e["type"] for e in op2.get(f"/v1/jobs/{job_id}/events").json()], 60,
                 what="reattached event")
        assert {"submitted", "state", "enrolled", "revoked", "published", "command"} <= set(events)

        # stop: the fleet is told, robots flush and leave, the learner checkpoints; state -> stopped
        assert op2.post(f"/v1/jobs/{job_id}/stop").status_code == 202
        wait_for(lambda: op2.get(f"/v1/jobs/{job_id}").json()["state"] == "stopped", 120, what="stopped")
        robots = launcher.jobs[job_id].robots  # started by the first API's launcher, told to stop by the second's
        wait_for(lambda: not any(r.alive() for r in robots), 60, what="robots leave on stop")
        assert [r.proc.returncode for r in robots] == [0, 0]  # 0 = every spooled chunk acknowledged

        # secrets never reach a log: robot and learner logs, and this process's captured output
        sim_token = launcher.jobs[job_id].token
        logs = " ".join(p.read_text(errors="replace") for p in (tmp_path / "data").rglob("*.log"))
        captured = capfd.readouterr()
        for secret in (sim_token, enr["token"], op_key, viewer_key, admin_key):
            assert secret not in logs and secret not in captured.out and secret not in captured.err
    finally:
        if api2 is not None:
            api2.stop()
        api.stop()
        launcher.shutdown()


def test_killed_learner_is_relaunched_and_robots_reconnect(tmp_path, redis_server, ray_cluster):
    """kill -9 the learner's process: the launcher's supervisor relaunches it on the same port from
    its checkpoint and ingest log; versions keep increasing; the robot reconnects by itself."""
    import os
    import signal

    store = StateStore(redis_server.url)
    key, _ = store.create_api_key("operator", "op")
    launcher = LocalLauncher(store, tmp_path / "data")
    api = ApiServer(create_app(store, launcher, command_timeout_s=20.0)).start()
    try:
        c = client(api.url, key)
        spec = {"name": "kill-test", "tasks": ["reach-v3"], "publish_every": 5, "batch_size": 64, "max_updates_per_s": 20,
                "fleet": {"robots": 1}}
        job_id = c.post("/v1/jobs", json=spec).json()["id"]
        job = wait_for(lambda: (j := _job_state(c, job_id))["state"] == "running" and (j.get("status") or {}).get("version", 0) >= 3
                       and j, 240, what="running with version >= 3")
        wait_for(lambda: [a for a in c.get(f"/v1/jobs/{job_id}/actors").json() if a["status"] == "active"], 120, what="robot active")
        target, pid = job["learner"]["target"], job["learner"]["pid"]
        os.kill(pid, signal.SIGKILL)
        t_kill = time.time()
        wait_for(lambda: "learner_lost" in [e["type"] for e in c.get(f"/v1/jobs/{job_id}/events").json()], 60, what="learner_lost")
        v_before = job["status"]["version"]
        job2 = wait_for(lambda: (j := _job_state(c, job_id))["learner"]["pid"] != pid and j["learner_alive"]
                        and (j.get("status") or {}).get("version", -1) > v_before and j, 240, what="relaunched learner")
        assert job2["learner"]["target"] == target and job2["state"] == "running"
        wait_for(lambda: [a for a in c.get(f"/v1/jobs/{job_id}/actors").json() if a["last_seen"] > t_kill + 2], 180,
                 what="robot reconnected and sending")
        assert c.post(f"/v1/jobs/{job_id}/stop").status_code == 202
        wait_for(lambda: _job_state(c, job_id)["state"] == "stopped", 120, what="stopped")
        robots = launcher.jobs.get(job_id)
        assert robots is None  # the job's entry is gone; its robot exited (checked by stop's drain)
    finally:
        api.stop()
        launcher.shutdown()
