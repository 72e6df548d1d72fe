"""KubernetesLauncher: a job's learner and simulated fleet as Kubernetes objects (the API calls and
the reconciling; the objects themselves are built by :mod:`.k8s_manifests`, the settings are
:mod:`.k8s_settings`).

Implements the :class:`~services.control.launchers.base.Launcher` interface with the official ``kubernetes``
client. For a job ``ID`` in namespace ``NS`` it creates (names ``fl-ID-*``, labels
``app.kubernetes.io/name=fleetloop``, ``app.kubernetes.io/component``, ``fleetloop.dev/job=ID``):

- ``ConfigMap fl-ID``: the job's root object (``learner.json``, ``jobspec.json``); every other
  object carries an ownerReference to it, so deleting it garbage-collects the rest;
- ``Secret fl-ID-robot-token``: the simulated fleet's enrolled robot token;
- the learner: ``Deployment fl-ID-learner`` (one pod, Recreate; GPUs from the JobSpec) running
  ``fleetloop learner --config /etc/fleetloop/learner.json``, or with KubeRay a ``RayJob
  fl-ID-learner`` whose entrypoint is the same command;
- ``Service fl-ID-grpc`` (LoadBalancer / NodePort / ClusterIP: how robots outside reach the
  learner) and ``Service fl-ID-metrics`` (ClusterIP, for Prometheus);
- ``Deployment fl-ID-robots``: simulated robots (``fleetloop actor``), replicas = fleet size.

The learner talks to the control plane through Redis only (``control_redis_url``), exactly as
with the local launcher, except for policy export: :meth:`KubernetesLauncher.open_weights` fetches a
version from the running learner's gRPC weight service at its in-cluster Service (the API pod does
not mount the learner's volume) with a credential the control plane enrolls for itself (actor
``control-plane-export``, one enrollment per job and API process; a previous process's one is revoked
when a new one is made); with ``tls_secret`` it trusts that Secret's ``ca.crt`` (and presents
``robot_tls_secret``'s certificate under ``tls_client_auth``), so the learner's certificate must name
``fl-ID-grpc.NS.svc``; :meth:`supervise_once` watches the learner's Deployment/RayJob status and
the Redis heartbeat and moves the job between ``starting``, ``running`` and ``failed``.

Verified here against kmock (an in-memory Kubernetes API emulator); no real API server was
available, so scheduling, garbage collection by the real controller and KubeRay's behaviour are
not exercised (stop also deletes every child explicitly, so it does not depend on the GC).
"""

from __future__ import annotations

import threading
import time
from typing import Any

from fleetloop.errors import FailedPrecondition, FleetloopError, Unavailable
from fleetloop.logs import event, get_logger
from services.control.jobspec import JobSpec, learner_config
from services.control.launchers import k8s_manifests
from services.control.launchers.base import SupervisedLauncher
from services.control.launchers.k8s_manifests import object_name
from services.control.launchers.k8s_settings import GRPC_PORT, METRICS_PORT, STATE_DIR, KubeSettings
from services.control.state import ACTIVE_STATES, JobRecord, LearnerEndpoint, StateStore

log = get_logger("services.k8s_launcher")


class KubernetesLauncher(SupervisedLauncher):
    """See module docstring."""

    def __init__(self, store: StateStore, api_client, settings: KubeSettings) -> None:
        from kubernetes import client
        self.store, self.s = store, settings
        self.core = client.CoreV1Api(api_client)
        self.apps = client.AppsV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)
        self._export_tokens: dict[str, str] = {}  # job -> this process's weight-fetch credential
        self._export_lock = threading.Lock()
        super().__init__(log, "k8s-supervisor")

    @classmethod
    def from_environment(cls, store: StateStore, namespace: str | None = None) -> "KubernetesLauncher":
        """In a pod: in-cluster config; elsewhere: the kubeconfig. Settings from ``FLEETLOOP_K8S_*``."""
        from kubernetes import client, config
        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        settings = KubeSettings.from_env(defaults={"redis_url": store.url},
                                         **({"namespace": namespace} if namespace else {}))
        return cls(store, client.ApiClient(), settings)

    # -- objects (built by k8s_manifests) ------------------------------------------------------
    def learner_pod_spec(self, job: JobRecord, command: list[str] | None = None) -> dict[str, Any]:
        """Pod spec of a job's learner (Deployment template, or the RayJob's head)."""
        return k8s_manifests.learner_pod_spec(self.s, job, command)

    def ray_worker_pod_spec(self) -> dict[str, Any]:
        """Pod spec of a KubeRay GPU worker (joins the job's Ray cluster; no fleetloop process of its own)."""
        return k8s_manifests.ray_worker_pod_spec(self.s)

    def manifests(self, job: JobRecord, root: dict[str, Any], robots: int) -> list[dict[str, Any]]:
        """Every child object of a job (owned by ``root``), in creation order."""
        return k8s_manifests.manifests(self.s, job, root, robots)

    def _create(self, obj: dict[str, Any]) -> None:
        ns, kind = self.s.namespace, obj["kind"]
        if kind == "Deployment":
            self.apps.create_namespaced_deployment(ns, obj)
        elif kind == "Service":
            self.core.create_namespaced_service(ns, obj)
        elif kind == "Secret":
            self.core.create_namespaced_secret(ns, obj)
        elif kind == "PersistentVolumeClaim":
            self.core.create_namespaced_persistent_volume_claim(ns, obj)
        elif kind == "RayJob":
            self.custom.create_namespaced_custom_object("ray.io", "v1", ns, "rayjobs", obj)
        else:
            raise FailedPrecondition(f"no creator for kind {kind}", field="kind", value=kind)

    def _delete(self, kind: str, name: str) -> None:
        from kubernetes.client import ApiException
        ns = self.s.namespace
        fn = {"Deployment": lambda: self.apps.delete_namespaced_deployment(name, ns, propagation_policy="Foreground"),
              "Service": lambda: self.core.delete_namespaced_service(name, ns),
              "Secret": lambda: self.core.delete_namespaced_secret(name, ns),
              "ConfigMap": lambda: self.core.delete_namespaced_config_map(name, ns, propagation_policy="Foreground"),
              "PersistentVolumeClaim": lambda: self.core.delete_namespaced_persistent_volume_claim(name, ns),
              "RayJob": lambda: self.custom.delete_namespaced_custom_object("ray.io", "v1", ns, "rayjobs", name)}[kind]
        try:
            fn()
        except ApiException as exc:
            if exc.status != 404:
                raise

    # -- Launcher interface -------------------------------------------------------------------
    def validate(self, spec: JobSpec) -> None:
        if spec.bootstrap is not None:
            raise FailedPrecondition("bootstrap (recording demos and pretraining) runs only with the local launcher; in a "
                                     "cluster give offline_dataset / initial_weights paths on the learner's volume",
                                     field="bootstrap", value="set")

    def launch(self, job: JobRecord) -> None:
        from kubernetes.client import ApiException
        try:
            self.store.update_job(job.id, state="starting")
            cfg = learner_config(job.spec, job.id, STATE_DIR, self.s.redis_url, host="0.0.0.0")
            # not validated here: the TLS files exist in the learner pod (mounted), not in this one
            cfg = cfg.model_copy(update={
                "serving": cfg.serving.model_copy(update={"port": GRPC_PORT, "metrics_port": METRICS_PORT}),
                "tls": cfg.tls.model_copy(update=k8s_manifests.learner_tls(self.s))})
            root_obj = k8s_manifests.root_config_map(self.s, job, cfg.model_dump_json(indent=2))
            root = self.core.create_namespaced_config_map(self.s.namespace, root_obj).to_dict()
            root = {"metadata": {"name": root["metadata"]["name"], "uid": root["metadata"].get("uid") or ""}}
            robots = job.spec.fleet.robots if job.spec.fleet else 0
            if job.spec.fleet is not None:
                token, _ = self.store.enroll(job.id, "simulated-fleet", by="launcher",
                                             actors=[f"{object_name(job.id, 'robots')}-*"])
                self.core.create_namespaced_secret(self.s.namespace,
                                                   k8s_manifests.robot_token_secret(self.s, job.id, token, root))
            for obj in self.manifests(job, root, robots):
                self._create(obj)
            internal = f"{object_name(job.id, 'grpc')}.{self.s.namespace}.svc:{GRPC_PORT}"
            self.store.update_job(job.id, learner=LearnerEndpoint(target=internal, metrics_port=METRICS_PORT), fleet_robots=robots)
            self.store.emit(job.id, "objects_created", namespace=self.s.namespace, root=object_name(job.id), kuberay=self.s.kuberay)
            event(log, "job_objects_created", job=job.id, namespace=self.s.namespace)
        except (ApiException, FleetloopError) as exc:
            msg = f"Kubernetes API: {exc.status} {exc.reason}" if isinstance(exc, ApiException) else str(exc)
            event(log, "job_failed", level=40, job=job.id, error=msg[:300])
            self.store.update_job(job.id, state="failed", error=msg[:2000])

    def scale_fleet(self, job_id: str, robots: int) -> int:
        job = self.store.get_job(job_id)
        if job.spec.fleet is None:
            raise FailedPrecondition(f"job {job_id!r} has no simulated fleet in its spec", field="fleet", value=None)
        self.apps.patch_namespaced_deployment(object_name(job_id, "robots"), self.s.namespace, {"spec": {"replicas": robots}})
        self.store.update_job(job_id, fleet_robots=robots)
        self.store.emit(job_id, "fleet_scaled", robots=robots)
        return robots

    def stop(self, job_id: str, grace_s: float = 30.0) -> None:
        self.store.update_job(job_id, state="stopping")
        self.store.push_command(job_id, "drain", None, by="launcher")  # robots finish their episode, flush, leave
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(time.time() - a["last_seen"] < 3.0 for a in self.store.actors(job_id)):
            time.sleep(0.5)
        for kind, suffix in (("Deployment", "robots"), ("Deployment", "learner"), ("RayJob", "learner"), ("Service", "grpc"),
                             ("Service", "metrics"), ("Secret", "robot-token"), ("PersistentVolumeClaim", "state"), ("ConfigMap", "")):
            self._delete(kind, object_name(job_id, suffix))
        self.store.finalize_learner(job_id)  # the learner's final numbers outlive its heartbeat
        self.store.update_job(job_id, state="stopped", fleet_robots=0)
        self.store.emit(job_id, "stopped", deleted=object_name(job_id))

    def alive(self, job_id: str) -> bool:
        hb = self.store.heartbeat(job_id)
        return hb is not None and time.time() - hb < 30

    def learner_grpc_target(self, job_id: str) -> str:
        """The learner's gRPC address inside the cluster (its ClusterIP Service name)."""
        return f"{object_name(job_id, 'grpc')}.{self.s.namespace}.svc:{GRPC_PORT}"

    def _export_token(self, job_id: str) -> str:
        from services.control.launchers.grpc_weights import EXPORT_ACTOR
        with self._export_lock:
            if job_id not in self._export_tokens:
                for old in self.store.enrollments(job_id):  # tokens of a previous API process are lost: revoke them
                    if old.name == EXPORT_ACTOR and old.revoked_at is None:
                        self.store.revoke_enrollment(job_id, old.id, by="launcher")
                self._export_tokens[job_id], _ = self.store.enroll(job_id, EXPORT_ACTOR, by="launcher", actors=[EXPORT_ACTOR])
            return self._export_tokens[job_id]

    def _grpc_credentials(self):
        """TLS credentials for learners (None: they serve plaintext): ``tls_secret``'s ca.crt, plus
        ``robot_tls_secret``'s client certificate under ``tls_client_auth``."""
        if not self.s.tls_secret:
            return None
        import base64

        import grpc

        def read(name: str, *keys: str) -> list[bytes | None]:
            data = self.core.read_namespaced_secret(name, self.s.namespace).data or {}
            return [base64.b64decode(data[k]) if data.get(k) else None for k in keys]
        (ca,) = read(self.s.tls_secret, "ca.crt")
        cert = key = None
        if self.s.tls_client_auth and self.s.robot_tls_secret:
            cert, key = read(self.s.robot_tls_secret, "tls.crt", "tls.key")
        return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)

    def open_weights(self, job_id: str, version: int):
        """Fetch ``version`` from the job's running learner (:mod:`.grpc_weights`); FailedPrecondition when
        the job is not running (its weights are on the learner's volume only), NotFound when the learner
        no longer has the version."""
        from services.control.launchers.grpc_weights import fetch_weights
        job = self.store.get_job(job_id)
        if job.state not in ("running", "paused"):
            raise FailedPrecondition(f"job {job_id!r} is {job.state}: its weights live on its learner's volume and are "
                                     "served only while its learner runs", field="state", value=job.state)
        return fetch_weights(self.learner_grpc_target(job_id), job_id, version, self._export_token(job_id),
                             self._grpc_credentials())

    def evaluate(self, job_id: str, version: int, trials: int) -> None:
        raise FailedPrecondition("evaluation jobs are not available with the Kubernetes launcher yet (local launcher only)",
                                 field="launcher", value="kubernetes")

    def learner_phase(self, job_id: str) -> str:
        """'ready', 'pending', 'failed' or 'missing' from the learner's Deployment / RayJob status."""
        from kubernetes.client import ApiException
        try:
            if self.s.kuberay:
                obj = self.custom.get_namespaced_custom_object("ray.io", "v1", self.s.namespace, "rayjobs", object_name(job_id, "learner"))
                status = (obj or {}).get("status") or {}
                if status.get("jobStatus") == "FAILED" or status.get("jobDeploymentStatus") == "Failed":
                    return "failed"
                return "ready" if status.get("jobStatus") == "RUNNING" else "pending"
            dep = self.apps.read_namespaced_deployment(object_name(job_id, "learner"), self.s.namespace)
        except ApiException as exc:
            if exc.status == 404:
                return "missing"
            raise Unavailable(f"Kubernetes API: {exc.status} {exc.reason}", field="kubernetes") from None
        return "ready" if dep.status is not None and (dep.status.available_replicas or 0) >= 1 else "pending"

    def external_target(self, job_id: str) -> str | None:
        """The gRPC address robots outside the cluster use (LoadBalancer ingress or NodePort), if known."""
        svc = self.core.read_namespaced_service(object_name(job_id, "grpc"), self.s.namespace)
        ingress = (svc.status.load_balancer.ingress or []) if svc.status and svc.status.load_balancer else []
        if ingress:
            return f"{ingress[0].ip or ingress[0].hostname}:{GRPC_PORT}"
        if svc.spec.type == "NodePort" and svc.spec.ports and svc.spec.ports[0].node_port:
            return f"<node address>:{svc.spec.ports[0].node_port}"
        return None

    def supervise_once(self) -> list[str]:
        """Sync job states from the objects' status and the learner heartbeat; returns changed job ids."""
        changed = []
        for job in self.store.list_jobs():
            if job.state not in ("starting", "running", "paused"):
                continue
            phase = self.learner_phase(job.id)
            if phase in ("failed", "missing"):
                self.store.update_job(job.id, state="failed", error=f"learner {phase} ({object_name(job.id, 'learner')})")
                changed.append(job.id)
            elif job.state == "starting" and phase == "ready" and self.alive(job.id):
                ext = self.external_target(job.id)
                learner = job.learner.model_copy(update={"target": ext}) if ext and job.learner else job.learner
                self.store.update_job(job.id, state="running", learner=learner)
                changed.append(job.id)
        return changed

    def reconcile(self) -> list[str]:
        """Jobs whose root object is gone (e.g. deleted by hand) are relaunched; others are left as they are."""
        from kubernetes.client import ApiException
        resumed = []
        for job in self.store.list_jobs():
            if job.state not in ACTIVE_STATES:
                continue
            try:
                self.core.read_namespaced_config_map(object_name(job.id), self.s.namespace)
            except ApiException as exc:
                if exc.status != 404:
                    raise
                self.store.emit(job.id, "relaunched", previous_state=job.state)
                self.launch(job)
                resumed.append(job.id)
        return resumed

    def shutdown(self) -> None:
        """Jobs keep running in the cluster when the control plane stops (they are independent objects)."""
        super().shutdown()
