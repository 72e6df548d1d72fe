"""Policy export with the Kubernetes launcher: the API pod does not share the learner's volume, so
``KubernetesLauncher.open_weights`` fetches the version from the learner's gRPC weight service.

kmock (in-memory Kubernetes API) holds the job's objects and the TLS Secrets; the learner is the
real one (``build_learner(...).serve()``, enrollment credentials from the real redis-server) on a
loopback port, which stands in for its in-cluster Service name (``learner_grpc_target``; the name
does not resolve here). Plaintext and mTLS (the Secrets' CA and robot client certificate).
"""

from __future__ import annotations

import base64
import time

import pytest
from fastapi.testclient import TestClient
from kubernetes import client as kclient

from fleetloop.errors import FailedPrecondition, NotFound
from fleetloop.tls import init_certs
from learner.process import build_learner
from services.control.api import create_app
from services.control.jobspec import JobSpec, learner_config
from services.control.launchers.grpc_weights import EXPORT_ACTOR
from services.control.launchers.k8s_reconciler import KubernetesLauncher
from services.control.launchers.k8s_settings import KubeSettings
from services.control.state import StateStore
from tests.helpers.control_plane import start_redis
from tests.helpers.kmock_server import KmockServer

pytestmark = pytest.mark.timeout(180)
NS = "fleet"


def _secret(core, name: str, files: dict[str, bytes]) -> None:
    core.create_namespaced_secret(NS, {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name},
                                       "data": {k: base64.b64encode(v).decode() for k, v in files.items()}})


@pytest.mark.parametrize("tls", [False, True], ids=["plaintext", "mtls"])
def test_open_weights_fetches_from_the_learner_over_grpc(tmp_path, tls):
    redis_server = start_redis(tmp_path)
    kube = KmockServer().start()
    learner = None
    try:
        store = StateStore(redis_server.url)
        api_client = kube.api_client()
        extra = {}
        if tls:
            certs = init_certs(tmp_path / "certs", ["localhost", "127.0.0.1"])
            core = kclient.CoreV1Api(api_client)
            _secret(core, "learner-tls", {"tls.crt": certs["server.pem"].read_bytes(), "tls.key": certs["server.key"].read_bytes(),
                                          "ca.crt": certs["ca.pem"].read_bytes()})
            _secret(core, "robot-tls", {"tls.crt": certs["client.pem"].read_bytes(), "tls.key": certs["client.key"].read_bytes()})
            extra = {"tls_secret": "learner-tls", "tls_client_auth": True, "robot_tls_secret": "robot-tls"}
        settings = KubeSettings(namespace=NS, redis_url="redis://redis.fleet.svc:6379/0", **extra)
        launcher = KubernetesLauncher(store, api_client, settings)
        spec = JobSpec(name="k8s-export", tasks=["reach-v3"])
        job = store.create_job(spec, created_by="test")
        launcher.launch(job)  # the job's objects, in kmock
        cfg = learner_config(spec, job.id, tmp_path / "learner", store.url)
        if tls:
            cfg = cfg.model_copy(update={"tls": cfg.tls.model_copy(update={
                "cert_file": certs["server.pem"], "key_file": certs["server.key"], "client_ca_file": certs["ca.pem"]})})
        learner = build_learner(cfg.model_dump_json()).serve(train=False)
        assert launcher.learner_grpc_target(job.id) == f"fl-{job.id}-grpc.{NS}.svc:50051"
        launcher.learner_grpc_target = lambda job_id: f"127.0.0.1:{learner.port}"
        store.update_job(job.id, state="running")
        for _ in range(2):
            learner.core.publish()

        stream = launcher.open_weights(job.id, 1)
        blob = learner.core.weights.blob(1)
        assert stream.size_bytes == len(blob) and b"".join(stream.chunks) == blob
        with pytest.raises(NotFound, match="version 7"):
            launcher.open_weights(job.id, 7)
        mine = [e for e in store.enrollments(job.id) if e.name == EXPORT_ACTOR]
        assert len(mine) == 1 and mine[0].actors == [EXPORT_ACTOR]  # one credential, reused

        # over REST (the version index is what the learner's control agent reports)
        app = create_app(store, launcher, reconcile=False, supervise=False)
        key, _ = store.create_api_key("viewer", "v")
        with TestClient(app) as c:
            deadline = time.monotonic() + 20
            while store.version(job.id, 2) is None and time.monotonic() < deadline:
                time.sleep(0.2)
            r = c.get(f"/v1/jobs/{job.id}/policies/2/weights", headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == 200 and r.content == learner.core.weights.blob(2), r.text
            assert r.headers["x-fleetloop-sha256"] == learner.core.weights.info(2).sha256

        # an API restart: the lost credential is revoked, a new one works
        again = KubernetesLauncher(store, api_client, settings)
        again.learner_grpc_target = launcher.learner_grpc_target
        assert b"".join(again.open_weights(job.id, 0).chunks) == learner.core.weights.blob(0)
        mine = [e for e in store.enrollments(job.id) if e.name == EXPORT_ACTOR]
        assert len(mine) == 2 and sum(e.revoked_at is None for e in mine) == 1

        store.update_job(job.id, state="stopped")
        with pytest.raises(FailedPrecondition, match="stopped"):
            launcher.open_weights(job.id, 1)
    finally:
        if learner is not None:
            learner.stop(checkpoint=False)
        kube.stop()
        redis_server.stop()
