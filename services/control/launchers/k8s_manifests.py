"""The Kubernetes objects of a job, as plain dicts (no API calls): names, labels, pod specs, the
learner (Deployment or KubeRay RayJob), its Services, the simulated fleet's Deployment, the root
ConfigMap and the robot-token Secret. :mod:`.k8s_reconciler` creates them; tests validate them
against the Kubernetes schema."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from services.control.launchers.k8s_settings import (GRPC_PORT, LEARNER_COMMAND, METRICS_PORT, ROBOT_METRICS_PORT,
                                                      ROBOT_TLS_DIR, STATE_DIR, TLS_DIR, KubeSettings)
from services.control.state import JobRecord


def object_name(job_id: str, suffix: str = "") -> str:
    """``fl-ID[-suffix]``, cut to a valid Kubernetes name (63 characters)."""
    return f"fl-{job_id}{'-' + suffix if suffix else ''}"[:63].rstrip("-.")


def labels(job_id: str, component: str) -> dict[str, str]:
    """The labels of every object of a job (selectors use the job and component ones)."""
    return {"app.kubernetes.io/name": "fleetloop", "app.kubernetes.io/component": component,
            "app.kubernetes.io/managed-by": "fleetloop-controlplane", "fleetloop.dev/job": job_id}


POD_SECURITY = {"runAsNonRoot": True, "runAsUser": 10001, "fsGroup": 10001, "seccompProfile": {"type": "RuntimeDefault"}}
CONTAINER_SECURITY = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}}


def owner(root: dict[str, Any]) -> list[dict[str, Any]]:
    """ownerReferences to the job's root ConfigMap (deleting it garbage-collects the rest)."""
    return [{"apiVersion": "v1", "kind": "ConfigMap", "name": root["metadata"]["name"], "uid": root["metadata"]["uid"],
             "controller": True, "blockOwnerDeletion": True}]


def pod_common(s: KubeSettings) -> dict[str, Any]:
    common: dict[str, Any] = {"securityContext": POD_SECURITY}
    if s.image_pull_secrets:
        common["imagePullSecrets"] = [{"name": n} for n in s.image_pull_secrets]
    return common


def learner_pod_spec(s: KubeSettings, job: JobRecord, command: list[str] | None = None) -> dict[str, Any]:
    """Pod spec of a job's learner (Deployment template, or the RayJob's head)."""
    gpus = job.spec.resources.gpus
    limits = {"memory": s.learner_memory, **({"nvidia.com/gpu": str(gpus)} if gpus else {})}
    state = ({"name": "state", "persistentVolumeClaim": {"claimName": object_name(job.id, "state")}}
             if s.state_storage_class else {"name": "state", "emptyDir": {}})
    mounts = [{"name": "config", "mountPath": "/etc/fleetloop", "readOnly": True},
              {"name": "state", "mountPath": STATE_DIR}, {"name": "tmp", "mountPath": "/tmp"}]
    volumes = [{"name": "config", "configMap": {"name": object_name(job.id)}}, state, {"name": "tmp", "emptyDir": {}}]
    probe = {"tcpSocket": {"port": GRPC_PORT}, "periodSeconds": 5}
    if s.tls_secret:
        mounts.append({"name": "tls", "mountPath": TLS_DIR, "readOnly": True})
        volumes.append({"name": "tls", "secret": {"secretName": s.tls_secret, "defaultMode": 0o440}})
    return {
        **pod_common(s), "nodeSelector": s.node_selector, "tolerations": s.tolerations,
        "containers": [{
            "name": "learner", "image": s.learner_image, "imagePullPolicy": s.image_pull_policy,
            "command": command or LEARNER_COMMAND,
            "env": [{"name": "RAY_AUTH_MODE", "value": "disabled"}],
            "ports": [{"name": "grpc", "containerPort": GRPC_PORT}, {"name": "metrics", "containerPort": METRICS_PORT}],
            "resources": {"requests": {"cpu": str(job.spec.resources.cpus), "memory": s.learner_memory, **(
                {"nvidia.com/gpu": str(gpus)} if gpus else {})}, "limits": limits},
            "readinessProbe": probe,
            "livenessProbe": {"httpGet": {"path": "/metrics", "port": METRICS_PORT}, "initialDelaySeconds": 60,
                              "periodSeconds": 20},
            "securityContext": CONTAINER_SECURITY,
            "volumeMounts": mounts,
        }],
        "volumes": volumes,
    }


def ray_worker_pod_spec(s: KubeSettings) -> dict[str, Any]:
    """Pod spec of a KubeRay GPU worker (joins the job's Ray cluster; no fleetloop process of its own)."""
    gpus = str(s.ray_worker_gpus)
    return {
        **pod_common(s), "nodeSelector": s.node_selector, "tolerations": s.tolerations,
        "containers": [{
            "name": "ray-worker", "image": s.learner_image, "imagePullPolicy": s.image_pull_policy,
            "env": [{"name": "RAY_AUTH_MODE", "value": "disabled"}],
            "resources": {"requests": {"cpu": "1", "memory": s.learner_memory, "nvidia.com/gpu": gpus},
                          "limits": {"memory": s.learner_memory, "nvidia.com/gpu": gpus}},
            "securityContext": CONTAINER_SECURITY,
            "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}]}],
        "volumes": [{"name": "tmp", "emptyDir": {}}],
    }


def ray_job(s: KubeSettings, job: JobRecord, meta: dict[str, Any]) -> dict[str, Any]:
    """The learner as a KubeRay RayJob. HTTPMode runs the entrypoint as a Ray driver on the head, so it sees the
    head's mounts (config, state, TLS); the head holds the job's CPUs/GPUs, so the learner actor (and its gRPC
    server, which the Service selects) lands there. Workers add GPU capacity for data-parallel training."""
    jid, res = job.id, job.spec.resources
    head_params = {"num-cpus": str(math.ceil(res.cpus)), "num-gpus": str(res.gpus), "dashboard-host": "0.0.0.0"}
    cluster: dict[str, Any] = {"headGroupSpec": {
        "rayStartParams": head_params,
        "template": {"metadata": {"labels": labels(jid, "learner")}, "spec": learner_pod_spec(s, job)}}}
    if s.ray_workers:
        cluster["workerGroupSpecs"] = [{
            "groupName": "gpu", "replicas": s.ray_workers, "minReplicas": s.ray_workers,
            "maxReplicas": s.ray_workers, "rayStartParams": {"num-gpus": str(s.ray_worker_gpus)},
            "template": {"metadata": {"labels": labels(jid, "ray-worker")}, "spec": ray_worker_pod_spec(s)}}]
    return {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": meta, "spec": {
        "entrypoint": " ".join(LEARNER_COMMAND + ["--ray-address", "auto"]),
        "submissionMode": "HTTPMode", "shutdownAfterJobFinishes": True, "rayClusterSpec": cluster}}


def robot_tls_args(s: KubeSettings) -> tuple[list[str], list[dict[str, Any]], list[dict[str, Any]]]:
    """Actor flags, mounts and volumes for simulated robots when learners serve TLS."""
    if not s.tls_secret:
        return [], [], []
    args = ["--tls-ca", f"{TLS_DIR}/ca.crt"]
    mounts = [{"name": "tls-ca", "mountPath": TLS_DIR, "readOnly": True}]
    volumes = [{"name": "tls-ca", "secret": {"secretName": s.tls_secret, "defaultMode": 0o444,
                                              "items": [{"key": "ca.crt", "path": "ca.crt"}]}}]
    if s.robot_tls_secret:
        args += ["--tls-cert", f"{ROBOT_TLS_DIR}/tls.crt", "--tls-key", f"{ROBOT_TLS_DIR}/tls.key"]
        mounts.append({"name": "robot-tls", "mountPath": ROBOT_TLS_DIR, "readOnly": True})
        volumes.append({"name": "robot-tls", "secret": {"secretName": s.robot_tls_secret, "defaultMode": 0o440}})
    return args, mounts, volumes


def manifests(s: KubeSettings, job: JobRecord, root: dict[str, Any], robots: int) -> list[dict[str, Any]]:
    """Every child object of a job (owned by ``root``), in creation order."""
    jid, ns, owners = job.id, s.namespace, owner(root)

    def meta(name: str, component: str) -> dict[str, Any]:
        return {"name": name, "namespace": ns, "labels": labels(jid, component), "ownerReferences": owners}

    learner_sel = {"fleetloop.dev/job": jid, "app.kubernetes.io/component": "learner"}
    objs: list[dict[str, Any]] = []
    if s.state_storage_class:
        objs.append({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                     "metadata": meta(object_name(jid, "state"), "learner"),
                     "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": s.state_storage_class,
                              "resources": {"requests": {"storage": s.state_size}}}})
    if s.kuberay:
        objs.append(ray_job(s, job, meta(object_name(jid, "learner"), "learner")))
    else:
        objs.append({"apiVersion": "apps/v1", "kind": "Deployment",
                     "metadata": meta(object_name(jid, "learner"), "learner"),
                     "spec": {"replicas": 1, "strategy": {"type": "Recreate"}, "selector": {"matchLabels": learner_sel},
                              "template": {"metadata": {"labels": labels(jid, "learner")},
                                           "spec": learner_pod_spec(s, job)}}})
    grpc_meta = meta(object_name(jid, "grpc"), "learner")
    if s.learner_service_annotations:
        grpc_meta["annotations"] = dict(s.learner_service_annotations)
    objs.append({"apiVersion": "v1", "kind": "Service", "metadata": grpc_meta,
                 "spec": {"type": s.learner_service_type, "selector": learner_sel,
                          "ports": [{"name": "grpc", "port": GRPC_PORT, "targetPort": "grpc", "protocol": "TCP"}]}})
    objs.append({"apiVersion": "v1", "kind": "Service", "metadata": meta(object_name(jid, "metrics"), "learner"),
                 "spec": {"type": "ClusterIP", "selector": learner_sel,
                          "ports": [{"name": "metrics", "port": METRICS_PORT, "targetPort": "metrics"}]}})
    fleet = job.spec.fleet
    if fleet is not None:
        target = f"{object_name(jid, 'grpc')}.{ns}.svc:{GRPC_PORT}"
        robot_sel = {"fleetloop.dev/job": jid, "app.kubernetes.io/component": "robot"}
        tls_args, tls_mounts, tls_volumes = robot_tls_args(s)
        objs.append({"apiVersion": "apps/v1", "kind": "Deployment",
                     "metadata": meta(object_name(jid, "robots"), "robot"),
                     "spec": {"replicas": robots, "selector": {"matchLabels": robot_sel},
                              "template": {"metadata": {"labels": labels(jid, "robot")}, "spec": {
                                  **pod_common(s),
                                  "containers": [{
                                      "name": "robot", "image": s.robot_image, "imagePullPolicy": s.image_pull_policy,
                                      "command": ["fleetloop", "actor", "--learner", target, "--job", jid, "--tasks",
                                                  ",".join(job.spec.tasks), "--operator", fleet.operator, "--hz", str(fleet.hz),
                                                  "--spool", "/tmp/spool", "--metrics-port", str(ROBOT_METRICS_PORT),
                                                  "--metrics-host", "0.0.0.0",
                                                  # one actor id per pod (its name; k8s expands $(VAR) from env),
                                                  # matching the fleet enrollment's actors pattern
                                                  "--actor-id", "$(POD_NAME)",
                                                  *fleet.actor_args(), *tls_args],
                                      "env": [{"name": "FLEETLOOP_ROBOT_TOKEN", "valueFrom": {"secretKeyRef": {
                                          "name": object_name(jid, "robot-token"), "key": "token"}}},
                                              {"name": "POD_NAME", "valueFrom": {"fieldRef": {
                                                  "fieldPath": "metadata.name"}}}],
                                      "ports": [{"name": "metrics", "containerPort": ROBOT_METRICS_PORT}],
                                      "resources": {"requests": {"cpu": s.robot_cpu, "memory": s.robot_memory},
                                                    "limits": {"memory": s.robot_memory}},
                                      "livenessProbe": {"httpGet": {"path": "/metrics", "port": ROBOT_METRICS_PORT},
                                                        "initialDelaySeconds": 30, "periodSeconds": 20},
                                      "securityContext": CONTAINER_SECURITY,
                                      "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}, *tls_mounts]}],
                                  "volumes": [{"name": "tmp", "emptyDir": {}}, *tls_volumes]}}}})
    return objs


def learner_tls(s: KubeSettings) -> dict[str, Any]:
    """LearnerConfig ``tls`` group fields for the mounted ``tls_secret`` (none without one)."""
    if not s.tls_secret:
        return {}
    return {"cert_file": Path(TLS_DIR, "tls.crt"), "key_file": Path(TLS_DIR, "tls.key"),
            "client_ca_file": Path(TLS_DIR, "ca.crt") if s.tls_client_auth else None}


def root_config_map(s: KubeSettings, job: JobRecord, learner_json: str) -> dict[str, Any]:
    """The job's root object: the learner's config and the JobSpec; every other object is owned by it."""
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": object_name(job.id), "namespace": s.namespace, "labels": labels(job.id, "job")},
            "data": {"learner.json": learner_json, "jobspec.json": job.spec.model_dump_json(indent=2)}}


def robot_token_secret(s: KubeSettings, job_id: str, token: str, root: dict[str, Any]) -> dict[str, Any]:
    """The simulated fleet's enrolled robot token (``FLEETLOOP_ROBOT_TOKEN`` of the robot pods)."""
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque", "stringData": {"token": token},
            "metadata": {"name": object_name(job_id, "robot-token"), "namespace": s.namespace,
                         "labels": labels(job_id, "robot"), "ownerReferences": owner(root)}}


def describe(obj: dict[str, Any]) -> str:
    """``Kind/name`` of a manifest (for logs and test messages)."""
    return f"{obj['kind']}/{obj['metadata']['name']}"

