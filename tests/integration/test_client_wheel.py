"""The installable robot client (issue 20): ``pip wheel ./client`` makes a ``fleetloop-client`` wheel
holding only the ``fleetloop`` package (the client, what it imports, the gRPC code generated at build
time); installed with its dependencies (binary wheels only) into a clean Python 3.12 venv without
torch, a script using ``from fleetloop.client import FleetClient`` connects to a real learner (this
process, project venv), streams an episode (stored by the learner) and receives a newly published
weights version, sha256-verified, as numpy arrays. Build artefacts go to tmp_path only (the build
runs on a copy of client/, fleetloop/ and proto/)."""

from __future__ import annotations

import glob
import json
import queue
import shutil
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import client_learner

ROOT = Path(__file__).resolve().parents[2]
PY312 = sorted(glob.glob("/root/.pyenv/versions/3.12.*/bin/python3.12"))
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600),
              pytest.mark.skipif(not PY312, reason="needs pyenv's Python 3.12 (/root/.pyenv/versions/3.12.*) for a "
                                                   "clean venv of another Python than the project's")]
JOB, TASK, STEPS = "wheel", "pick", 25
OBS = [{"name": "state", "dtype": "float32", "shape": [6]}]
ACT = [{"name": "action", "dtype": "float32", "shape": [6], "low": [-1.0], "high": [1.0]}]

ROBOT = r"""
import json, sys, time
import numpy as np
import fleetloop
from fleetloop.client import FleetClient, make_spec

target, job, task, spool, steps, token = sys.argv[1:7]
def say(**kw):
    print(json.dumps(kw), flush=True)

obs = [make_spec("state", "float32", [6])]
act = [make_spec("action", "float32", [6], low=[-1.0], high=[1.0])]
client = FleetClient(target, job, "wheel-robot", obs, act, [task], credential=token, spool_dir=spool, connect_timeout_s=60)
client.connect()
say(event="connected", version=client.version, format=client.weights_format, python=sys.version.split()[0],
    fleetloop=fleetloop.__file__, first=type(client.current.state_dict["net.0.weight"]).__name__)
ep = client.begin_episode(task)
rng = np.random.default_rng(0)
for t in range(int(steps)):
    ep.record(rng.normal(size=6).astype(np.float32), np.clip(rng.normal(size=6), -1, 1).astype(np.float32), 0.5, t % 5 == 0)
ep.end("success")
say(event="streamed", flushed=client.flush(60))
new, deadline = None, time.monotonic() + 120
while new is None and time.monotonic() < deadline:
    new = client.swap_if_ready()
    time.sleep(0.05)
say(event="weights", version=new.version, sha256=new.sha256, format=new.tensor_format,
    types=sorted({type(v).__module__ + "." + type(v).__name__ for v in new.state_dict.values()}),
    sums={k: float(np.asarray(v, np.float64).sum()) for k, v in new.state_dict.items()},
    torch_loaded="torch" in sys.modules)
client.close()
"""


def _build_wheel(tmp_path: Path) -> Path:
    """The wheel, built with the project venv's pip from a copy of the sources (no artefact in the repo)."""
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*_pb2*", "build", "*.egg-info")
    for name in ("client", "fleetloop", "proto"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src / "client"), "--no-deps", "--no-build-isolation",
                          "-q", "-w", str(tmp_path / "dist")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    wheels = list((tmp_path / "dist").glob("fleetloop_client-*-py3-none-any.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def _venv(tmp_path: Path, wheel: Path) -> Path:
    venv = tmp_path / "venv312"
    subprocess.run([PY312[-1], "-m", "venv", str(venv)], check=True, timeout=120)
    out = subprocess.run([str(venv / "bin/pip"), "install", "-q", "--only-binary", ":all:", "--disable-pip-version-check",
                          str(wheel)], capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return venv / "bin/python"


def _lines(proc: subprocess.Popen) -> queue.Queue:
    q: queue.Queue = queue.Queue()

    def pump() -> None:
        for line in proc.stdout:
            q.put(line)
        q.put(None)
    threading.Thread(target=pump, daemon=True).start()
    return q


def _next_event(q: queue.Queue, proc: subprocess.Popen, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = q.get(timeout=1.0)
        except queue.Empty:
            continue
        if line is None:
            pytest.fail(f"robot script ended (rc {proc.wait()}): {proc.stderr.read()[-3000:]}")
        if line.startswith("{"):
            return json.loads(line)
    pytest.fail("robot script: no event in time")


BUNDLE = r"""
import json, sys
import numpy as np
from fleetloop.client import MlpPolicy
policy = MlpPolicy.from_bundle(sys.argv[1])
obs = {"state": np.linspace(-1, 1, 6, dtype=np.float32)}
print(json.dumps({"action": policy.act(obs, sys.argv[2]).tolist(), "torch_loaded": "torch" in sys.modules}), flush=True)
"""


def _bundle_acts_like_the_learners_policy(tmp_path: Path, python: Path, impl, info) -> None:
    """An exported policy folder of the published version loads in the torch-free venv (sha256 checked)
    and acts as the job's torch policy does on the same observation."""
    import torch

    from fleetloop.policy_bundle import bundle_metadata, policy_from_bundle, write_bundle

    core = impl.core
    opt = core.cfg.optimisation
    meta = bundle_metadata(job_id=JOB, version=info.version, learner_step=info.learner_step, sha256=info.sha256,
                           size_bytes=info.size_bytes, published_at=info.published_at, tasks=[TASK],
                           policy_factory=opt.policy_factory, policy_kwargs=opt.policy_kwargs,
                           observation_specs=OBS, action_specs=ACT)
    folder = write_bundle(tmp_path / "bundle", meta, [core.weights.blob(info.version)])
    script = tmp_path / "bundle.py"
    script.write_text(BUNDLE)
    out = subprocess.run([str(python), "-I", str(script), str(folder), TASK], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert not got["torch_loaded"]
    _, policy = policy_from_bundle(folder)
    with torch.no_grad():
        want = policy({"state": torch.linspace(-1, 1, 6).reshape(1, 6)}, torch.zeros(1, dtype=torch.long))
    assert np.allclose(got["action"], np.asarray(want).reshape(-1), atol=1e-5), (got["action"], want)


def test_wheel_installs_on_python312_without_torch_and_runs_against_a_learner(tmp_path):
    wheel = _build_wheel(tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"fleetloop"}, tops
    for need in ("fleetloop/client/runtime.py", "fleetloop/v1/fleetloop_pb2.py", "fleetloop/v1/fleetloop_pb2_grpc.py",
                 "fleetloop/weights.py", "fleetloop/codec.py"):
        assert need in names
    assert "fleetloop/policy_bundle.py" in names  # robots load exported policies (torch-only modules ride along, unimported)
    assert not {"fleetloop/dataset.py", "fleetloop/lerobot/__init__.py", "fleetloop/llm_models.py"} & set(names)
    meta = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    requires = sorted(line.split(":", 1)[1].split(";")[0].strip() for line in meta.splitlines()
                      if line.startswith("Requires-Dist:") and "extra ==" not in line)
    assert [r.split(">")[0] for r in requires] == ["grpcio", "numpy", "protobuf", "safetensors"], requires

    python = _venv(tmp_path, wheel)
    probe = subprocess.run([str(python), "-I", "-c", "import torch"], capture_output=True, text=True, timeout=60)
    assert probe.returncode != 0 and "No module named 'torch'" in probe.stderr
    for other in ("actor", "learner", "services", "bench"):
        assert subprocess.run([str(python), "-I", "-c", f"import {other}"], capture_output=True, cwd=tmp_path,
                              timeout=60).returncode != 0, other

    impl = client_learner.start(tmp_path / "learner", JOB, [TASK], OBS, ACT)
    script = tmp_path / "robot.py"
    script.write_text(ROBOT)
    proc = subprocess.Popen([str(python), "-I", str(script), f"127.0.0.1:{impl.port}", JOB, TASK, str(tmp_path / "spool"),
                             str(STEPS), client_learner.TOKEN], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        q = _lines(proc)
        hello = _next_event(q, proc, 120)
        assert hello["python"].startswith("3.12") and hello["format"] == "numpy" and hello["first"] == "ndarray"
        assert str(tmp_path / "venv312") in hello["fleetloop"]
        assert _next_event(q, proc, 120) == {"event": "streamed", "flushed": True}
        assert impl.core.ingestor.steps_total == STEPS  # the learner stored the episode's steps
        info, state = client_learner.publish_policy(impl, seed=5)
        got = _next_event(q, proc, 150)
        assert got["event"] == "weights" and got["version"] == info.version > hello["version"]
        assert got["sha256"] == info.sha256 and got["format"] == "numpy" and got["types"] == ["numpy.ndarray"]
        assert not got["torch_loaded"]
        assert set(got["sums"]) == set(state)
        for name, arr in state.items():
            assert got["sums"][name] == pytest.approx(float(arr.astype(np.float64).sum()), rel=1e-6, abs=1e-5), name
        assert proc.wait(60) == 0, proc.stderr.read()[-3000:]
        _bundle_acts_like_the_learners_policy(tmp_path, python, impl, info)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        client_learner.stop(impl)
