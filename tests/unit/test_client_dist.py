"""The fleetloop-client build's own checks (client/setup.py, read without building): its module list
names existing files and covers every ``fleetloop.*`` import of those modules; a module importing
something outside the list, or generated code newer than the declared grpcio / protobuf lower bounds,
stops the build naming it; the version is fleetloop.__version__."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

import fleetloop

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def dist():
    spec = importlib.util.spec_from_file_location("fleetloop_client_setup", ROOT / "client" / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # not __main__: defines the lists and checks, builds nothing
    return module


def test_module_list_exists_and_is_closed(dist):
    assert dist.source_root() == ROOT
    assert all((ROOT / rel).is_file() for rel in dist.MODULES)
    assert "fleetloop/client/runtime.py" in dist.MODULES and "fleetloop/policy_bundle.py" in dist.MODULES
    assert not {"fleetloop/dataset.py", "fleetloop/llm_models.py"} & set(dist.MODULES)  # no heavy data/LLM code
    dist.check_imports(ROOT)  # raises SystemExit listing what is missing
    assert dist.read_version(ROOT) == fleetloop.__version__


def test_an_import_outside_the_list_stops_the_build(dist, tmp_path):
    for rel in dist.MODULES:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ROOT / rel, tmp_path / rel)
    (tmp_path / "fleetloop/dataset.py").write_text("")
    sender = tmp_path / "fleetloop/client/sender.py"
    sender.write_text(sender.read_text() + "\n\ndef _late():\n    from fleetloop import dataset\n")
    with pytest.raises(SystemExit, match=r"fleetloop/client/sender.py:\d+ imports fleetloop.dataset"):
        dist.check_imports(tmp_path)


def test_generated_code_newer_than_the_lower_bounds_stops_the_build(dist, tmp_path):
    v1 = tmp_path / "fleetloop/v1"
    v1.mkdir(parents=True)
    (v1 / "fleetloop_pb2.py").write_text("# Protobuf Python Version: 7.35.1\n")
    (v1 / "fleetloop_pb2_grpc.py").write_text("GRPC_GENERATED_VERSION = '1.85.1'\n")
    dist.check_generated_versions(tmp_path)  # what client/pyproject.toml declares today
    (v1 / "fleetloop_pb2.py").write_text("# Protobuf Python Version: 7.99.0\n")
    with pytest.raises(SystemExit, match=r"protobuf>=7.99.0"):
        dist.check_generated_versions(tmp_path)
    (v1 / "fleetloop_pb2.py").write_text("# Protobuf Python Version: 7.35.1\n")
    (v1 / "fleetloop_pb2_grpc.py").write_text("GRPC_GENERATED_VERSION = '1.90.0'\n")
    with pytest.raises(SystemExit, match=r"grpcio>=1.90.0"):
        dist.check_generated_versions(tmp_path)
