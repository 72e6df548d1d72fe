"""Offline checks of the Helm chart ``helm/fleetloop`` (no helm binary, no API server here).

Rendered with the Helm 4 SDK library (``helm-python-sdk``) for the defaults and every
``ci/*.yaml``, with and without the KubeRay / Prometheus-operator API versions; linted; values
checked against ``values.schema.json``; every built-in object validated by ``kubernetes-validate``
(strict, Kubernetes 1.30); the Prometheus-operator objects checked by hand (no CRD schema as data
here) and their rules with ``promtool``. Content checks tie the chart to the code it deploys: the
launcher settings parse as ``KubeSettings``, the Role covers every call ``k8s_reconciler`` makes,
container commands parse with the real ``fleetloop`` CLI, demo jobs validate as ``JobSpec``.
``lookup`` (keeping generated secrets on upgrade) is exercised against kmock.
"""

from __future__ import annotations

import base64
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.helpers.helm_render import (CHART_DIR, NAMESPACE, RELEASE, ROOT, chart, ci_values, env_of, kmock_kubeconfig,
                                       lint, pod_specs, render)

CASES = {"defaults": {}, **ci_values()}
ALL_APIS = ["ray.io/v1", "monitoring.coreos.com/v1"]
BUILTIN = {"v1", "apps/v1", "batch/v1", "policy/v1", "rbac.authorization.k8s.io/v1", "networking.k8s.io/v1"}
FULL = f"{RELEASE}-fleetloop"
API = f"{FULL}-api"


def _api_container(r) -> dict:
    return r.get("Deployment", API)["spec"]["template"]["spec"]["containers"][0]


def _secret_value(r, name: str, key: str) -> str | None:
    """A chart-made Secret's value, or None when the Secret is not rendered (the operator's own)."""
    found = [s for s in r.of_kind("Secret") if s["metadata"]["name"] == name]
    if not found:
        return None
    s = found[0]
    return s.get("stringData", {}).get(key) or base64.b64decode(s["data"][key]).decode()


def _expanded_env(r, container: dict) -> dict[str, str]:
    """The container's environment as the kubelet builds it: secretKeyRef values from the rendered
    Secrets (a placeholder for the operator's own), ``$(VAR)`` expanded only from earlier variables."""
    out: dict[str, str] = {}
    for e in container.get("env", []):
        if "value" in e:
            out[e["name"]] = re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: out.get(m[1], m[0]), e["value"])
        elif "secretKeyRef" in e.get("valueFrom", {}):
            ref = e["valueFrom"]["secretKeyRef"]
            out[e["name"]] = _secret_value(r, ref["name"], ref["key"]) or f"external-{ref['name']}-{ref['key']}"
        else:
            out[e["name"]] = f"<{e['name']}>"
    return out


# -- lint, schema, structure ---------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES)
def test_lint_reports_no_errors_or_warnings(case):
    report = lint(CASES[case])
    problems = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
    assert not problems, f"helm lint ({case}): {problems}"
    chart().validate_schema(CASES[case])


def test_chart_packages_and_the_archive_renders_the_same(tmp_path):
    import helm_python
    archive = chart().save(tmp_path)
    assert Path(archive).name == "fleetloop-0.1.0.tgz"
    with helm_python.Chart.load(archive) as packaged:
        assert (packaged.metadata["apiVersion"], packaged.metadata["appVersion"]) == ("v2", "0.1.0")
        files = packaged.render(CASES["demo-jobs.yaml"], name=RELEASE, namespace=NAMESPACE)
    assert sorted(type(render({}))(files).names()) == sorted(render(CASES["demo-jobs.yaml"]).names())


@pytest.mark.parametrize("apis", [[], ALL_APIS], ids=["bare-cluster", "kuberay+prom-operator"])
@pytest.mark.parametrize("case", CASES)
def test_every_object_is_valid_for_kubernetes_1_30(case, apis):
    import kubernetes_validate
    r = render(CASES[case], api_versions=apis)
    assert r.of_kind("Deployment"), r.names()
    for doc in r.docs:
        assert doc["metadata"]["namespace"] == NAMESPACE, doc["metadata"]
        assert doc["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE
        if doc["apiVersion"] in BUILTIN:
            kubernetes_validate.validate(doc, "1.30.0", strict=True)
        else:
            assert doc["apiVersion"] == "monitoring.coreos.com/v1", f"unexpected {doc['apiVersion']} {doc['kind']}"
            assert doc["kind"] in ("ServiceMonitor", "PodMonitor", "PrometheusRule"), doc["kind"]


@pytest.mark.parametrize("case", CASES)
def test_every_container_is_hardened_pinned_and_sized(case):
    r = render(CASES[case], api_versions=ALL_APIS)
    workloads = pod_specs(r.docs)
    assert {w.split("/")[0] for w, _ in workloads} >= {"Deployment"}
    for where, pod in workloads:
        psc = pod["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["runAsUser"] > 0 and psc["seccompProfile"]["type"] == "RuntimeDefault", where
        long_running = not where.startswith("Job/")
        for c in pod.get("initContainers", []) + pod["containers"]:
            at = f"{where} container {c['name']}"
            image = c["image"]
            tag = image.split("@")[0].rsplit("/", 1)[-1].partition(":")[2]
            assert tag and tag != "latest", f"{at}: image {image} has no pinned tag"
            assert c["imagePullPolicy"] in ("IfNotPresent", "Always", "Never"), at
            req, lim = c["resources"]["requests"], c["resources"].get("limits", {})
            assert req.get("cpu") and req.get("memory") and lim.get("memory"), f"{at}: resources {c['resources']}"
            sc = c["securityContext"]
            assert sc["runAsNonRoot"] is True and sc["readOnlyRootFilesystem"] is True, at
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"], at
            mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
            assert "emptyDir" in next(v for v in pod["volumes"] if v["name"] == mounts["/tmp"]), f"{at}: /tmp not an emptyDir"
            if long_running and c in pod["containers"]:
                assert c.get("livenessProbe") and c.get("readinessProbe"), f"{at}: probes missing"


@pytest.mark.parametrize("case", CASES)
def test_container_commands_are_real_cli_commands(case):
    from services.cli import build_parser
    r = render(CASES[case], api_versions=ALL_APIS)
    checked = 0
    for where, pod in pod_specs(r.docs):
        for c in pod.get("initContainers", []) + pod["containers"]:
            if c.get("command", [""])[0] == "fleetloop":
                build_parser().parse_args(c["command"][1:])  # SystemExit on an unknown command or flag
                checked += 1
    assert checked >= 1
    assert _api_container(r)["command"] == ["fleetloop", "api", "--launcher", "kubernetes", "--host", "0.0.0.0", "--port", "8000"]


# -- the launcher's settings and permissions -----------------------------------------------------

def _expected_launcher_fields(v: dict) -> set[str]:
    names = {"LEARNER_IMAGE", "ROBOT_IMAGE", "IMAGE_PULL_POLICY", "IMAGE_PULL_SECRETS", "REDIS_URL", "LEARNER_SERVICE_TYPE",
             "LEARNER_SERVICE_ANNOTATIONS", "KUBERAY", "RAY_WORKERS", "RAY_WORKER_GPUS", "STATE_SIZE", "NODE_SELECTOR",
             "TOLERATIONS", "LEARNER_MEMORY", "ROBOT_CPU", "ROBOT_MEMORY"}
    if v["learner"]["state"]["storageClass"]:
        names.add("STATE_STORAGE_CLASS")
    if v["learner"]["tls"]["secretName"]:
        names |= {"TLS_SECRET", "TLS_CLIENT_AUTH"}
    if v["robots"]["tlsSecret"]:
        names.add("ROBOT_TLS_SECRET")
    return names


def _image_ref(img: dict) -> str:
    return f"{img['repository']}:{img['tag']}" + (f"@{img['digest']}" if img.get("digest") else "")


@pytest.mark.parametrize("case", CASES)
def test_launcher_env_is_exactly_what_the_values_imply_and_parses_as_kube_settings(case):
    from services.control.launchers.k8s_settings import KubeSettings
    v = chart().merge_values(CASES[case])
    r = render(CASES[case])
    env = _expanded_env(r, _api_container(r))
    k8s = {k: val for k, val in env.items() if k.startswith("FLEETLOOP_K8S_")}
    assert {k.removeprefix("FLEETLOOP_K8S_") for k in k8s} == _expected_launcher_fields(v)
    unknown = {k for k in k8s if k.removeprefix("FLEETLOOP_K8S_").lower() not in KubeSettings.model_fields}
    assert not unknown, f"not KubeSettings fields (the API would refuse to start): {sorted(unknown)}"
    s = KubeSettings.from_env(k8s, defaults={"namespace": NAMESPACE})
    l = v["learner"]
    assert s.learner_image == _image_ref(l["image"]) and s.robot_image == _image_ref(v["robots"]["image"])
    assert s.image_pull_policy == v["imagePullPolicy"] and s.image_pull_secrets == v["imagePullSecrets"]
    assert s.redis_url == (l["redisUrl"] or env["REDIS_URL"]) and "$(" not in s.redis_url
    assert s.learner_service_type == l["service"]["type"] and s.learner_service_annotations == l["service"]["annotations"]
    assert s.kuberay is (l["kuberay"] is True)  # "auto" without ray.io/v1 in the cluster = false
    assert (s.ray_workers, s.ray_worker_gpus) == (l["ray"]["workers"], l["ray"]["gpusPerWorker"])
    assert s.node_selector == l["nodeSelector"] and s.tolerations == l["tolerations"]
    assert (s.state_storage_class or "", s.state_size, s.learner_memory) == (l["state"]["storageClass"], l["state"]["size"], l["memory"])
    assert (s.robot_cpu, s.robot_memory) == (str(v["robots"]["cpu"]), v["robots"]["memory"])
    assert (s.tls_secret or "", bool(s.tls_client_auth)) == (l["tls"]["secretName"], l["tls"]["clientAuth"])
    assert (s.robot_tls_secret or "") == v["robots"]["tlsSecret"]
    assert env["FLEETLOOP_NAMESPACE"] == "<FLEETLOOP_NAMESPACE>"  # downward API
    ns_ref = env_of(_api_container(r))["FLEETLOOP_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert ns_ref == "metadata.namespace"


def _launcher_permissions() -> set[tuple[str, str, str]]:
    """(apiGroup, resource, verb) of every Kubernetes call in services/control/launchers/k8s_reconciler.py."""
    src = (ROOT / "services" / "control" / "launchers" / "k8s_reconciler.py").read_text()
    verb = {"create": "create", "read": "get", "get": "get", "patch": "patch", "delete": "delete", "list": "list",
            "replace": "update", "watch": "watch"}
    needed = set()
    for api, op, kind in re.findall(r"self\.(core|apps)\.(\w+?)_namespaced_(\w+)\(", src):
        sub = "/status" if kind.endswith("_status") else ""
        needed.add(("" if api == "core" else "apps", kind.removesuffix("_status").replace("_", "") + "s" + sub, verb[op]))
    for op, sub, group, plural in re.findall(r"self\.custom\.(\w+?)_namespaced_custom_object(_status)?\(\s*\"([\w.]+)\",\s*\"\w+\",\s*[^,]+,\s*\"(\w+)\"", src):
        needed.add((group, plural + ("/status" if sub else ""), verb[op]))
    return needed


def _granted(role: dict) -> set[tuple[str, str, str]]:
    return {(g, res, vb) for rule in role["rules"] for g in rule["apiGroups"] for res in rule["resources"] for vb in rule["verbs"]}


def test_role_grants_every_call_the_launcher_makes():
    needed = _launcher_permissions()
    assert len(needed) >= 12 and {("ray.io", "rayjobs", "create"), ("ray.io", "rayjobs", "get")} <= needed, sorted(needed)  # the scan found the calls
    r = render({}, api_versions=["ray.io/v1"])
    role, binding = r.get("Role", f"{FULL}-launcher"), r.get("RoleBinding", f"{FULL}-launcher")
    assert not needed - _granted(role), f"Role misses {sorted(needed - _granted(role))}"
    contract = {(g, res, vb) for g, res in [("", "configmaps"), ("", "secrets"), ("", "services"), ("", "persistentvolumeclaims"),
                                            ("apps", "deployments"), ("ray.io", "rayjobs")]
                for vb in ("create", "get", "list", "watch", "patch", "delete")}
    assert contract | {("apps", "deployments/status", "get"), ("ray.io", "rayjobs/status", "get"), ("", "pods", "list")} <= _granted(role)
    sa = r.get("ServiceAccount", FULL)["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa, "namespace": NAMESPACE}]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert r.get("Deployment", API)["spec"]["template"]["spec"]["serviceAccountName"] == sa
    without_ray = _granted(render({}).get("Role", f"{FULL}-launcher"))
    assert not {g for g, _, _ in without_ray} & {"ray.io"}, "ray.io granted although learners are not RayJobs"


# -- capabilities ---------------------------------------------------------------------------------

@pytest.mark.parametrize("setting, apis, expected", [
    ("auto", [], "false"), ("auto", ["ray.io/v1"], "true"), (False, ["ray.io/v1"], "false"), (True, [], "true")])
def test_kuberay_follows_the_cluster_api_versions_when_auto(setting, apis, expected):
    r = render({"learner": {"kuberay": setting}}, api_versions=apis)
    env = env_of(_api_container(r))
    assert env["FLEETLOOP_K8S_KUBERAY"]["value"] == expected
    assert ("KubeRay RayJobs" in r.notes) is (expected == "true")


@pytest.mark.parametrize("apis, setting, present", [
    ([], "auto", False), (["monitoring.coreos.com/v1"], "auto", True), (["monitoring.coreos.com/v1"], False, False), ([], True, True)])
def test_monitoring_objects_follow_the_cluster_api_versions_when_auto(apis, setting, present):
    values = {"monitoring": {k: {"enabled": setting} for k in ("serviceMonitor", "podMonitor", "prometheusRule")}}
    kinds = {d["kind"] for d in render(values, api_versions=apis).docs}
    assert {"ServiceMonitor", "PodMonitor", "PrometheusRule"} <= kinds if present else not kinds & {"ServiceMonitor", "PodMonitor", "PrometheusRule"}


def test_monitoring_objects_select_the_launchers_objects_and_carry_the_rules(tmp_path):
    v = CASES["monitoring.yaml"]
    r = render(v)
    sm, pm, rule = r.get("ServiceMonitor", f"{FULL}-learners"), r.get("PodMonitor", f"{FULL}-robots"), r.get("PrometheusRule", f"{FULL}-rules")
    base = {"app.kubernetes.io/name": "fleetloop", "app.kubernetes.io/managed-by": "fleetloop-controlplane"}
    assert sm["spec"]["selector"]["matchLabels"] == {**base, "app.kubernetes.io/component": "learner"}
    assert pm["spec"]["selector"]["matchLabels"] == {**base, "app.kubernetes.io/component": "robot"}
    for obj, eps in ((sm, sm["spec"]["endpoints"]), (pm, pm["spec"]["podMetricsEndpoints"])):
        assert obj["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
        assert [e["port"] for e in eps] == ["metrics"] and all(e["honorLabels"] is True for e in eps)
        # the target labels the rules group by: fleetloop_component and job = the fleetloop job id
        role = "service" if obj is sm else "pod"
        assert {(tuple(x["sourceLabels"]), x["targetLabel"]) for x in eps[0]["relabelings"]} == {
            ((f"__meta_kubernetes_{role}_label_app_kubernetes_io_component",), "fleetloop_component"),
            ((f"__meta_kubernetes_{role}_label_fleetloop_dev_job",), "job")}
        assert obj["metadata"]["labels"]["release"] == v["monitoring"]["labels"]["release"]
    assert sm["spec"]["endpoints"][0]["interval"] == "10s" and pm["spec"]["podMetricsEndpoints"][0]["interval"] == "30s"
    groups = rule["spec"]["groups"]
    assert groups == yaml.safe_load((CHART_DIR / "files" / "prometheus-rules.yml").read_text())["groups"]
    for g in groups:
        assert g["name"] and g["rules"], g
        for rl in g["rules"]:
            assert rl["expr"] and (("record" in rl) != ("alert" in rl)), rl
    promtool = shutil.which("promtool")
    if promtool:  # the real checker, on exactly what the PrometheusRule carries
        f = tmp_path / "rules.yml"
        f.write_text(yaml.safe_dump({"groups": groups}))
        res = subprocess.run([promtool, "check", "rules", str(f)], capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stdout + res.stderr


def test_chart_rules_are_a_byte_copy_of_ops_rules():
    source = ROOT / "ops" / "prometheus" / "rules.yml"
    if not source.exists():
        pytest.skip("ops/prometheus/rules.yml does not exist yet")
    assert (CHART_DIR / "files" / "prometheus-rules.yml").read_bytes() == source.read_bytes(), \
        "copy ops/prometheus/rules.yml to helm/fleetloop/files/prometheus-rules.yml"


# -- Redis ----------------------------------------------------------------------------------------

def test_bundled_redis_is_an_append_only_statefulset_with_a_kept_password():
    r = render({"redis": {"bundled": {"persistence": {"storageClass": "fast", "size": "16Gi"}}}})
    sts = r.get("StatefulSet", f"{FULL}-redis")
    c = sts["spec"]["template"]["spec"]["containers"][0]
    args = c["args"]
    assert args[args.index("--appendonly") + 1] == "yes" and args[args.index("--dir") + 1] == "/data"
    assert args[args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    assert {"name": "data", "mountPath": "/data"} in c["volumeMounts"]
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["storageClassName"] == "fast" and claim["spec"]["resources"]["requests"]["storage"] == "16Gi"
    assert sts["spec"]["serviceName"] == r.get("Service", f"{FULL}-redis-headless")["metadata"]["name"]
    assert r.get("Service", f"{FULL}-redis-headless")["spec"]["clusterIP"] == "None"
    password = _secret_value(r, f"{FULL}-redis", "redis-password")
    assert password and len(password) == 40 and password.isalnum()
    api_env = list(env_of(_api_container(r)))
    assert api_env.index("REDIS_PASSWORD") < api_env.index("REDIS_URL") < api_env.index("FLEETLOOP_K8S_REDIS_URL")
    env = _expanded_env(r, _api_container(r))
    assert env["REDIS_URL"] == env["FLEETLOOP_K8S_REDIS_URL"] == f"redis://:{password}@{FULL}-redis.{NAMESPACE}.svc:6379/0"
    no_auth = render({"redis": {"bundled": {"auth": {"enabled": False}}}})
    assert _expanded_env(no_auth, _api_container(no_auth))["REDIS_URL"] == f"redis://{FULL}-redis.{NAMESPACE}.svc:6379/0"
    assert not [s for s in no_auth.of_kind("Secret") if s["metadata"]["name"] == f"{FULL}-redis"]


@pytest.mark.parametrize("external", [{"url": "rediss://:pw@redis.example:6380/0"},
                                      {"existingSecret": "managed-redis", "existingSecretKey": "url"}])
def test_external_redis_replaces_the_bundled_one(external):
    r = render({"redis": {"bundled": {"enabled": False}, "external": external}})
    assert not r.of_kind("StatefulSet") and not [s for s in r.of_kind("Service") if "redis" in s["metadata"]["name"]]
    ref = env_of(_api_container(r))["REDIS_URL"]["valueFrom"]["secretKeyRef"]
    if "url" in external:
        assert (ref["name"], ref["key"]) == (f"{FULL}-redis-url", "redis-url")
        assert _secret_value(r, ref["name"], "redis-url") == external["url"]
    else:
        assert (ref["name"], ref["key"]) == ("managed-redis", "url")
        assert [s["metadata"]["name"] for s in r.of_kind("Secret")] == [f"{FULL}-api-keys"]
    assert env_of(_api_container(r))["FLEETLOOP_K8S_REDIS_URL"]["value"] == "$(REDIS_URL)"


def test_changing_the_external_redis_url_rolls_the_api():
    def checksum(url: str) -> str:
        r = render({"redis": {"bundled": {"enabled": False}, "external": {"url": url}}})
        return r.get("Deployment", API)["spec"]["template"]["metadata"]["annotations"]["checksum/redis-url"]
    assert checksum("redis://a:6379/0") == checksum("redis://a:6379/0") != checksum("redis://b:6379/0")


# -- secrets --------------------------------------------------------------------------------------

def test_admin_key_is_generated_or_taken_from_the_operators_secret():
    r1, r2 = render({}), render({})
    k1, k2 = _secret_value(r1, f"{FULL}-api-keys", "admin-key"), _secret_value(r2, f"{FULL}-api-keys", "admin-key")
    assert k1 and len(k1) == 40 and k1 != k2  # random per fresh install (lookup keeps it on upgrades)
    ref = env_of(_api_container(r1))["FLEETLOOP_ADMIN_KEY"]["valueFrom"]["secretKeyRef"]
    assert (ref["name"], ref["key"]) == (f"{FULL}-api-keys", "admin-key")
    own = render({"apiKeys": {"existingSecret": "my-keys", "existingSecretKey": "admin"}, "jobs": [{"name": "j", "tasks": ["reach-v3"]}]})
    assert not [s for s in own.of_kind("Secret") if "api-keys" in s["metadata"]["name"]]
    assert env_of(_api_container(own))["FLEETLOOP_ADMIN_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "my-keys", "key": "admin"}
    hook = own.of_kind("Job")[0]["spec"]["template"]["spec"]
    for c in hook["initContainers"] + hook["containers"]:
        assert env_of(c)["FLEETLOOP_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "my-keys", "key": "admin"}
    assert "secret my-keys -o jsonpath='{.data.admin}'" in own.notes


@pytest.mark.timeout(60)
def test_generated_secrets_are_kept_on_upgrade_via_lookup():
    """Install = offline render (lookup empty); the Secrets go into kmock; an upgrade render that
    looks them up must carry the same admin key and Redis password, not fresh random ones."""
    import helm_python
    import kmock
    from kubernetes import client

    from tests.helpers.kmock_server import KmockServer
    srv = KmockServer().start()
    try:
        srv.emulator.resources["v1/secrets"] = kmock.ResourceInfo(kind="Secret", singular="secret", namespaced=True,
                                                                  verbs={"get", "list", "create"})
        first = render({})
        core = client.CoreV1Api(srv.api_client())
        for s in first.of_kind("Secret"):
            core.create_namespaced_secret(NAMESPACE, s)
        with helm_python.Config(kubeconfig_content=kmock_kubeconfig(srv.url), namespace=NAMESPACE) as cfg:
            files = cfg.render(chart(), name=RELEASE, namespace=NAMESPACE, is_upgrade=True)
        again = type(first)(files)
        for name, key in ((f"{FULL}-api-keys", "admin-key"), (f"{FULL}-redis", "redis-password")):
            assert _secret_value(again, name, key) == _secret_value(first, name, key), name
    finally:
        srv.stop()


# -- API exposure ---------------------------------------------------------------------------------

def test_ingress_with_tls_in_front_of_an_https_api():
    v = CASES["ingress-tls.yaml"]
    r = render(v)
    ing = r.get("Ingress", API)
    host = v["api"]["ingress"]["host"]
    assert ing["spec"]["ingressClassName"] == "nginx"
    assert ing["spec"]["tls"] == [{"hosts": [host], "secretName": v["api"]["ingress"]["tls"]["secretName"]}]
    (rule,) = ing["spec"]["rules"]
    backend = rule["http"]["paths"][0]["backend"]["service"]
    assert rule["host"] == host and backend == {"name": API, "port": {"name": "https"}}
    svc = r.get("Service", API)
    assert [p["name"] for p in svc["spec"]["ports"]] == ["https"]
    c = _api_container(r)
    env = env_of(c)
    mounted = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert env["FLEETLOOP_API_TLS_CERT"]["value"] == f"{mounted['api-tls']}/tls.crt"
    assert env["FLEETLOOP_API_TLS_KEY"]["value"] == f"{mounted['api-tls']}/tls.key"
    pod = r.get("Deployment", API)["spec"]["template"]["spec"]
    assert next(vol for vol in pod["volumes"] if vol["name"] == "api-tls")["secret"]["secretName"] == v["api"]["tls"]["secretName"]
    assert c["livenessProbe"]["httpGet"]["scheme"] == c["readinessProbe"]["httpGet"]["scheme"] == "HTTPS"
    assert f"https://{host}/" in r.notes and "port-forward" not in r.notes
    plain = render({})
    assert not plain.of_kind("Ingress") and "FLEETLOOP_API_TLS_CERT" not in env_of(_api_container(plain))


# -- demo jobs ------------------------------------------------------------------------------------

def test_demo_jobs_are_submitted_once_by_a_post_install_hook():
    from services.control.jobspec import JobSpec
    v = CASES["demo-jobs.yaml"]
    r = render(v)
    cm = r.get("ConfigMap", f"{FULL}-jobspecs")
    assert sorted(cm["data"]) == sorted(f"{j['name']}.yaml" for j in v["jobs"])
    for job in v["jobs"]:
        spec = yaml.safe_load(cm["data"][f"{job['name']}.yaml"])
        assert spec == job
        parsed = JobSpec.model_validate(spec)
        assert parsed.bootstrap is None  # the Kubernetes launcher refuses bootstrap
    assert any(JobSpec.model_validate(j).fleet and JobSpec.model_validate(j).fleet.robots > 0 for j in v["jobs"])
    hook = r.get("Job", f"{FULL}-submit-jobs")
    ann = hook["metadata"]["annotations"]
    assert ann["helm.sh/hook"] == "post-install"
    assert set(ann["helm.sh/hook-delete-policy"].split(",")) == {"before-hook-creation", "hook-succeeded"}
    pod = hook["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and hook["spec"]["backoffLimit"] == 0
    inits = pod["initContainers"]
    assert inits[0]["name"] == "wait-for-api"
    assert [c["command"] for c in inits[1:]] == [["fleetloop", "job", "submit", f"/specs/{j['name']}.yaml"] for j in v["jobs"]]
    assert next(vol for vol in pod["volumes"] if vol["name"] == "specs")["configMap"]["name"] == cm["metadata"]["name"]
    for c in inits + pod["containers"]:
        env = env_of(c)
        assert env["FLEETLOOP_API"]["value"] == f"http://{API}.{NAMESPACE}.svc:8000"
        assert env["FLEETLOOP_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": f"{FULL}-api-keys", "key": "admin-key"}
        assert {"name": "specs", "mountPath": "/specs", "readOnly": True} in c["volumeMounts"]
    https = render({**v, "api": {"tls": {"enabled": True, "secretName": "api-tls"}}})
    c = https.get("Job", f"{FULL}-submit-jobs")["spec"]["template"]["spec"]["containers"][0]
    assert env_of(c)["FLEETLOOP_API"]["value"].startswith("https://") and env_of(c)["SSL_CERT_FILE"]["value"].endswith("/ca.crt")
    assert not render({}).of_kind("Job")


def test_duplicate_job_names_are_refused():
    import helm_python
    with pytest.raises(helm_python.HelmError, match="metaworld-demo.*appears twice"):
        render({"jobs": [{"name": "metaworld-demo", "tasks": ["reach-v3"]}, {"name": "metaworld-demo", "tasks": ["push-v3"]}]})


def test_job_items_accept_exactly_the_jobspec_fields_a_cluster_job_can_use():
    from services.control.jobspec import JobSpec
    allowed = set(chart().schema["properties"]["jobs"]["items"]["properties"])
    assert allowed == set(JobSpec.model_fields) - {"bootstrap"}


# -- invalid values -------------------------------------------------------------------------------

@pytest.mark.parametrize("values, field", [
    ({"learner": {"service": {"type": "Foo"}}}, "/learner/service/type"),
    ({"learner": {"ray": {"workers": -1}}}, "/learner/ray/workers"),
    ({"learner": {"ray": {"gpusPerWorker": 0}}}, "/learner/ray/gpusPerWorker"),
    ({"learner": {"gpus": 1}}, "gpus"),
    ({"learner": {"kuberay": "yes"}}, "/learner/kuberay"),
    ({"redis": {"external": {"url": "redis://r:6379/0"}}}, "/redis/external/url"),
    ({"redis": {"bundled": {"enabled": False}}}, "/redis/external"),
    ({"api": {"image": {"tag": "latest"}}}, "/api/image/tag"),
    ({"learner": {"memory": "8 GB"}}, "/learner/memory"),
    ({"api": {"ingress": {"enabled": True}}}, "/api/ingress/host"),
    ({"learner": {"tls": {"clientAuth": True}}}, "/learner/tls/secretName"),
    ({"jobs": [{"name": "j", "tasks": ["reach-v3"], "bootstrap": {"demos_per_task": 2}}]}, "bootstrap"),
    ({"monitoring": {"serviceMonitor": {"enabled": "maybe"}}}, "/monitoring/serviceMonitor/enabled"),
    ({"robots": {"tlsSecret": "robot-cert"}}, "/learner/tls/secretName"),
])
def test_invalid_values_are_refused_naming_the_field(values, field):
    import helm_python
    with pytest.raises(helm_python.HelmValuesError) as err:
        chart().validate_schema(values)
    assert field in str(err.value), str(err.value)
    with pytest.raises(helm_python.HelmError):
        render(values)


# -- NOTES ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES)
def test_notes_explain_dashboard_key_submission_and_robot_connection(case):
    from services.cli import build_parser
    v = chart().merge_values(CASES[case])
    notes = render(CASES[case]).notes
    if not v["api"]["ingress"]["enabled"]:
        assert f"port-forward svc/{API} 8000:8000" in notes
    secret = v["apiKeys"]["existingSecret"] or f"{FULL}-api-keys"
    assert f"get secret {secret} -o jsonpath=" in notes and "fleetloop job submit" in notes
    assert f"fl-JOB_ID-grpc" in notes and "fleetloop job enroll JOB_ID" in notes
    # the robot command in NOTES parses with the real CLI (flags exist, values well formed)
    start = notes.index("fleetloop actor")
    cmd = notes[start:].split("\n")[0].rstrip("\\") + " " + notes[start:].split("\n")[1]
    args = build_parser().parse_args(shlex.split(cmd.replace("$HOST:$PORT", "h:50051").replace("$TOKEN", "t"))[1:])
    assert args.learner == "h:50051" and args.token == "t"
    if v["learner"]["tls"]["secretName"]:
        assert args.tls_ca == "ca.crt" and (args.tls_cert is not None) is v["learner"]["tls"]["clientAuth"]
