"""A camera job end to end (issue 19's done-when): declared in YAML, submitted over REST, fed by a robot
that streams JPEG camera frames, trained by a policy whose output depends only on one camera.

Real parts: redis-server, Ray, the launcher's learner process, the REST API over HTTP, a FleetClient
over gRPC. The policy is ``tests.helpers.image_probe_policy``: it records a digest of every image it
receives in a training forward pass (to a file, since the learner runs in a Ray worker). The robot
sends frames it generated; the test decodes the same JPEG bytes the way the learner does and checks
that those exact frames -- and nothing else -- reached the forward pass, that the job's specs were
checked at handshake (a robot with another camera shape is refused, naming the tensor), and that
the loss falls: the target action is a function of the probed camera's brightness only.
"""

from __future__ import annotations


import numpy as np
import pytest
import yaml

from fleetloop.client.runtime import FleetClient
from fleetloop import image_codec
from fleetloop.codec import make_spec
from fleetloop.errors import FailedPrecondition
from services.control.api import create_app
from services.control.launchers.local import LocalLauncher
from services.control.state import StateStore
from tests.helpers.control_plane import ApiServer, client, wait_for
from tests.helpers.image_probe_policy import image_digest

pytestmark = pytest.mark.timeout(600)

SIZE = 16
JOB_YAML = """
name: pixel-probe
tasks: [pick-cube]
observation_specs:
  - {name: proprio, dtype: float32, shape: [4]}
  - {name: wrist, dtype: uint8, shape: [16, 16, 3]}
  - {name: scene, dtype: uint8, shape: [16, 16, 3]}
action_specs:
  - {name: action, dtype: float32, shape: [2], low: [-1.0, -1.0], high: [1.0, 1.0]}
policy_factory: tests.helpers.image_probe_policy:image_probe_policy
policy_kwargs: {camera: scene, record_to: RECORD}
batch_size: 16
publish_every: 5
max_updates_per_s: 20
memory_budget_mb: 128
"""


def _specs(scene_shape=(SIZE, SIZE, 3)):
    obs = [make_spec("proprio", "float32", [4]), make_spec("wrist", "uint8", [SIZE, SIZE, 3]),
           make_spec("scene", "uint8", list(scene_shape))]
    return obs, [make_spec("action", "float32", [2], [-1.0, -1.0], [1.0, 1.0])]


def _frame(rng: np.random.Generator, brightness: float) -> np.ndarray:
    """A textured frame whose mean is about ``brightness`` (0..255)."""
    base = np.full((SIZE, SIZE, 3), brightness, dtype=np.float32)
    return np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)


def _as_decoded(frame: np.ndarray) -> np.ndarray:
    """The frame as the learner sees it: JPEG-encoded by the robot's recorder, decoded at ingest."""
    frames = image_codec.encode_frames(frame, "jpeg", quality=90)
    return image_codec.decode_frames(frames, frame.shape, image_codec.JPEG, "scene")


def test_camera_job_over_rest_trains_on_the_sent_frames(tmp_path, redis_server, ray_cluster):
    record = tmp_path / "seen.txt"
    spec = yaml.safe_load(JOB_YAML.replace("RECORD", str(record)))
    store = StateStore(redis_server.url)
    admin_key, _ = store.create_api_key("admin", "test-admin")
    launcher = LocalLauncher(store, tmp_path / "data")
    api = ApiServer(create_app(store, launcher, command_timeout_s=20.0)).start()
    clients: list[FleetClient] = []
    try:
        op = client(api.url, admin_key)
        r = op.post("/v1/jobs", json=spec)
        assert r.status_code == 201, r.text
        job_id = r.json()["id"]
        job = wait_for(lambda: (j := op.get(f"/v1/jobs/{job_id}").json())["state"] == "running" and j, 240,
                       what="job running")
        target = job["learner"]["target"]
        token = op.post(f"/v1/jobs/{job_id}/enrollments", json={"name": "cam-robot"}).json()["token"]

        # a robot whose scene camera is 32x32 is refused at handshake, naming the tensor
        bad = FleetClient(target, job_id, "cam-robot", *_specs((32, 32, 3)), ["pick-cube"], credential=token,
                          spool_dir=str(tmp_path / "bad"), connect_timeout_s=30)
        with pytest.raises(FailedPrecondition) as refused:
            bad.connect()
        bad.close(flush_timeout=0)
        assert str(refused.value).startswith("observation_specs[scene]: ") and "[32, 32, 3]" in str(refused.value)

        robot = FleetClient(target, job_id, "cam-robot", *_specs(), ["pick-cube"], credential=token,
                            spool_dir=str(tmp_path / "spool"), connect_timeout_s=60,
                            image_encoding={"wrist": "jpeg", "scene": "jpeg"}, jpeg_quality=90)
        clients.append(robot)
        robot.connect()
        rng = np.random.default_rng(0)
        sent: set[str] = set()
        for ep in range(6):
            rec = robot.begin_episode("pick-cube")
            for _ in range(40):
                b = float(rng.uniform(20, 235))
                scene, wrist = _frame(rng, b), _frame(rng, float(rng.uniform(0, 255)))
                target_action = np.array([b / 127.5 - 1.0, 0.5 - b / 255.0], np.float32)  # a function of the scene only
                rec.record({"proprio": rng.normal(size=4).astype(np.float32), "wrist": wrist, "scene": scene},
                           np.clip(target_action, -1, 1), 0.0, True)
                sent.add(image_digest(_as_decoded(scene)))
            rec.end("success")
        assert robot.flush(60), "the learner did not acknowledge every chunk"

        def trained():
            status = op.get(f"/v1/jobs/{job_id}").json().get("status") or {}
            return status if status.get("step", 0) >= 150 and record.exists() else None
        first_loss = wait_for(lambda: (s := op.get(f"/v1/jobs/{job_id}").json().get("status") or {}).get("loss")
                              is not None and s["loss"], 120, what="a first loss")
        status = wait_for(trained, 240, what="150 learner steps")

        seen = set(record.read_text().split())
        assert seen, "the probe saw no image"
        assert seen <= sent, f"{len(seen - sent)} frames reached the policy that the robot never sent"
        assert len(seen) >= 0.5 * len(sent), f"only {len(seen)} of {len(sent)} sent frames were trained on"
        assert status["loss"] < 0.5 * first_loss, (first_loss, status["loss"])
    finally:
        for c in clients:
            c.close(flush_timeout=0)
        api.stop()
        launcher.shutdown()
