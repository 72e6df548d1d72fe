"""The Kubernetes launcher against kmock (in-memory Kubernetes API emulator; no real API server can
run here) and a real redis-server: submitting a job creates its learner and fleet objects owned by
one root, scaling patches replicas, status moves the job, stopping deletes everything."""

from __future__ import annotations

import json
import time

import pytest
from kubernetes import client
from kubernetes.client import ApiException

from fleetloop import redis_keys as keys
from fleetloop.errors import FailedPrecondition
from learner.config import LearnerConfig
from services.jobspec import JobSpec
from services.k8s_launcher import KubeSettings, KubernetesLauncher
from services.state import StateStore
from tests.helpers.control_plane import start_redis
from tests.helpers.kmock_server import KmockServer

pytestmark = pytest.mark.timeout(120)
NS = "fleet"


@pytest.fixture()
def env(tmp_path):
    redis_server = start_redis(tmp_path)
    kube = KmockServer().start()
    store = StateStore(redis_server.url)
    api = kube.api_client()
    yield store, api
    kube.stop()
    redis_server.stop()


def _launcher(store, api, **kw) -> KubernetesLauncher:
    return KubernetesLauncher(store, api, KubeSettings(namespace=NS, redis_url="redis://redis.fleet.svc:6379/0", **kw))


def _exists(fn, *args) -> bool:
    try:
        fn(*args)
        return True
    except ApiException as exc:
        assert exc.status == 404
        return False


def test_job_objects_scale_status_and_stop(env):
    store, api = env
    apps, core = client.AppsV1Api(api), client.CoreV1Api(api)
    launcher = _launcher(store, api)
    spec = JobSpec(name="k8s", tasks=["reach-v3", "push-v3"], resources={"gpus": 1, "cpus": 4},
                   fleet={"robots": 2, "operator": "scripted"})
    job = store.create_job(spec, created_by="test")
    launcher.launch(job)
    jid = job.id
    assert store.get_job(jid).state == "starting"

    root = core.read_namespaced_config_map(f"fl-{jid}", NS)
    cfg = LearnerConfig.model_validate_json(root.data["learner.json"])
    assert cfg.job_id == jid and cfg.port == 50051 and cfg.metrics_port == 9400 and cfg.host == "0.0.0.0"
    assert cfg.control_redis_url == "redis://redis.fleet.svc:6379/0" and cfg.tasks == ["reach-v3", "push-v3"]

    learner = apps.read_namespaced_deployment(f"fl-{jid}-learner", NS)
    c = learner.spec.template.spec.containers[0]
    assert c.command == ["fleetloop", "learner", "--config", "/etc/fleetloop/learner.json"]
    assert c.resources.limits["nvidia.com/gpu"] == "1" and c.security_context.run_as_non_root is None
    assert learner.spec.template.spec.security_context.run_as_non_root is True
    grpc = core.read_namespaced_service(f"fl-{jid}-grpc", NS)
    assert grpc.spec.type == "LoadBalancer" and grpc.spec.ports[0].port == 50051
    robots = apps.read_namespaced_deployment(f"fl-{jid}-robots", NS)
    rc = robots.spec.template.spec.containers[0]
    assert robots.spec.replicas == 2 and rc.command[:2] == ["fleetloop", "actor"]
    assert f"fl-{jid}-grpc.{NS}.svc:50051" in rc.command and rc.env[0].value_from.secret_key_ref.name == f"fl-{jid}-robot-token"
    token = core.read_namespaced_secret(f"fl-{jid}-robot-token", NS)
    enrolled = store.r.hkeys(keys.enrollments(jid))
    secret_token = (token.string_data or {}).get("token") or __import__("base64").b64decode(token.data["token"]).decode()
    assert keys.secret_hash(secret_token) in enrolled  # the robots' token is a real enrollment of the job

    children = [learner, grpc, robots, core.read_namespaced_service(f"fl-{jid}-metrics", NS), token]
    for obj in children:
        refs = obj.metadata.owner_references
        assert refs and refs[0].kind == "ConfigMap" and refs[0].name == f"fl-{jid}", obj.metadata.name
        assert obj.metadata.labels["fleetloop.dev/job"] == jid

    # scaling the simulated fleet patches the robots' replicas
    assert launcher.scale_fleet(jid, 5) == 5
    assert apps.read_namespaced_deployment(f"fl-{jid}-robots", NS).spec.replicas == 5
    assert store.get_job(jid).fleet_robots == 5

    # status: starting until the Deployment is available and the learner reports to Redis
    assert launcher.supervise_once() == [] and store.get_job(jid).state == "starting"
    apps.patch_namespaced_deployment_status(f"fl-{jid}-learner", NS, {"status": {"availableReplicas": 1, "replicas": 1}})
    store.r.set(keys.heartbeat(jid), json.dumps(time.time()), ex=30)
    assert launcher.supervise_once() == [jid] and store.get_job(jid).state == "running"

    # stop: every object of the job is deleted (explicitly, and through the owner root)
    launcher.stop(jid, grace_s=1.0)
    assert store.get_job(jid).state == "stopped"
    for fn, name in ((apps.read_namespaced_deployment, f"fl-{jid}-learner"), (apps.read_namespaced_deployment, f"fl-{jid}-robots"),
                     (core.read_namespaced_service, f"fl-{jid}-grpc"), (core.read_namespaced_service, f"fl-{jid}-metrics"),
                     (core.read_namespaced_secret, f"fl-{jid}-robot-token"), (core.read_namespaced_config_map, f"fl-{jid}")):
        assert not _exists(fn, name, NS), name
    drain = json.loads(store.r.lindex(keys.commands(jid), -1))
    assert drain["op"] == "drain"  # the learner is told to announce 'stopping' to the fleet first


def test_kuberay_mode_and_failure_status(env):
    store, api = env
    custom = client.CustomObjectsApi(api)
    launcher = _launcher(store, api, kuberay=True, learner_service_type="NodePort", state_storage_class="fast-ssd")
    job = store.create_job(JobSpec(name="ray", tasks=["reach-v3"]), created_by="test")
    launcher.launch(job)
    rj = custom.get_namespaced_custom_object("ray.io", "v1", NS, "rayjobs", f"fl-{job.id}-learner")
    assert rj["spec"]["entrypoint"] == "fleetloop learner --config /etc/fleetloop/learner.json"
    head = rj["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    assert head["volumes"][1]["persistentVolumeClaim"]["claimName"] == f"fl-{job.id}-state"
    assert client.CoreV1Api(api).read_namespaced_service(f"fl-{job.id}-grpc", NS).spec.type == "NodePort"
    custom.patch_namespaced_custom_object("ray.io", "v1", NS, "rayjobs", f"fl-{job.id}-learner",
                                          {"status": {"jobStatus": "FAILED", "jobDeploymentStatus": "Failed"}})
    assert launcher.supervise_once() == [job.id]
    rec = store.get_job(job.id)
    assert rec.state == "failed" and "failed" in rec.error


def test_submit_over_rest_and_bootstrap_refused(env):
    from fastapi.testclient import TestClient

    from services.api import create_app
    store, api = env
    key, _ = store.create_api_key("operator", "op")
    launcher = _launcher(store, api)
    with pytest.raises(FailedPrecondition, match="bootstrap"):
        launcher.validate(JobSpec(name="b", tasks=["reach-v3"], bootstrap={}))
    c = TestClient(create_app(store, launcher, reconcile=False, supervise=False))
    h = {"Authorization": f"Bearer {key}"}
    r = c.post("/v1/jobs", json={"name": "rest", "tasks": ["reach-v3"], "bootstrap": {}}, headers=h)
    assert r.status_code == 409 and "bootstrap" in r.json()["error"]["message"]
    r = c.post("/v1/jobs", json={"name": "rest", "tasks": ["reach-v3"], "fleet": {"robots": 1}}, headers=h)
    assert r.status_code == 201, r.text
    jid = r.json()["id"]
    assert client.AppsV1Api(api).read_namespaced_deployment(f"fl-{jid}-robots", NS).spec.replicas == 1
    # a job whose root object vanished (deleted by hand) is recreated by reconcile
    client.CoreV1Api(api).delete_namespaced_config_map(f"fl-{jid}", NS)
    for name in (f"fl-{jid}-learner", f"fl-{jid}-robots"):
        client.AppsV1Api(api).delete_namespaced_deployment(name, NS)
    for name in (f"fl-{jid}-grpc", f"fl-{jid}-metrics"):
        client.CoreV1Api(api).delete_namespaced_service(name, NS)
    client.CoreV1Api(api).delete_namespaced_secret(f"fl-{jid}-robot-token", NS)
    assert launcher.reconcile() == [jid]
    assert client.AppsV1Api(api).read_namespaced_deployment(f"fl-{jid}-learner", NS).metadata.name == f"fl-{jid}-learner"
