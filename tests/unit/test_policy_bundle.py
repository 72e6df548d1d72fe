"""Policy bundles (fleetloop.policy_bundle) and weight retention with kept versions (WeightStore.keep):

- a bundle round-trips: written from streamed pieces, verified, loaded into the policy its metadata
  describes (same actions as the source policy); a tampered or mismatched model.safetensors is an
  IntegrityError naming the file; nothing is left behind by a failed write; a non-empty OUT is refused;
- metadata of another format / missing a field is InvalidArgument naming the field;
- the simulated robot's view is derived from the specs (state, pixels, or refused for a real robot);
- the API's tar form is a valid tar of the same two files;
- kept versions survive retention and restarts; releasing one prunes it; unknown versions are NotFound.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest
import torch

from fleetloop.errors import FailedPrecondition, IntegrityError, InvalidArgument, NotFound
from fleetloop.policies import build_policy
from fleetloop.policy_bundle import (METADATA_FILE, WEIGHTS_FILE, bundle_metadata, load_policy_bundle, policy_from_bundle,
                                     read_metadata, simulator_view, verify_bundle, write_bundle)
from fleetloop.presets import metaworld_specs
from fleetloop.specs import PolicySpec
from fleetloop.weights import state_dict_to_blob
from learner.weight_store import WeightStore

TASKS = ["reach-v3", "push-v3"]
KWARGS = {"hidden": [32, 16]}


def _policy_blob() -> tuple[torch.nn.Module, bytes]:
    obs, act = metaworld_specs("state")
    torch.manual_seed(0)
    policy = build_policy("fleetloop.policies:mlp_policy", KWARGS, PolicySpec.from_specs(obs, act, TASKS))
    return policy, state_dict_to_blob(policy.state_dict())


def _meta(blob: bytes, **over) -> dict:
    obs, act = metaworld_specs("state")
    args = dict(job_id="job-abc123", version=3, learner_step=75, sha256=hashlib.sha256(blob).hexdigest(),
                size_bytes=len(blob), published_at=1.0, tasks=TASKS, policy_factory="fleetloop.policies:mlp_policy",
                policy_kwargs=KWARGS, observation_specs=obs, action_specs=act, algorithm="hg_dagger",
                evaluation={"state": "done", "mean_success": 0.5})
    args.update(over)
    return bundle_metadata(**args)


def _pieces(blob: bytes, n: int = 1000):
    return (blob[i:i + n] for i in range(0, len(blob), n))


def test_bundle_round_trip_loads_the_same_policy(tmp_path):
    policy, blob = _policy_blob()
    out = write_bundle(tmp_path / "out", _meta(blob), _pieces(blob))
    assert sorted(p.name for p in out.iterdir()) == [METADATA_FILE, WEIGHTS_FILE]
    assert (out / WEIGHTS_FILE).read_bytes() == blob
    meta = read_metadata(out)
    assert meta["format"] == "fleetloop-policy/v1" and meta["version"] == 3 and meta["learner_step"] == 75
    assert meta["evaluation"]["mean_success"] == 0.5 and meta["exported_at"] > 0
    assert [s["name"] for s in meta["observation_specs"]] == ["state"] and meta["action_specs"][0]["low"] == [-1.0] * 4
    assert verify_bundle(out) == meta
    meta2, state = load_policy_bundle(out)
    assert meta2 == meta and set(state) == set(policy.state_dict())
    _, loaded = policy_from_bundle(out)
    obs, task = {"state": torch.randn(5, 39)}, torch.tensor([0, 1, 0, 1, 1])
    with torch.no_grad():
        assert torch.equal(loaded(obs, task), policy.eval()(obs, task))


def test_tampered_or_mismatched_weights_are_refused_naming_the_file(tmp_path):
    _, blob = _policy_blob()
    out = write_bundle(tmp_path / "out", _meta(blob), [blob])
    data = bytearray(blob)
    data[-1] ^= 0xFF
    (out / WEIGHTS_FILE).write_bytes(bytes(data))
    for check in (verify_bundle, load_policy_bundle):
        with pytest.raises(IntegrityError, match=WEIGHTS_FILE) as err:
            check(out)
        assert err.value.field == WEIGHTS_FILE
    with pytest.raises(IntegrityError, match=WEIGHTS_FILE):  # bytes that are not the metadata's: nothing written
        write_bundle(tmp_path / "bad", _meta(blob), [bytes(data)])
    assert not (tmp_path / "bad").exists() and not list(tmp_path.glob(".bad*"))
    with pytest.raises(FailedPrecondition, match="not empty"):
        write_bundle(out, _meta(blob), [blob])
    with pytest.raises(InvalidArgument, match="does not fit"):  # right digest, wrong architecture
        wrong = _meta(blob, policy_kwargs={"hidden": [8]})
        load_policy_bundle(write_bundle(tmp_path / "wrong", wrong, [blob]))


def test_metadata_is_checked_naming_the_field(tmp_path):
    _, blob = _policy_blob()
    out = write_bundle(tmp_path / "out", _meta(blob), [blob])
    meta = json.loads((out / METADATA_FILE).read_text())
    for change, field in (({"format": "other/v9"}, "format"), ({"kind": "boat"}, "kind"), ({"sha256": "xyz"}, "sha256"),
                          ({"policy_factory": None}, "policy_factory")):
        (out / METADATA_FILE).write_text(json.dumps({**meta, **change}))
        with pytest.raises(InvalidArgument) as err:
            read_metadata(out)
        assert err.value.field == field
    (out / METADATA_FILE).write_text(json.dumps({k: v for k, v in meta.items() if k != "tasks"}))
    with pytest.raises(InvalidArgument, match="tasks"):
        read_metadata(out)
    with pytest.raises(NotFound, match="not a policy bundle"):
        read_metadata(tmp_path)


def test_simulator_view_from_specs():
    _, blob = _policy_blob()
    assert simulator_view(_meta(blob)) is None
    obs, act = metaworld_specs("pixels", ["gripperPOV", "corner3"], 48)
    assert simulator_view(_meta(blob, observation_specs=obs, action_specs=act)) == {
        "observations": "pixels", "cameras": ["gripperPOV", "corner3"], "image_size": 48}
    real = [{"name": "joints", "dtype": "float32", "shape": [7]}, {"name": "wrist", "dtype": "uint8", "shape": [64, 64, 3]}]
    with pytest.raises(InvalidArgument, match="simulated Meta-World") as err:
        simulator_view(_meta(blob, observation_specs=real))
    assert err.value.field == "observation_specs"


def test_api_tar_form_holds_the_bundle(tmp_path):
    from services.control.launchers.base import WeightStream
    from services.control.policy_routes import tar_parts
    _, blob = _policy_blob()
    meta = json.dumps(_meta(blob)).encode()
    size, parts = tar_parts("job-abc123-v3", meta, WeightStream(3, len(blob), _pieces(blob, 4096)), 1.0)
    data = b"".join(parts)
    assert len(data) == size
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        assert tar.getnames() == [f"job-abc123-v3/{WEIGHTS_FILE}", f"job-abc123-v3/{METADATA_FILE}"]
        tar.extractall(tmp_path, filter="data")
    assert verify_bundle(tmp_path / "job-abc123-v3")["sha256"] == hashlib.sha256(blob).hexdigest()
    size, parts = tar_parts("x", meta, WeightStream(3, len(blob) + 1, iter([blob])), 1.0)
    with pytest.raises(IntegrityError, match=f"read {len(blob)} of {len(blob) + 1}"):
        b"".join(parts)


def test_weight_store_keeps_kept_versions_across_retention_and_restarts(tmp_path):
    store = WeightStore(tmp_path, keep_in_memory=1, keep_on_disk=2)
    for i in range(3):
        store.publish(bytes([i]) * 10, i)
    assert store.keep(1) is True and store.keep(1) is False and store.kept == {1}
    for i in range(3, 7):
        store.publish(bytes([i]) * 10, i)
    on_disk = sorted(int(p.stem[1:]) for p in Path(tmp_path).glob("v*.safetensors"))
    assert on_disk == [0, 1, 5, 6] and [v.version for v in store.versions()] == on_disk
    assert json.loads((tmp_path / "index.json").read_text())["kept"] == [1]
    again = WeightStore(tmp_path, keep_on_disk=2)  # persisted: a restart keeps it too
    assert again.kept == {1} and again.blob(1) == bytes([1]) * 10
    again.publish(b"x" * 10, 7)
    assert 1 in [v.version for v in again.versions()]
    assert again.keep(1, False) is True and again.kept == frozenset()  # released: pruned at once
    assert [v.version for v in again.versions()] == [0, 6, 7] and not (tmp_path / "v1.safetensors").exists()
    for version in (1, 99):
        with pytest.raises(NotFound, match=f"version {version}"):
            again.keep(version)
