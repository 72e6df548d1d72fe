"""KubernetesLauncher: a job's learner and simulated fleet as Kubernetes objects.

Implements the :class:`~services.launcher.Launcher` interface with the official ``kubernetes``
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
with the local launcher; :meth:`supervise_once` watches the learner's Deployment/RayJob status and
the Redis heartbeat and moves the job between ``starting``, ``running`` and ``failed``.

Verified here against kmock (an in-memory Kubernetes API emulator); no real API server was
available, so scheduling, garbage collection by the real controller and KubeRay's behaviour are
not exercised (stop also deletes every child explicitly, so it does not depend on the GC).
"""

from __future__ import annotations

import math
import os
import threading
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from fleetloop.errors import FailedPrecondition, FleetloopError, Unavailable
from fleetloop.logs import event, get_logger
from services.jobspec import JobSpec, learner_config
from services.state import ACTIVE_STATES, JobRecord, LearnerEndpoint, StateStore

log = get_logger("services.k8s_launcher")
GRPC_PORT, METRICS_PORT, ROBOT_METRICS_PORT = 50051, 9400, 9100
STATE_DIR = "/var/lib/fleetloop/learner"
TLS_DIR, ROBOT_TLS_DIR = "/etc/fleetloop/tls", "/etc/fleetloop/robot-tls"
LEARNER_COMMAND = ["fleetloop", "learner", "--config", "/etc/fleetloop/learner.json"]


class KubeSettings(BaseModel):
    """How the Kubernetes launcher builds a job's objects (env ``FLEETLOOP_K8S_*`` in the API pod)."""

    model_config = ConfigDict(extra="forbid")
    namespace: str = Field("default", description="Namespace of every job object.")
    learner_image: str = Field("fleetloop/learner:0.1.0", description="Image of the learner.")
    robot_image: str = Field("fleetloop/robot:0.1.0", description="Image of the simulated robots.")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = Field("IfNotPresent", description="Pull policy of both.")
    redis_url: str = Field(description="Redis URL as seen from job pods (control agent + enrollment checks).")
    learner_service_type: Literal["LoadBalancer", "NodePort", "ClusterIP"] = Field(
        "LoadBalancer", description="Service type of a learner's gRPC endpoint (robots outside need LoadBalancer/NodePort).")
    kuberay: bool = Field(False, description="Run learners as KubeRay RayJobs (the KubeRay operator must be installed).")
    state_storage_class: str | None = Field(None, description="StorageClass for the learner's state volume; None = emptyDir "
                                                              "(state lost when the pod moves).")
    state_size: str = Field("20Gi", description="Size of the learner's state volume.")
    node_selector: dict[str, str] = Field(default_factory=dict, description="nodeSelector of learner pods (e.g. GPU nodes).")
    tolerations: list[dict[str, Any]] = Field(default_factory=list, description="Tolerations of learner pods.")
    learner_memory: str = Field("8Gi", description="Memory request (and limit) of a learner.")
    robot_cpu: str = Field("1", description="CPU request of a simulated robot.")
    robot_memory: str = Field("1Gi", description="Memory request (and limit) of a simulated robot.")
    image_pull_secrets: list[str] = Field(default_factory=list, description="Names of image pull Secrets for job pods.")
    learner_service_annotations: dict[str, str] = Field(
        default_factory=dict, description="Annotations of a learner's gRPC Service (e.g. a cloud load balancer's settings).")
    ray_workers: int = Field(0, ge=0, le=64, description="KubeRay only: GPU worker replicas in each job's Ray cluster "
                                                          "(capacity for data-parallel training; the learner runs on the head).")
    ray_worker_gpus: int = Field(1, ge=1, le=16, description="KubeRay only: GPUs (nvidia.com/gpu) per Ray worker.")
    tls_secret: str | None = Field(None, description="Secret (tls.crt, tls.key, optional ca.crt) mounted into learners: "
                                                      "their gRPC endpoint serves TLS; simulated robots trust its ca.crt.")
    tls_client_auth: bool = Field(False, description="With tls_secret: learners require client certificates signed by its "
                                                     "ca.crt (mTLS); simulated robots then need robot_tls_secret.")
    robot_tls_secret: str | None = Field(None, description="Secret (tls.crt, tls.key) with the client certificate simulated "
                                                            "robots present when tls_client_auth is on.")

    @model_validator(mode="after")
    def _tls(self) -> "KubeSettings":
        if self.tls_client_auth and not self.tls_secret:
            raise ValueError(f"tls_client_auth=true needs tls_secret (got tls_secret={self.tls_secret!r})")
        if self.robot_tls_secret and not self.tls_secret:
            raise ValueError(f"robot_tls_secret={self.robot_tls_secret!r} needs tls_secret (the learner serves TLS)")
        return self


def _name(job_id: str, suffix: str = "") -> str:
    return f"fl-{job_id}{'-' + suffix if suffix else ''}"[:63].rstrip("-.")


def _labels(job_id: str, component: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "fleetloop", "app.kubernetes.io/component": component,
            "app.kubernetes.io/managed-by": "fleetloop-controlplane", "fleetloop.dev/job": job_id}


_POD_SECURITY = {"runAsNonRoot": True, "runAsUser": 10001, "fsGroup": 10001, "seccompProfile": {"type": "RuntimeDefault"}}
_CONTAINER_SECURITY = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}}


class KubernetesLauncher:
    """See module docstring."""

    def __init__(self, store: StateStore, api_client, settings: KubeSettings) -> None:
        from kubernetes import client
        self.store, self.s = store, settings
        self.core = client.CoreV1Api(api_client)
        self.apps = client.AppsV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)
        self._closed = threading.Event()

    @classmethod
    def from_environment(cls, store: StateStore, namespace: str | None = None) -> "KubernetesLauncher":
        """In a pod: in-cluster config; elsewhere: the kubeconfig. Settings from ``FLEETLOOP_K8S_*``."""
        from kubernetes import client, config
        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        from services.config_files import env_overrides
        values: dict[str, Any] = {"redis_url": os.environ.get("FLEETLOOP_K8S_REDIS_URL") or store.url,
                                  **env_overrides(KubeSettings, "FLEETLOOP_K8S_")}
        if namespace:
            values["namespace"] = namespace
        return cls(store, client.ApiClient(), KubeSettings.model_validate(values))

    # -- objects -------------------------------------------------------------------------------
    def _owner(self, root: dict[str, Any]) -> list[dict[str, Any]]:
        return [{"apiVersion": "v1", "kind": "ConfigMap", "name": root["metadata"]["name"], "uid": root["metadata"]["uid"],
                 "controller": True, "blockOwnerDeletion": True}]

    def _pod_common(self) -> dict[str, Any]:
        common: dict[str, Any] = {"securityContext": _POD_SECURITY}
        if self.s.image_pull_secrets:
            common["imagePullSecrets"] = [{"name": n} for n in self.s.image_pull_secrets]
        return common

    def learner_pod_spec(self, job: JobRecord, command: list[str] | None = None) -> dict[str, Any]:
        """Pod spec of a job's learner (Deployment template, or the RayJob's head)."""
        gpus = job.spec.resources.gpus
        limits = {"memory": self.s.learner_memory, **({"nvidia.com/gpu": str(gpus)} if gpus else {})}
        state = ({"name": "state", "persistentVolumeClaim": {"claimName": _name(job.id, "state")}}
                 if self.s.state_storage_class else {"name": "state", "emptyDir": {}})
        mounts = [{"name": "config", "mountPath": "/etc/fleetloop", "readOnly": True},
                  {"name": "state", "mountPath": STATE_DIR}, {"name": "tmp", "mountPath": "/tmp"}]
        volumes = [{"name": "config", "configMap": {"name": _name(job.id)}}, state, {"name": "tmp", "emptyDir": {}}]
        probe = {"tcpSocket": {"port": GRPC_PORT}, "periodSeconds": 5}
        if self.s.tls_secret:
            mounts.append({"name": "tls", "mountPath": TLS_DIR, "readOnly": True})
            volumes.append({"name": "tls", "secret": {"secretName": self.s.tls_secret, "defaultMode": 0o440}})
        return {
            **self._pod_common(), "nodeSelector": self.s.node_selector, "tolerations": self.s.tolerations,
            "containers": [{
                "name": "learner", "image": self.s.learner_image, "imagePullPolicy": self.s.image_pull_policy,
                "command": command or LEARNER_COMMAND,
                "env": [{"name": "RAY_AUTH_MODE", "value": "disabled"}],
                "ports": [{"name": "grpc", "containerPort": GRPC_PORT}, {"name": "metrics", "containerPort": METRICS_PORT}],
                "resources": {"requests": {"cpu": str(job.spec.resources.cpus), "memory": self.s.learner_memory, **(
                    {"nvidia.com/gpu": str(gpus)} if gpus else {})}, "limits": limits},
                "readinessProbe": probe,
                "livenessProbe": {"httpGet": {"path": "/metrics", "port": METRICS_PORT}, "initialDelaySeconds": 60,
                                  "periodSeconds": 20},
                "securityContext": _CONTAINER_SECURITY,
                "volumeMounts": mounts,
            }],
            "volumes": volumes,
        }

    def ray_worker_pod_spec(self) -> dict[str, Any]:
        """Pod spec of a KubeRay GPU worker (joins the job's Ray cluster; no fleetloop process of its own)."""
        gpus = str(self.s.ray_worker_gpus)
        return {
            **self._pod_common(), "nodeSelector": self.s.node_selector, "tolerations": self.s.tolerations,
            "containers": [{
                "name": "ray-worker", "image": self.s.learner_image, "imagePullPolicy": self.s.image_pull_policy,
                "env": [{"name": "RAY_AUTH_MODE", "value": "disabled"}],
                "resources": {"requests": {"cpu": "1", "memory": self.s.learner_memory, "nvidia.com/gpu": gpus},
                              "limits": {"memory": self.s.learner_memory, "nvidia.com/gpu": gpus}},
                "securityContext": _CONTAINER_SECURITY,
                "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}]}],
            "volumes": [{"name": "tmp", "emptyDir": {}}],
        }

    def _ray_job(self, job: JobRecord, meta: dict[str, Any]) -> dict[str, Any]:
        """The learner as a KubeRay RayJob. HTTPMode runs the entrypoint as a Ray driver on the head, so it sees the
        head's mounts (config, state, TLS); the head holds the job's CPUs/GPUs, so the learner actor (and its gRPC
        server, which the Service selects) lands there. Workers add GPU capacity for data-parallel training."""
        jid, res = job.id, job.spec.resources
        head_params = {"num-cpus": str(math.ceil(res.cpus)), "num-gpus": str(res.gpus), "dashboard-host": "0.0.0.0"}
        cluster: dict[str, Any] = {"headGroupSpec": {
            "rayStartParams": head_params,
            "template": {"metadata": {"labels": _labels(jid, "learner")}, "spec": self.learner_pod_spec(job)}}}
        if self.s.ray_workers:
            cluster["workerGroupSpecs"] = [{
                "groupName": "gpu", "replicas": self.s.ray_workers, "minReplicas": self.s.ray_workers,
                "maxReplicas": self.s.ray_workers, "rayStartParams": {"num-gpus": str(self.s.ray_worker_gpus)},
                "template": {"metadata": {"labels": _labels(jid, "ray-worker")}, "spec": self.ray_worker_pod_spec()}}]
        return {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": meta, "spec": {
            "entrypoint": " ".join(LEARNER_COMMAND + ["--ray-address", "auto"]),
            "submissionMode": "HTTPMode", "shutdownAfterJobFinishes": True, "rayClusterSpec": cluster}}

    def _robot_tls_args(self) -> tuple[list[str], list[dict[str, Any]], list[dict[str, Any]]]:
        """Actor flags, mounts and volumes for simulated robots when learners serve TLS."""
        if not self.s.tls_secret:
            return [], [], []
        args = ["--tls-ca", f"{TLS_DIR}/ca.crt"]
        mounts = [{"name": "tls-ca", "mountPath": TLS_DIR, "readOnly": True}]
        volumes = [{"name": "tls-ca", "secret": {"secretName": self.s.tls_secret, "defaultMode": 0o444,
                                                  "items": [{"key": "ca.crt", "path": "ca.crt"}]}}]
        if self.s.robot_tls_secret:
            args += ["--tls-cert", f"{ROBOT_TLS_DIR}/tls.crt", "--tls-key", f"{ROBOT_TLS_DIR}/tls.key"]
            mounts.append({"name": "robot-tls", "mountPath": ROBOT_TLS_DIR, "readOnly": True})
            volumes.append({"name": "robot-tls", "secret": {"secretName": self.s.robot_tls_secret, "defaultMode": 0o440}})
        return args, mounts, volumes

    def manifests(self, job: JobRecord, root: dict[str, Any], robots: int) -> list[dict[str, Any]]:
        """Every child object of a job (owned by ``root``), in creation order."""
        jid, ns, owner = job.id, self.s.namespace, self._owner(root)

        def meta(name: str, component: str) -> dict[str, Any]:
            return {"name": name, "namespace": ns, "labels": _labels(jid, component), "ownerReferences": owner}

        learner_sel = {"fleetloop.dev/job": jid, "app.kubernetes.io/component": "learner"}
        objs: list[dict[str, Any]] = []
        if self.s.state_storage_class:
            objs.append({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": meta(_name(jid, "state"), "learner"),
                         "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": self.s.state_storage_class,
                                  "resources": {"requests": {"storage": self.s.state_size}}}})
        if self.s.kuberay:
            objs.append(self._ray_job(job, meta(_name(jid, "learner"), "learner")))
        else:
            objs.append({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta(_name(jid, "learner"), "learner"),
                         "spec": {"replicas": 1, "strategy": {"type": "Recreate"}, "selector": {"matchLabels": learner_sel},
                                  "template": {"metadata": {"labels": _labels(jid, "learner")},
                                               "spec": self.learner_pod_spec(job)}}})
        grpc_meta = meta(_name(jid, "grpc"), "learner")
        if self.s.learner_service_annotations:
            grpc_meta["annotations"] = dict(self.s.learner_service_annotations)
        objs.append({"apiVersion": "v1", "kind": "Service", "metadata": grpc_meta,
                     "spec": {"type": self.s.learner_service_type, "selector": learner_sel,
                              "ports": [{"name": "grpc", "port": GRPC_PORT, "targetPort": "grpc", "protocol": "TCP"}]}})
        objs.append({"apiVersion": "v1", "kind": "Service", "metadata": meta(_name(jid, "metrics"), "learner"),
                     "spec": {"type": "ClusterIP", "selector": learner_sel,
                              "ports": [{"name": "metrics", "port": METRICS_PORT, "targetPort": "metrics"}]}})
        fleet = job.spec.fleet
        if fleet is not None:
            target = f"{_name(jid, 'grpc')}.{ns}.svc:{GRPC_PORT}"
            robot_sel = {"fleetloop.dev/job": jid, "app.kubernetes.io/component": "robot"}
            tls_args, tls_mounts, tls_volumes = self._robot_tls_args()
            objs.append({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta(_name(jid, "robots"), "robot"),
                         "spec": {"replicas": robots, "selector": {"matchLabels": robot_sel},
                                  "template": {"metadata": {"labels": _labels(jid, "robot")}, "spec": {
                                      **self._pod_common(),
                                      "containers": [{
                                          "name": "robot", "image": self.s.robot_image, "imagePullPolicy": self.s.image_pull_policy,
                                          "command": ["fleetloop", "actor", "--learner", target, "--job", jid, "--tasks",
                                                      ",".join(job.spec.tasks), "--operator", fleet.operator, "--hz", str(fleet.hz),
                                                      "--spool", "/tmp/spool", "--metrics-port", str(ROBOT_METRICS_PORT),
                                                      "--metrics-host", "0.0.0.0",
                                                      # one actor id per pod (its name; k8s expands $(VAR) from env),
                                                      # matching the fleet enrollment's actors pattern
                                                      "--actor-id", "$(POD_NAME)",
                                                      *tls_args],
                                          "env": [{"name": "FLEETLOOP_ROBOT_TOKEN", "valueFrom": {"secretKeyRef": {
                                              "name": _name(jid, "robot-token"), "key": "token"}}},
                                                  {"name": "POD_NAME", "valueFrom": {"fieldRef": {
                                                      "fieldPath": "metadata.name"}}}],
                                          "ports": [{"name": "metrics", "containerPort": ROBOT_METRICS_PORT}],
                                          "resources": {"requests": {"cpu": self.s.robot_cpu, "memory": self.s.robot_memory},
                                                        "limits": {"memory": self.s.robot_memory}},
                                          "livenessProbe": {"httpGet": {"path": "/metrics", "port": ROBOT_METRICS_PORT},
                                                            "initialDelaySeconds": 30, "periodSeconds": 20},
                                          "securityContext": _CONTAINER_SECURITY,
                                          "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}, *tls_mounts]}],
                                      "volumes": [{"name": "tmp", "emptyDir": {}}, *tls_volumes]}}}})
        return objs

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

    def _learner_tls(self) -> dict[str, Any]:
        """LearnerConfig TLS fields for the mounted ``tls_secret`` (none without one)."""
        if not self.s.tls_secret:
            return {}
        from pathlib import Path as P
        return {"tls_cert_file": P(TLS_DIR, "tls.crt"), "tls_key_file": P(TLS_DIR, "tls.key"),
                "tls_client_ca_file": P(TLS_DIR, "ca.crt") if self.s.tls_client_auth else None}

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
            cfg = cfg.model_copy(update={"port": GRPC_PORT, "metrics_port": METRICS_PORT, **self._learner_tls()})
            root_obj = {"apiVersion": "v1", "kind": "ConfigMap",
                        "metadata": {"name": _name(job.id), "namespace": self.s.namespace, "labels": _labels(job.id, "job")},
                        "data": {"learner.json": cfg.model_dump_json(indent=2), "jobspec.json": job.spec.model_dump_json(indent=2)}}
            root = self.core.create_namespaced_config_map(self.s.namespace, root_obj).to_dict()
            root = {"metadata": {"name": root["metadata"]["name"], "uid": root["metadata"].get("uid") or ""}}
            robots = job.spec.fleet.robots if job.spec.fleet else 0
            if job.spec.fleet is not None:
                token, _ = self.store.enroll(job.id, "simulated-fleet", by="launcher",
                                                  actors=[f"{_name(job.id, 'robots')}-*"])
                self.core.create_namespaced_secret(self.s.namespace, {
                    "apiVersion": "v1", "kind": "Secret", "type": "Opaque", "stringData": {"token": token},
                    "metadata": {"name": _name(job.id, "robot-token"), "namespace": self.s.namespace,
                                 "labels": _labels(job.id, "robot"), "ownerReferences": self._owner(root)}})
            for obj in self.manifests(job, root, robots):
                self._create(obj)
            internal = f"{_name(job.id, 'grpc')}.{self.s.namespace}.svc:{GRPC_PORT}"
            self.store.update_job(job.id, learner=LearnerEndpoint(target=internal, metrics_port=METRICS_PORT), fleet_robots=robots)
            self.store.emit(job.id, "objects_created", namespace=self.s.namespace, root=_name(job.id), kuberay=self.s.kuberay)
            event(log, "job_objects_created", job=job.id, namespace=self.s.namespace)
        except (ApiException, FleetloopError) as exc:
            msg = f"Kubernetes API: {exc.status} {exc.reason}" if isinstance(exc, ApiException) else str(exc)
            event(log, "job_failed", level=40, job=job.id, error=msg[:300])
            self.store.update_job(job.id, state="failed", error=msg[:2000])

    def scale_fleet(self, job_id: str, robots: int) -> int:
        job = self.store.get_job(job_id)
        if job.spec.fleet is None:
            raise FailedPrecondition(f"job {job_id!r} has no simulated fleet in its spec", field="fleet", value=None)
        self.apps.patch_namespaced_deployment(_name(job_id, "robots"), self.s.namespace, {"spec": {"replicas": robots}})
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
            self._delete(kind, _name(job_id, suffix))
        self.store.finalize_learner(job_id)  # the learner's final numbers outlive its heartbeat
        self.store.update_job(job_id, state="stopped", fleet_robots=0)
        self.store.emit(job_id, "stopped", deleted=_name(job_id))

    def alive(self, job_id: str) -> bool:
        hb = self.store.heartbeat(job_id)
        return hb is not None and time.time() - hb < 30

    def evaluate(self, job_id: str, version: int, trials: int) -> None:
        raise FailedPrecondition("evaluation jobs are not available with the Kubernetes launcher yet (local launcher only)",
                                 field="launcher", value="kubernetes")

    def learner_phase(self, job_id: str) -> str:
        """'ready', 'pending', 'failed' or 'missing' from the learner's Deployment / RayJob status."""
        from kubernetes.client import ApiException
        try:
            if self.s.kuberay:
                obj = self.custom.get_namespaced_custom_object("ray.io", "v1", self.s.namespace, "rayjobs", _name(job_id, "learner"))
                status = (obj or {}).get("status") or {}
                if status.get("jobStatus") == "FAILED" or status.get("jobDeploymentStatus") == "Failed":
                    return "failed"
                return "ready" if status.get("jobStatus") == "RUNNING" else "pending"
            dep = self.apps.read_namespaced_deployment(_name(job_id, "learner"), self.s.namespace)
        except ApiException as exc:
            if exc.status == 404:
                return "missing"
            raise Unavailable(f"Kubernetes API: {exc.status} {exc.reason}", field="kubernetes") from None
        return "ready" if dep.status is not None and (dep.status.available_replicas or 0) >= 1 else "pending"

    def external_target(self, job_id: str) -> str | None:
        """The gRPC address robots outside the cluster use (LoadBalancer ingress or NodePort), if known."""
        svc = self.core.read_namespaced_service(_name(job_id, "grpc"), self.s.namespace)
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
                self.store.update_job(job.id, state="failed", error=f"learner {phase} ({_name(job.id, 'learner')})")
                changed.append(job.id)
            elif job.state == "starting" and phase == "ready" and self.alive(job.id):
                ext = self.external_target(job.id)
                learner = job.learner.model_copy(update={"target": ext}) if ext and job.learner else job.learner
                self.store.update_job(job.id, state="running", learner=learner)
                changed.append(job.id)
        return changed

    def start_supervisor(self, interval_s: float = 5.0) -> None:
        def loop() -> None:
            while not self._closed.wait(interval_s):
                try:
                    self.supervise_once()
                except Exception as exc:
                    event(log, "supervisor_error", level=40, error=repr(exc)[:300])
        threading.Thread(target=loop, name="k8s-supervisor", daemon=True).start()

    def reconcile(self) -> list[str]:
        """Jobs whose root object is gone (e.g. deleted by hand) are relaunched; others are left as they are."""
        from kubernetes.client import ApiException
        resumed = []
        for job in self.store.list_jobs():
            if job.state not in ACTIVE_STATES:
                continue
            try:
                self.core.read_namespaced_config_map(_name(job.id), self.s.namespace)
            except ApiException as exc:
                if exc.status != 404:
                    raise
                self.store.emit(job.id, "relaunched", previous_state=job.state)
                self.launch(job)
                resumed.append(job.id)
        return resumed

    def shutdown(self) -> None:
        """Jobs keep running in the cluster when the control plane stops (they are independent objects)."""
        self._closed.set()


def describe(obj: dict[str, Any]) -> str:
    """``Kind/name`` of a manifest (for logs and test messages)."""
    return f"{obj['kind']}/{obj['metadata']['name']}"

