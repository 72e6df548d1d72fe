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
from services.control.jobspec import JobSpec
from services.control.launchers.k8s_reconciler import KubernetesLauncher
from services.control.launchers.k8s_settings import KubeSettings
from services.control.state import StateStore
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
    assert cfg.job_id == jid and cfg.serving.port == 50051 and cfg.serving.metrics_port == 9400 and cfg.serving.host == "0.0.0.0"
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
    assert rj["spec"]["entrypoint"] == "fleetloop learner --config /etc/fleetloop/learner.json --ray-address auto"
    assert rj["spec"]["submissionMode"] == "HTTPMode"  # the driver runs on the head, which mounts config and state
    assert "workerGroupSpecs" not in rj["spec"]["rayClusterSpec"]
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

    from services.control.api import create_app
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


def _pod_templates(obj: dict) -> list[dict]:
    """Pod template specs inside a Deployment or a RayJob (head and worker groups)."""
    if obj["kind"] == "Deployment":
        return [obj["spec"]["template"]]
    cluster = obj["spec"]["rayClusterSpec"]
    return [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster.get("workerGroupSpecs", [])]


def test_manifests_pass_kubernetes_schema_validation(env):
    """Every object the launcher creates is valid for Kubernetes 1.30 (strict: no unknown fields). RayJob is a
    CRD whose schema is not available offline here, so its pod templates are validated as core PodTemplateSpecs
    (the CRD embeds exactly that type) and its own fields are checked by hand below."""
    import kubernetes_validate

    store, api = env
    launcher = _launcher(store, api, tls_secret="learner-tls", tls_client_auth=True, robot_tls_secret="robot-tls",
                         state_storage_class="fast-ssd", image_pull_secrets=["regcred"],
                         learner_service_annotations={"service.beta.kubernetes.io/aws-load-balancer-type": "nlb"},
                         node_selector={"nvidia.com/gpu.present": "true"},
                         tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}])
    job = store.create_job(JobSpec(name="v", tasks=["reach-v3"], resources={"gpus": 2, "cpus": 8},
                                   fleet={"robots": 3}), created_by="test")
    root = {"metadata": {"name": f"fl-{job.id}", "uid": "0000-1111"}}
    checked = 0
    for kuberay in (False, True):
        launcher.s = launcher.s.model_copy(update={"kuberay": kuberay, "ray_workers": 2 if kuberay else 0})
        for obj in launcher.manifests(job, root, robots=3):
            if obj["apiVersion"] == "ray.io/v1":
                for tpl in _pod_templates(obj):
                    kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate",
                                                  "metadata": {"name": "t"}, "template": tpl}, "1.30.0", strict=True)
                    checked += 1
            else:
                kubernetes_validate.validate(obj, "1.30.0", strict=True)
                checked += 1
    assert checked == 11  # 5 objects per mode + the RayJob's head and worker templates


def test_tls_and_gpu_workers(env):
    store, api = env
    core, apps, custom = client.CoreV1Api(api), client.AppsV1Api(api), client.CustomObjectsApi(api)
    launcher = _launcher(store, api, tls_secret="learner-tls", tls_client_auth=True, robot_tls_secret="robot-tls",
                         learner_service_annotations={"example.com/lb": "internal"}, image_pull_secrets=["regcred"])
    job = store.create_job(JobSpec(name="tls", tasks=["reach-v3"], fleet={"robots": 1}), created_by="test")
    launcher.launch(job)
    assert store.get_job(job.id).state == "starting", store.get_job(job.id).error
    cfg = json.loads(core.read_namespaced_config_map(f"fl-{job.id}", NS).data["learner.json"])
    assert (cfg["tls"]["cert_file"], cfg["tls"]["key_file"], cfg["tls"]["client_ca_file"]) == (
        "/etc/fleetloop/tls/tls.crt", "/etc/fleetloop/tls/tls.key", "/etc/fleetloop/tls/ca.crt")
    pod = apps.read_namespaced_deployment(f"fl-{job.id}-learner", NS).spec.template.spec
    assert {v.name: v.secret.secret_name for v in pod.volumes if v.secret} == {"tls": "learner-tls"}
    assert [s.name for s in pod.image_pull_secrets] == ["regcred"]
    robot = apps.read_namespaced_deployment(f"fl-{job.id}-robots", NS).spec.template.spec
    cmd = robot.containers[0].command
    assert cmd[cmd.index("--tls-ca") + 1] == "/etc/fleetloop/tls/ca.crt"
    assert cmd[cmd.index("--tls-cert") + 1] == "/etc/fleetloop/robot-tls/tls.crt"
    assert {v.secret.secret_name for v in robot.volumes if v.secret} == {"learner-tls", "robot-tls"}
    grpc = core.read_namespaced_service(f"fl-{job.id}-grpc", NS)
    assert grpc.metadata.annotations == {"example.com/lb": "internal"}

    # KubeRay with GPU workers: the head holds the job's resources (the learner actor and its gRPC server run
    # there, and only the head carries the labels the gRPC Service selects); workers add GPUs.
    ray = _launcher(store, api, kuberay=True, ray_workers=2, ray_worker_gpus=4,
                    node_selector={"gpu": "a100"}, tolerations=[{"key": "gpu", "operator": "Exists"}])
    rjob = store.create_job(JobSpec(name="ray-gpu", tasks=["reach-v3"], resources={"gpus": 1, "cpus": 6}), created_by="test")
    ray.launch(rjob)
    rj = custom.get_namespaced_custom_object("ray.io", "v1", NS, "rayjobs", f"fl-{rjob.id}-learner")
    cluster = rj["spec"]["rayClusterSpec"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "6"
    assert cluster["headGroupSpec"]["rayStartParams"]["num-gpus"] == "1"
    (group,) = cluster["workerGroupSpecs"]
    assert group["replicas"] == 2 and group["rayStartParams"]["num-gpus"] == "4"
    wpod = group["template"]["spec"]
    assert wpod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "4"
    assert wpod["nodeSelector"] == {"gpu": "a100"} and wpod["tolerations"][0]["key"] == "gpu"
    assert group["template"]["metadata"]["labels"]["app.kubernetes.io/component"] == "ray-worker"
    sel = core.read_namespaced_service(f"fl-{rjob.id}-grpc", NS).spec.selector
    assert all(cluster["headGroupSpec"]["template"]["metadata"]["labels"].get(k) == v for k, v in sel.items())
    assert not all(group["template"]["metadata"]["labels"].get(k) == v for k, v in sel.items())


def test_settings_from_environment_and_bad_values():
    from pydantic import ValidationError

    env = {"FLEETLOOP_K8S_RAY_WORKERS": "3", "FLEETLOOP_K8S_TLS_SECRET": "t", "FLEETLOOP_K8S_TLS_CLIENT_AUTH": "true",
           "FLEETLOOP_K8S_IMAGE_PULL_SECRETS": '["a", "b"]', "FLEETLOOP_K8S_NODE_SELECTOR": '{"gpu": "yes"}'}
    s = KubeSettings.from_env(env, defaults={"redis_url": "redis://r:6379/0"})
    assert (s.ray_workers, s.tls_secret, s.tls_client_auth, s.image_pull_secrets, s.node_selector) == (
        3, "t", True, ["a", "b"], {"gpu": "yes"})
    with pytest.raises(ValidationError, match="tls_client_auth"):
        KubeSettings(redis_url="redis://r", tls_client_auth=True)
    with pytest.raises(ValidationError, match="ray_workers"):
        KubeSettings(redis_url="redis://r", ray_workers=-1)
    with pytest.raises(Exception, match="FLEETLOOP_K8S_RAY_WORKER "):
        KubeSettings.from_env({"FLEETLOOP_K8S_RAY_WORKER": "1"})
