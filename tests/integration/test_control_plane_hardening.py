"""Control-plane hardening (issue 17, items 8, 9, 12, 14) on real parts: a real redis-server, the
real API over HTTP (uvicorn on a free port, hold launcher: jobs are accepted, no learner), and the
real ``fleetloop`` CLI in subprocesses.

- 8: ``fleetloop up`` with its default, relative ``--data runs/controlplane`` starts (redis-server
  gets absolute paths) and the local ``fleetloop job`` commands find its key; slow: the example
  Meta-World job submitted with ``fleetloop job submit`` publishes a trained version.
- 9: an events cursor that matches the pattern but not Redis's 64-bit stream id range is a 422
  naming ``after`` and its value (not a 503, nothing logged as a failure).
- 12: ``/openapi.json`` publishes each algorithm's ``algorithm_params`` schema; an unknown param is a
  422 at its full path, and ``fleetloop job submit`` prints that path.
- 14: a 405 lists every method of the path in ``Allow``; an unparseable body is reported only to a
  caller whose key may use the route (401 / 403 first).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from learner.algorithms import ALGORITHMS
from services.control.api import create_app
from services.control.launchers.hold import HoldLauncher
from services.control.redis_server import free_port
from services.control.state import StateStore
from tests.helpers.control_plane import ApiServer, client, start_redis, wait_for
from tests.helpers.procs import stop_session

ROOT = Path(__file__).resolve().parents[2]
FLEETLOOP = [str(Path(sys.executable).with_name("fleetloop"))]
U64_MAX = 2**64 - 1


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    """Real Redis + the API (hold launcher) on a free port; keys of every role and one job."""
    redis = start_redis(tmp_path_factory.mktemp("hardening-redis"))
    store = StateStore(redis.url)
    keys = {role: store.create_api_key(role, f"test-{role}")[0] for role in ("admin", "operator", "viewer")}
    server = ApiServer(create_app(store, HoldLauncher(store), command_timeout_s=0.2, reconcile=False)).start()
    try:
        r = client(server.url, keys["operator"]).post("/v1/jobs", json={"name": "hardening", "tasks": ["reach-v3"]})
        assert r.status_code == 201, r.text
        yield {"url": server.url, "keys": keys, "job": r.json()["id"], "store": store}
    finally:
        server.stop()
        redis.stop()


# -- item 9: event cursors out of Redis's range ---------------------------------------------------
@pytest.mark.timeout(60)
@pytest.mark.parametrize("after", ["99999999999999999999999-0", f"{U64_MAX + 1}-0", f"0-{U64_MAX + 1}"])
def test_event_cursor_out_of_stream_id_range_is_422_naming_after(api, after, capfd):
    r = client(api["url"], api["keys"]["viewer"]).get(f"/v1/jobs/{api['job']}/events", params={"after": after})
    assert r.status_code == 422, r.text
    (problem,) = r.json()["detail"]
    assert problem["loc"] == ["query", "after"] and problem["input"] == after, problem
    assert after in problem["msg"] and "after" in problem["msg"], problem
    assert "request_failed" not in capfd.readouterr().err  # a client error, not a store failure


@pytest.mark.timeout(60)
def test_event_cursors_at_the_edge_of_the_range_are_served(api):
    c = client(api["url"], api["keys"]["viewer"])
    events = c.get(f"/v1/jobs/{api['job']}/events").json()
    assert events, "the submitted job has events"
    assert c.get(f"/v1/jobs/{api['job']}/events", params={"after": events[0]["id"]}).json() == events[1:]
    for after in (f"{U64_MAX}-{U64_MAX}", f"{U64_MAX}-0"):  # the largest ids: nothing follows them
        r = c.get(f"/v1/jobs/{api['job']}/events", params={"after": after})
        assert r.status_code == 200 and r.json() == [], (after, r.status_code, r.text)


# -- item 12: algorithm_params in the schema, errors at the full path --------------------------------
@pytest.mark.timeout(60)
def test_openapi_publishes_each_algorithms_params_schema(api):
    doc = httpx.get(api["url"] + "/openapi.json", timeout=30).json()
    schemas = doc["components"]["schemas"]
    spec = schemas["JobSpec"]["properties"]
    assert sorted(spec["algorithm"]["enum"]) == sorted(ALGORITHMS)
    variants = spec["algorithm_params"]["anyOf"]
    by_ref = {v["$ref"].rsplit("/", 1)[-1]: v for v in variants}
    assert len(variants) == len(ALGORITHMS), variants
    for name, cls in ALGORITHMS.items():
        component = cls.Config.__name__
        assert component in by_ref, (name, list(by_ref))
        assert repr(name) in by_ref[component]["description"]  # which `algorithm` the variant applies to
        published = schemas[component]
        assert set(published["properties"]) == set(cls.Config.model_fields), component
        assert published["additionalProperties"] is False  # unknown keys are refused, and the schema says so


@pytest.mark.timeout(60)
def test_algorithm_params_errors_name_the_full_path_and_valid_params_are_accepted_as_before(api):
    op = client(api["url"], api["keys"]["operator"])
    r = op.post("/v1/jobs", json={"name": "typo", "tasks": ["reach-v3"], "algorithm_params": {"beta_typo": 1}})
    assert r.status_code == 422, r.text
    (problem,) = r.json()["detail"]
    assert problem["loc"] == ["body", "algorithm_params", "beta_typo"] and problem["input"] == 1, problem
    assert problem["type"] == "extra_forbidden" and "hg_dagger" in problem["msg"], problem
    r = op.post("/v1/jobs", json={"name": "bins", "tasks": ["reach-v3"], "algorithm": "recap",
                                  "algorithm_params": {"num_bins": 1, "value_hidden": [8, 8]}})
    assert r.status_code == 422 and [p["loc"] for p in r.json()["detail"]] == [["body", "algorithm_params", "num_bins"]], r.text
    for algorithm, params in (("hg_dagger", {"lr": 0.01, "train_on": "all"}), ("recap", {"num_bins": 11})):
        r = op.post("/v1/jobs", json={"name": "ok", "tasks": ["reach-v3"], "algorithm": algorithm, "algorithm_params": params})
        assert r.status_code == 201, r.text
        assert r.json()["spec"]["algorithm_params"] == params  # stored and echoed exactly as submitted


@pytest.mark.timeout(120)
def test_cli_submit_prints_the_full_field_path(api, tmp_path):
    spec = tmp_path / "typo.yaml"
    spec.write_text("name: typo\ntasks: [reach-v3]\nalgorithm_params:\n  beta_typo: 0.5\n")
    r = subprocess.run(FLEETLOOP + ["job", "--api", api["url"], "--key", api["keys"]["operator"], "submit", str(spec)],
                       capture_output=True, text=True, timeout=90, cwd=tmp_path)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "HTTP 422: algorithm_params.beta_typo: extra inputs are not permitted" in r.stderr, r.stderr
    assert "(got 0.5)" in r.stderr, r.stderr


@pytest.mark.timeout(180)
def test_cli_output_json_for_scripts(api, tmp_path):
    """``--output json``: stdout parses as JSON (list, status, submit), and an error is one JSON object on
    stderr naming the field and the value given, with exit code 1."""
    import json

    base = FLEETLOOP + ["job", "--api", api["url"], "--key", api["keys"]["operator"]]

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(base + list(args), capture_output=True, text=True, timeout=90, cwd=tmp_path)

    r = run("--output", "json", "list")
    assert r.returncode == 0, r.stderr
    assert api["job"] in [j["id"] for j in json.loads(r.stdout)]
    r = run("status", api["job"], "-o", "json")  # the flag also after the subcommand
    assert r.returncode == 0, r.stderr
    job = json.loads(r.stdout)
    assert job["id"] == api["job"] and isinstance(job["actors"], (list, dict))
    spec = tmp_path / "typo.yaml"
    spec.write_text("name: typo\ntasks: [reach-v3]\nalgorithm_params:\n  beta_typo: 0.5\n")
    r = run("-o", "json", "submit", str(spec))
    assert r.returncode == 1 and r.stdout == "", (r.stdout, r.stderr)
    err = json.loads(r.stderr.strip().splitlines()[-1])["error"]
    assert (err["code"], err["field"], err["value"]) == ("INVALID_ARGUMENT", "algorithm_params.beta_typo", 0.5), err
    ok = tmp_path / "ok.yaml"
    ok.write_text("name: scripted\ntasks: [reach-v3]\n")
    r = run("-o", "json", "submit", str(ok))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["spec"]["name"] == "scripted"


# -- item 14: 405 Allow, authentication before body parsing -------------------------------------------
def _concrete(template: str) -> str:
    return re.sub(r"\{[^}]+\}", lambda m: "1" if m.group(0) == "{version}" else "x1", template)


@pytest.mark.timeout(120)
def test_405_allow_lists_every_method_of_the_path(api):
    c = client(api["url"], api["keys"]["admin"])
    paths = httpx.get(api["url"] + "/openapi.json", timeout=30).json()["paths"]
    matchers = [(re.compile("^" + re.sub(r"\{[^}]+\}", "[^/]+", t) + "$"), {m.upper() for m in ops}) for t, ops in paths.items()]
    checked = 0
    for template in paths:
        url = _concrete(template)
        allowed = set().union(*(methods for rx, methods in matchers if rx.match(url)))
        for method in sorted({"GET", "POST", "PUT", "PATCH", "DELETE"} - allowed):
            r = c.request(method, url)
            assert r.status_code == 405, (method, url, r.status_code)
            assert set(r.headers["allow"].split(", ")) == allowed, (method, url, r.headers["allow"], allowed)
            checked += 1
    assert checked > 30
    multi = client(api["url"], api["keys"]["admin"]).put("/v1/apikeys")  # the path serves GET and POST
    assert multi.status_code == 405 and multi.headers["allow"] == "GET, POST", multi.headers


@pytest.mark.timeout(60)
@pytest.mark.parametrize("body,authorized_status", [
    (b"\xff\xfe\x00 not utf-8", 400),          # not UTF-8: FastAPI's "error parsing the body"
    (b'{"name": "caf\xe9", "tasks": ["reach-v3"]}', 400),  # latin-1 inside JSON
    (b"{not json", 422),                        # UTF-8 but not JSON: json_invalid
])
def test_unparseable_body_is_answered_only_after_the_key_check(api, body, authorized_status):
    url, keys = api["url"], api["keys"]
    headers = {"Content-Type": "application/json"}
    for auth, status in ((None, 401), ("Bearer not-a-key", 401), (f"Bearer {keys['viewer']}", 403),
                         (f"Bearer {keys['operator']}", authorized_status)):
        h = {**headers, **({"Authorization": auth} if auth else {})}
        r = httpx.post(url + "/v1/jobs", content=body, headers=h, timeout=30)
        assert r.status_code == status, (auth and auth[:12], r.status_code, r.text)
        if status == 401:
            assert r.headers.get("www-authenticate") == "Bearer" and r.json()["error"]["code"] == "UNAUTHENTICATED"
    r = httpx.post(url + "/v1/apikeys", content=body, headers={**headers, "Authorization": f"Bearer {keys['operator']}"},
                   timeout=30)
    assert r.status_code == 403, r.text  # admin route: the operator's role is checked before the body


# -- item 8: `fleetloop up` with the default, relative data folder -----------------------------------
@pytest.fixture(scope="module")
def up_stack(tmp_path_factory):
    """``fleetloop up --port P`` run in an empty temp dir (so the default ``runs/controlplane``
    resolves there), stopped at the end by its pid (SIGTERM; SIGKILL of its process group only if
    it does not stop)."""
    cwd = tmp_path_factory.mktemp("up-cwd")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "FLEETLOOP_API_KEY", "FLEETLOOP_API")}
    env["RAY_AUTH_MODE"] = "disabled"
    log = (cwd / "up.log").open("w")
    proc = subprocess.Popen(FLEETLOOP + ["up", "--port", str(port), "--ray-cpus", "2"], cwd=cwd, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    def ready():
        if proc.poll() is not None:
            raise AssertionError(f"fleetloop up exited with {proc.returncode}:\n{(cwd / 'up.log').read_text()[-3000:]}")
        try:
            return httpx.get(url + "/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False
    try:
        wait_for(ready, 240, interval=0.5, what="fleetloop up /readyz 200")
        yield {"url": url, "cwd": cwd, "env": env, "proc": proc}
    finally:
        stop_session(proc, 120)  # the group this fixture started (start_new_session)
        log.close()


@pytest.mark.timeout(420)
def test_fleetloop_up_starts_with_the_default_relative_data_folder(up_stack):
    data = up_stack["cwd"] / "runs" / "controlplane"
    r = httpx.get(up_stack["url"] + "/readyz", timeout=10)
    assert r.status_code == 200 and r.json()["redis"] is True, r.text
    assert (data / "redis" / "redis.log").exists() and (data / "redis" / "appendonly.aof").exists()
    key_file = data / "admin.key"
    assert key_file.stat().st_mode & 0o777 == 0o600
    # the local CLI finds the key that `up` wrote under the same relative default
    r = subprocess.run(FLEETLOOP + ["job", "--api", up_stack["url"], "list"], cwd=up_stack["cwd"], env=up_stack["env"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("JOB"), (r.stdout, r.stderr)


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_example_job_submitted_with_the_cli_publishes_a_trained_version(up_stack):
    cli = FLEETLOOP + ["job", "--api", up_stack["url"]]
    run = dict(cwd=up_stack["cwd"], env=up_stack["env"], capture_output=True, text=True, timeout=120)
    r = subprocess.run(cli + ["submit", str(ROOT / "examples" / "job-metaworld.yaml")], **run)
    assert r.returncode == 0, (r.stdout, r.stderr)
    job_id = re.match(r"submitted (\S+) ", r.stdout).group(1)
    key = (up_stack["cwd"] / "runs" / "controlplane" / "admin.key").read_text().strip()
    c = client(up_stack["url"], key)

    def trained_version():
        job = c.get(f"/v1/jobs/{job_id}").json()
        assert job["state"] != "failed", job.get("error")
        return (c.get(f"/v1/jobs/{job_id}/policies").json()["latest"] or 0) >= 1
    wait_for(trained_version, 1200, interval=2.0, what=f"job {job_id} publishes version >= 1")
    r = subprocess.run(cli + ["stop", job_id], **run)
    assert r.returncode == 0, (r.stdout, r.stderr)
    wait_for(lambda: c.get(f"/v1/jobs/{job_id}").json()["state"] == "stopped", 240, interval=1.0, what="job stopped")
