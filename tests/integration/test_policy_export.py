"""Policy export and keep (issue 20, part 3) on real parts: a real redis-server, the real API over HTTP
(uvicorn, the local launcher), the real learner (``build_learner(...).serve()`` with the job's own
learner config, ``learner_config(spec, ...)``, in the job's folder under the launcher's data dir,
where the launcher reads its weights; its control agent reports versions and runs commands through
Redis exactly as under Ray), and the real ``fleetloop`` CLI in subprocesses.

- GET /policies lists only retained versions (pruned ones leave the version index, so do stale rows a
  previous learner left); metadata, weights and the tar export of a pruned version are 404 naming it;
- the weights stream carries the published bytes and their sha256 header; viewers may read, no key 401;
- keep (operator; viewer 403) survives retention and shows as ``kept``; releasing it prunes the version;
- ``fleetloop policy export`` writes the bundle over REST, ``--state-dir`` writes the same one offline;
- ``fleetloop eval --weights DIR --trials 2`` in a fresh folder with no job state evaluates the bundle
  (also a camera job's, in its pixel view); slow: the same for a job the local launcher starts on Ray.
"""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from fleetloop import redis_keys as keys
from fleetloop.policy_bundle import METADATA_FILE, WEIGHTS_FILE, read_metadata, verify_bundle
from learner.process import build_learner
from services.control.api import create_app
from services.control.jobspec import JobSpec, learner_config
from services.control.launchers.local import LocalLauncher
from services.control.state import LearnerEndpoint, StateStore
from tests.helpers.control_plane import ApiServer, client, wait_for

pytestmark = pytest.mark.timeout(600)
FLEETLOOP = [str(Path(sys.executable).with_name("fleetloop"))]
TASKS = ["reach-v3", "push-v3"]


def _versions(c, job_id: str) -> list[int]:
    return [v["version"] for v in c.get(f"/v1/jobs/{job_id}/policies").json()["versions"]]


def test_export_keep_and_eval_of_an_exported_policy(tmp_path, redis_server):
    store = StateStore(redis_server.url)
    keys_ = {role: store.create_api_key(role, f"test-{role}")[0] for role in ("operator", "viewer")}
    launcher = LocalLauncher(store, tmp_path / "data")
    spec = JobSpec(name="export", tasks=TASKS, policy_kwargs={"hidden": [64, 64]}, publish_every=5, batch_size=32)
    job = store.create_job(spec, created_by="test")
    state_dir = launcher.job_dir(job.id) / "learner"
    store.r.hset(keys.versions(job.id), "42", json.dumps({"version": 42}))  # a stale row of an earlier learner
    learner = build_learner(learner_config(spec, job.id, state_dir, store.url).model_dump_json()).serve(train=False)
    api = ApiServer(create_app(store, launcher, command_timeout_s=20.0, reconcile=False, supervise=False)).start()
    try:
        store.update_job(job.id, state="running", learner=LearnerEndpoint(target=f"127.0.0.1:{learner.port}"))
        op, viewer = client(api.url, keys_["operator"]), client(api.url, keys_["viewer"])
        core = learner.core
        core.weights.keep_on_disk = 3
        for _ in range(5):
            core.publish()
        wait_for(lambda: _versions(viewer, job.id) == [0, 3, 4, 5], 30, what="retained versions only (stale row gone)")

        # a pruned version: 404 naming it everywhere
        for what in ("metadata", "weights", "export"):
            r = viewer.get(f"/v1/jobs/{job.id}/policies/1/{what}")
            assert r.status_code == 404 and r.json()["error"]["field"] == "version" and "version 1" in r.text, r.text
        assert client(api.url, "nope").get(f"/v1/jobs/{job.id}/policies/4/weights").status_code == 401

        # metadata and the streamed weights of a retained one
        store.set_evaluation(job.id, 4, {"state": "done", "mean_success": 0.25, "trials": 2})
        meta = viewer.get(f"/v1/jobs/{job.id}/policies/4/metadata").json()
        info = core.weights.info(4)
        assert meta["sha256"] == info.sha256 and meta["learner_step"] == info.learner_step and meta["job_id"] == job.id
        assert meta["policy_factory"] == spec.policy_factory and meta["policy_kwargs"] == {"hidden": [64, 64]}
        assert meta["tasks"] == TASKS and meta["observation_specs"][0]["shape"] == [39]
        assert meta["evaluation"]["mean_success"] == 0.25 and meta["format"] == "fleetloop-policy/v1"
        r = viewer.get(f"/v1/jobs/{job.id}/policies/4/weights")
        assert r.status_code == 200 and r.content == core.weights.blob(4)
        assert r.headers["x-fleetloop-sha256"] == hashlib.sha256(r.content).hexdigest() == info.sha256
        assert r.headers["x-fleetloop-version"] == "4" and int(r.headers["content-length"]) == info.size_bytes
        r = viewer.get(f"/v1/jobs/{job.id}/policies/4/export")
        assert r.status_code == 200 and int(r.headers["content-length"]) == len(r.content)
        with tarfile.open(fileobj=io.BytesIO(r.content)) as tar:
            tar.extractall(tmp_path / "tar", filter="data")
        assert verify_bundle(tmp_path / "tar" / f"{job.id}-v4")["evaluation"]["mean_success"] == 0.25

        # keep: survives retention, listed as kept; unkeep: pruned again
        assert viewer.post(f"/v1/jobs/{job.id}/policies/3/keep").status_code == 403
        r = op.post(f"/v1/jobs/{job.id}/policies/3/keep")
        assert r.status_code == 200 and r.json()["result"] == {"version": 3, "kept": True}, r.text
        for _ in range(3):
            core.publish()
        wait_for(lambda: _versions(viewer, job.id) == [0, 3, 6, 7, 8], 30, what="kept v3 retained")
        rows = {v["version"]: v for v in viewer.get(f"/v1/jobs/{job.id}/policies").json()["versions"]}
        assert rows[3]["kept"] and not rows[8]["kept"]
        assert op.post(f"/v1/jobs/{job.id}/policies/4/keep").status_code == 404  # pruned meanwhile
        r = op.delete(f"/v1/jobs/{job.id}/policies/3/keep")
        assert r.status_code == 200 and r.json()["result"] == {"version": 3, "kept": False}, r.text
        wait_for(lambda: _versions(viewer, job.id) == [0, 6, 7, 8], 30, what="released v3 pruned")
        assert viewer.get(f"/v1/jobs/{job.id}/policies/3/weights").status_code == 404
        done = subprocess.run([*FLEETLOOP, "policy", "keep", job.id, "6", "--api", api.url, "--api-key", keys_["operator"]],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and json.loads(done.stdout)["result"] == {"version": 6, "kept": True}, done.stderr
        assert core.weights.kept == {6}

        # the CLI: over REST, and offline from the state dir (the same bundle)
        out = tmp_path / "exported"
        done = subprocess.run([*FLEETLOOP, "policy", "export", job.id, "8", str(out), "--api", api.url,
                               "--api-key", keys_["viewer"]], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert sorted(p.name for p in out.iterdir()) == [METADATA_FILE, WEIGHTS_FILE]
        assert (out / WEIGHTS_FILE).read_bytes() == core.weights.blob(8)
        offline = tmp_path / "offline"
        done = subprocess.run([*FLEETLOOP, "policy", "export", job.id, "8", str(offline), "--state-dir", str(state_dir)],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        same = ("sha256", "version", "learner_step", "policy_factory", "policy_kwargs", "tasks", "observation_specs",
                "action_specs", "job_id", "algorithm")
        assert {k: read_metadata(offline)[k] for k in same} == {k: read_metadata(out)[k] for k in same}
        bad = subprocess.run([*FLEETLOOP, "policy", "export", job.id, "1", str(tmp_path / "x"), "--api", api.url,
                              "--api-key", keys_["viewer"]], capture_output=True, text=True, timeout=120)
        assert bad.returncode == 1 and "version 1" in bad.stderr and not (tmp_path / "x").exists()
    finally:
        api.stop()
        learner.stop(checkpoint=False)

    # evaluate the exported folder on a machine without the job's state: a fresh folder, nothing else
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    done = subprocess.run([*FLEETLOOP, "eval", "--weights", str(out), "--trials", "2", "--workers", "1",
                           "--max-steps", "60", "--out", "result.json"], cwd=fresh, capture_output=True, text=True,
                          timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((fresh / "result.json").read_text())
    assert set(report["tasks"]) == set(TASKS) and all(t["trials"] == 2 for t in report["tasks"].values())
    assert 0.0 <= report["mean_success"] <= 1.0 and report["policy_factory"] == spec.policy_factory
    assert sorted(p.name for p in fresh.iterdir()) == ["result.json"]


@pytest.mark.slow
def test_export_of_a_job_launched_on_ray(tmp_path, redis_server, ray_cluster):
    """The same path for a job the local launcher starts itself (Ray actor learner): submit over REST,
    export its version 0 with the CLI, evaluate the folder in a fresh directory."""
    store = StateStore(redis_server.url)
    key, _ = store.create_api_key("operator", "op")
    launcher = LocalLauncher(store, tmp_path / "data")
    api = ApiServer(create_app(store, launcher, command_timeout_s=20.0, reconcile=False)).start()
    try:
        op = client(api.url, key)
        r = op.post("/v1/jobs", json={"name": "ray-export", "tasks": ["reach-v3"], "batch_size": 32})
        assert r.status_code == 201, r.text
        job_id = r.json()["id"]
        wait_for(lambda: op.get(f"/v1/jobs/{job_id}").json()["state"] == "running", 240, what="job running")
        wait_for(lambda: _versions(op, job_id) == [0], 60, what="version 0 reported")
        out = tmp_path / "v0"
        done = subprocess.run([*FLEETLOOP, "policy", "export", job_id, "0", str(out), "--api", api.url, "--api-key", key],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert verify_bundle(out)["job_id"] == job_id
        assert op.post(f"/v1/jobs/{job_id}/stop").status_code == 202
        wait_for(lambda: op.get(f"/v1/jobs/{job_id}").json()["state"] == "stopped", 120, what="job stopped")
        assert op.get(f"/v1/jobs/{job_id}/policies/0/weights").content == (out / WEIGHTS_FILE).read_bytes()  # after stop too
    finally:
        api.stop()
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    done = subprocess.run([*FLEETLOOP, "eval", "--weights", str(out), "--trials", "2", "--workers", "1", "--max-steps", "30"],
                          cwd=fresh, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout)["tasks"]["reach-v3"]["trials"] == 2


def test_eval_of_an_exported_camera_policy_uses_its_pixel_view(tmp_path):
    """A camera job's bundle (visuomotor policy on 'proprio' + one 32x32 camera) is evaluated in the
    simulated robot's matching pixel view, taken from its specs alone."""
    import torch

    from fleetloop.policies import build_policy
    from fleetloop.policy_bundle import bundle_metadata, write_bundle
    from fleetloop.presets import metaworld_specs
    from fleetloop.specs import PolicySpec
    from fleetloop.weights import state_dict_to_blob

    obs, act = metaworld_specs("pixels", ["gripperPOV"], 32)
    kwargs = {"feature_dim": 16}
    torch.manual_seed(0)
    policy = build_policy("fleetloop.vision:visuomotor_policy", kwargs, PolicySpec.from_specs(obs, act, ["reach-v3"]))
    blob = state_dict_to_blob(policy.state_dict())
    meta = bundle_metadata(job_id="cams-000000", version=5, learner_step=100, sha256=hashlib.sha256(blob).hexdigest(),
                           size_bytes=len(blob), published_at=1.0, tasks=["reach-v3"],
                           policy_factory="fleetloop.vision:visuomotor_policy", policy_kwargs=kwargs,
                           observation_specs=obs, action_specs=act)
    out = write_bundle(tmp_path / "cams", meta, [blob])
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    done = subprocess.run([*FLEETLOOP, "eval", "--weights", str(out), "--trials", "1", "--workers", "1", "--max-steps", "5",
                           "--out", "result.json"], cwd=fresh, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((fresh / "result.json").read_text())
    assert list(report["tasks"]) == ["reach-v3"] and report["tasks"]["reach-v3"]["trials"] == 1
    assert report["policy_factory"] == "fleetloop.vision:visuomotor_policy"
