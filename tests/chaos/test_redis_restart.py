"""Chaos 3: SIGKILL the control plane's Redis under a running API and learner, start it again on
the same port with the same data folder (append-only file on), touch nothing else.

Parts: a real ``redis-server`` process (AOF, ``appendfsync everysec``), the REST API (the real app
under uvicorn, hold launcher), and a learner (``build_learner(...).serve()`` in this process: gRPC server,
training, control agent reporting to Redis, robot tokens checked against the job's enrollments).
The job record is marked running with the learner's address the way a launcher records it.

Holds:
- while Redis is down the API answers 503 with an UNAVAILABLE error body on every route that needs
  Redis (never another 5xx), /healthz stays 200 and /readyz is 503; a robot's handshake is refused
  fail-closed (UNAVAILABLE, retried by the robot), never let through;
- afterwards, with no restart of anything but Redis: the API answers again by itself; the job,
  its enrollments (one revoked), the API keys (one revoked) and the job's events survived (AOF),
  with revocations intact; the learner's control agent reports again (fresh heartbeat, the job
  shows ``learner_alive``) and executes an operator command (pause) queued over REST; the robot
  whose handshake was waiting connects.
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from learner.config import LearnerConfig
from learner.process import build_learner
from services.control.api import create_app
from services.control.launchers.hold import HoldLauncher
from services.control.redis_server import RedisServer
from services.control.state import LearnerEndpoint, StateStore
from tests.chaos.procs import wait_for, write_summary
from tests.helpers.control_plane import ApiServer, client, start_redis

pytestmark = [pytest.mark.timeout(240)]
TASK = "reach-v3"


def test_redis_sigkill_and_restart_under_api_and_learner(tmp_path):
    from actor.main import robot_specs
    from fleetloop.client.runtime import FleetClient

    redis = start_redis(tmp_path)
    redis2 = None
    store = StateStore(redis.url)
    admin_key, _ = store.create_api_key("admin", "chaos-admin")
    api = ApiServer(create_app(store, HoldLauncher(store), command_timeout_s=15.0, reconcile=False, supervise=False)).start()
    learner = None
    waiting = None
    try:
        admin = client(api.url, admin_key)
        op_key = admin.post("/v1/apikeys", json={"role": "operator", "name": "op"}).json()["key"]
        viewer = admin.post("/v1/apikeys", json={"role": "viewer", "name": "gone"}).json()
        assert admin.delete(f"/v1/apikeys/{viewer['id']}").status_code == 200
        op = client(api.url, op_key)
        r = op.post("/v1/jobs", json={"name": "chaos-redis", "tasks": [TASK], "publish_every": 5, "batch_size": 32,
                                      "max_updates_per_s": 5})
        assert r.status_code == 201, r.text
        job_id = r.json()["id"]
        robot = op.post(f"/v1/jobs/{job_id}/enrollments", json={"name": "arm-1"}).json()
        revoked = op.post(f"/v1/jobs/{job_id}/enrollments", json={"name": "arm-2"}).json()
        assert op.delete(f"/v1/jobs/{job_id}/enrollments/{revoked['id']}").status_code == 200

        cfg = LearnerConfig(job_id=job_id, state_dir=tmp_path / "learner", tasks=[TASK], batch_size=32, publish_every=5,
                            max_updates_per_s=5, control_redis_url=redis.url)
        learner = build_learner(cfg.model_dump_json()).serve()
        target = f"127.0.0.1:{learner.port}"
        store.update_job(job_id, state="running", learner=LearnerEndpoint(target=target, pid=learner.address()["pid"]))
        wait_for(lambda: op.get(f"/v1/jobs/{job_id}").json()["learner_alive"], 30, "learner reporting")
        obs, act = robot_specs()
        first = FleetClient(target, job_id, "arm-1", obs, act, [TASK], credential=robot["token"],
                            spool_dir=str(tmp_path / "sp0"), connect_timeout_s=30, send_experience=False)
        first.connect()
        first.close(flush_timeout=0)

        before = {"job": op.get(f"/v1/jobs/{job_id}").json(), "enrollments": op.get(f"/v1/jobs/{job_id}/enrollments").json(),
                  "keys": admin.get("/v1/apikeys").json(), "events": op.get(f"/v1/jobs/{job_id}/events").json()}

        # -- kill -9 Redis ----------------------------------------------------------------------
        port, data_dir, binary = redis.port, redis.data_dir, redis.binary
        assert any(data_dir.glob("appendonly*")), "Redis runs with its append-only file on"
        redis.kill()
        t_down = time.time()
        errors_before = learner.agent.errors
        probes = [("GET", "/v1/jobs", None), ("GET", f"/v1/jobs/{job_id}", None), ("GET", f"/v1/jobs/{job_id}/enrollments", None),
                  ("POST", "/v1/jobs", {"name": "during-outage", "tasks": [TASK]}),
                  ("POST", f"/v1/jobs/{job_id}/enrollments", {"name": "arm-3"}), ("POST", f"/v1/jobs/{job_id}/pause", None),
                  ("GET", f"/v1/jobs/{job_id}/events", None), ("GET", "/v1/whoami", None)]
        codes: dict[str, int] = {}
        for method, path, body in probes:
            resp = op.request(method, path, json=body)
            codes[f"{method} {path}"] = resp.status_code
            assert resp.status_code == 503, (method, path, resp.status_code, resp.text)
            assert resp.json()["error"]["code"] == "UNAVAILABLE"
        admin_probe = admin.get("/v1/apikeys")
        assert admin_probe.status_code == 503
        assert httpx.get(api.url + "/healthz", timeout=10).status_code == 200
        assert httpx.get(api.url + "/readyz", timeout=10).status_code == 503

        # a robot arriving now: fail-closed (UNAVAILABLE), it keeps retrying until Redis is back
        import grpc

        from fleetloop.codec import PROTOCOL_VERSION
        from fleetloop.v1 import fleetloop_pb2 as pb
        from fleetloop.v1 import fleetloop_pb2_grpc as pb_grpc
        with grpc.insecure_channel(target) as ch:
            with pytest.raises(grpc.RpcError) as refused:
                pb_grpc.LearnerStub(ch).Handshake(
                    pb.HandshakeRequest(protocol_version=PROTOCOL_VERSION, job_id=job_id, actor_id="arm-1", kind=pb.ROBOT,
                                        observation_specs=obs, action_specs=act, tasks=[TASK]),
                    metadata=(("authorization", f"Bearer {robot['token']}"),), timeout=20)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value
        assert robot["token"] not in str(refused.value.details())
        result: dict = {}

        def handshake():
            c = FleetClient(target, job_id, "arm-1", obs, act, [TASK], credential=robot["token"],
                            spool_dir=str(tmp_path / "sp1"), connect_timeout_s=120, send_experience=False)
            try:
                c.connect()
                result["connected_at"] = time.time()
                c.close(flush_timeout=0)
            except BaseException as exc:
                result["error"] = repr(exc)
        waiting = threading.Thread(target=handshake, daemon=True)
        waiting.start()
        wait_for(lambda: learner.agent.errors > errors_before, 15, "the control agent notices Redis is gone")
        time.sleep(2.0)
        assert not result, f"nothing may get through while credentials cannot be checked: {result}"
        assert learner.core.version >= 0  # the learner itself is unaffected

        # -- restart Redis on the same port with the same data ---------------------------------
        # The waiting robot may get in as soon as Redis accepts connections, which can be before
        # start() returns; "after the restart" is therefore measured from the moment we begin it.
        t_restart = time.time()
        redis2 = RedisServer(data_dir, port=port, binary=binary).start()
        t_up = time.time()
        wait_for(lambda: op.get("/v1/jobs").status_code == 200, 60, "API answers again", interval=0.2)
        t_api = time.time()

        after_job = op.get(f"/v1/jobs/{job_id}").json()
        assert (after_job["id"], after_job["state"], after_job["spec"], after_job["learner"]) == \
            (job_id, "running", before["job"]["spec"], before["job"]["learner"])
        enrollments = {e["name"]: e for e in op.get(f"/v1/jobs/{job_id}/enrollments").json()}
        assert set(enrollments) == {"arm-1", "arm-2"}
        assert enrollments["arm-1"]["revoked_at"] is None and enrollments["arm-2"]["revoked_at"] is not None
        assert {k["id"]: k["revoked_at"] is not None for k in admin.get("/v1/apikeys").json()} == \
            {k["id"]: k["revoked_at"] is not None for k in before["keys"]}
        assert client(api.url, viewer["key"]).get("/v1/whoami").status_code == 401
        assert op.get("/v1/whoami").json()["role"] == "operator"
        event_ids = [e["id"] for e in op.get(f"/v1/jobs/{job_id}/events").json()]
        assert [e["id"] for e in before["events"]] == event_ids[:len(before["events"])]

        # the learner's agent reports again and runs commands; the waiting robot got in
        wait_for(lambda: (store.heartbeat(job_id) or 0) > t_up, 30, "a heartbeat after the restart")
        t_agent = time.time()
        assert op.get(f"/v1/jobs/{job_id}").json()["learner_alive"]
        r = op.post(f"/v1/jobs/{job_id}/pause")
        assert r.status_code == 200 and r.json()["status"] == "done", r.text
        assert learner.core.paused
        waiting.join(60)
        assert "connected_at" in result and result["connected_at"] > t_restart, result

        write_summary("redis_restart", {
            "definition": "Redis killed with SIGKILL and restarted on the same port and data folder (AOF, everysec); "
                          "API and learner untouched",
            "api_503_during_outage": sum(1 for c in codes.values() if c == 503) + 1, "api_other_5xx_during_outage": 0,
            "probes_during_outage": codes,
            "jobs_before": 1, "jobs_after": len(op.get("/v1/jobs").json()),
            "enrollments_before": len(before["enrollments"]), "enrollments_after": len(enrollments),
            "api_keys_before": len(before["keys"]), "api_keys_after": len(admin.get("/v1/apikeys").json()),
            "events_before": len(before["events"]), "events_kept": len(before["events"]),
            "revocations_kept": True, "agent_errors_during_outage": learner.agent.errors - errors_before,
            "robot_handshake_during_outage": "refused UNAVAILABLE (fail closed), connected after the restart",
            "outage_seconds_info_only": round(t_up - t_down, 3),
            "api_recovered_seconds_info_only": round(t_api - t_up, 3),
            "agent_reported_seconds_info_only": round(t_agent - t_up, 3),
            "robot_connected_seconds_info_only": round(result["connected_at"] - t_up, 3),
        })
    finally:
        if learner is not None:
            learner.stop()
        api.stop()
        for server in (redis2, redis):
            if server is not None:
                server.stop()
