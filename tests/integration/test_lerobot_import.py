"""``fleetloop data import --format lerobot`` end to end, on a LeRobotDataset v3.0 made independently
of :mod:`fleetloop.lerobot` (:mod:`tests.helpers.lerobot_fixture`: pyarrow, pandas and PyAV by hand,
videos encoded per episode and concatenated as LeRobot's recorder does) from real Meta-World
scripted-expert episodes. The import runs through the CLI in a subprocess; the job then loads the
imported demos exactly as its learner does (:func:`learner.startup.load_offline`) and behaviour-clones
from them (:func:`learner.pretrain.pretrain`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from actor.demos import run_expert_episode
from actor.envs import make_env
from fleetloop.dataset import iter_episodes, read_manifest
from fleetloop.lerobot import LeRobotReader
from fleetloop.specs import PolicySpec
from learner.pretrain import pretrain
from learner.replay import ReplayStore
from learner.startup import load_offline
from services.control.jobspec import JobSpec, learner_config
from services.data.importer import import_lerobot
from tests.helpers.lerobot_fixture import CAMERA, make_lerobot_dataset

pytestmark = [pytest.mark.timeout(300), pytest.mark.filterwarnings("ignore:Constant")]
ROOT = Path(__file__).resolve().parents[2]
PUSH = "Push the puck to the goal"


def camera(state: np.ndarray) -> np.ndarray:
    """A synthetic 32x32 camera whose picture moves with the hand position (state[:3])."""
    yy, xx = np.mgrid[0:32, 0:32].astype(np.float64)
    out = [np.stack([128 + 100 * np.sin(xx / 5 + 20 * s[0]), 128 + 100 * np.cos(yy / 4 + 20 * s[1]),
                     128 + 90 * np.sin((xx + yy) / 7 + 20 * s[2])], -1) for s in state]
    return np.stack(out).round().astype(np.uint8)


@pytest.fixture(scope="module")
def lerobot_ds(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    episodes = []
    for task, string in (("reach-v3", "reach-v3"), ("push-v3", PUSH)):
        env = make_env(task, seed=0, max_episode_steps=150)
        seed = 0
        while sum(ep["task"] == string for ep in episodes) < 3:
            ep, ok = run_expert_episode(env, seed, action_noise=0.1)
            seed += 1
            if ok:
                episodes.append({"task": string, "state": ep.obs, "action": ep.actions, "reward": ep.rewards,
                                 "camera": camera(ep.obs)})
        env.close()
    root = tmp_path_factory.mktemp("lerobot") / "metaworld"
    make_lerobot_dataset(root, episodes, fps=80)
    return root, episodes


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.cli", "data", "import", "--format", "lerobot", *args],
                          capture_output=True, text=True, timeout=240, cwd=ROOT,
                          env={**os.environ, "RAY_AUTH_MODE": "disabled"})


def test_reader_decodes_the_independent_dataset(lerobot_ds: tuple[Path, list[dict]]) -> None:
    root, source = lerobot_ds
    reader = LeRobotReader(root)
    assert len(reader) == 6 and reader.tasks == ["reach-v3", PUSH] and reader.fps == 80
    for got, want in zip(reader, source):
        assert got.task == want["task"]
        np.testing.assert_array_equal(got.frames["observation.state"], want["state"])
        np.testing.assert_array_equal(got.frames["next.reward"][:, 0], want["reward"])
        err = np.abs(got.frames[CAMERA].astype(np.int16) - want["camera"].astype(np.int16)).mean(axis=(1, 2, 3))
        assert err.max() < 10, err


def test_import_then_the_job_trains_from_it(lerobot_ds: tuple[Path, list[dict]], tmp_path: Path) -> None:
    root, source = lerobot_ds
    out = tmp_path / "demos"
    job = {"name": "lerobot-import", "tasks": ["reach-v3", "push-v3"], "offline_dataset": str(out)}
    (tmp_path / "job.yaml").write_text(json.dumps(job))  # JSON is YAML
    (tmp_path / "map.yaml").write_text("observations:\n  state: observation.state\nactions:\n  action: action\n"
                                       "reward: next.reward\n")
    (tmp_path / "tasks.yaml").write_text(f"{PUSH}: push-v3\n")
    common = [str(root), "--mapping", str(tmp_path / "map.yaml"), "--job-spec", str(tmp_path / "job.yaml"), "--out"]

    refused = run_cli(*common, str(tmp_path / "refused"))  # the push episodes' task string is no job task
    assert refused.returncode == 1 and PUSH in refused.stderr and "--task-map" in refused.stderr, refused.stderr
    assert not (tmp_path / "refused").exists()

    done = run_cli(*common, str(out), "--task-map", str(tmp_path / "tasks.yaml"))
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    frames = sum(len(ep["state"]) for ep in source)
    assert summary == {"out": str(out), "format": "fleetloop-demos/v1", "episodes": 6, "frames": frames, "skipped": 0,
                       "tasks": {"reach-v3": 3, "push-v3": 3}}
    assert read_manifest(out)["obs_dim"] == 39 and read_manifest(out)["act_dim"] == 4
    imported = list(iter_episodes(out))
    for got, want in zip(imported, source):
        assert got.task_id == ("push-v3" if want["task"] == PUSH else "reach-v3") and got.outcome == "success"
        np.testing.assert_array_equal(got.obs, want["state"])
        np.testing.assert_array_equal(got.actions, want["action"])
        np.testing.assert_array_equal(got.rewards, want["reward"])
        assert got.interventions.all()

    # the job's learner loads every imported frame into its offline buffers
    spec = JobSpec.model_validate(job)
    cfg = learner_config(spec, "lerobot-import-000001", tmp_path / "state", None)
    obs, act = spec.tensor_specs()
    policy_spec = PolicySpec.from_specs(obs, act, spec.tasks)
    replay = ReplayStore(spec.tasks, policy_spec.observations, policy_spec.act_dim)
    assert load_offline(cfg, replay) == frames
    assert sum(replay.size(t, "offline") for t in spec.tasks) == frames

    # and behaviour-clones from them: the BC loss falls clearly
    first = pretrain(out, spec.tasks, tmp_path / "p20.safetensors", steps=20, seed=0, progress=False)
    last = pretrain(out, spec.tasks, tmp_path / "p400.safetensors", steps=400, seed=0, progress=False)
    assert sum(last["demo_steps"].values()) == frames
    assert last["final_loss"] < 0.5 * first["final_loss"], (first["final_loss"], last["final_loss"])

    # --tasks keeps one task, appending to a compatible dataset
    again = run_cli(*common, str(out), "--tasks", "reach-v3", "--quiet")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout.strip().splitlines()[-1])["skipped"] == 3
    assert len(list(iter_episodes(out))) == 9


def test_import_cameras_as_a_v2_dataset(lerobot_ds: tuple[Path, list[dict]], tmp_path: Path) -> None:
    """A job observing a camera (half the dataset's size: area-resized) and the state vector gets a
    fleetloop-demos/v2 dataset its learner loads frame for frame."""
    root, source = lerobot_ds
    job = JobSpec.model_validate({
        "name": "lerobot-pixels", "tasks": ["reach-v3", "push-v3"],
        "observation_specs": [{"name": "hand", "dtype": "float32", "shape": [39]},
                              {"name": "top", "dtype": "uint8", "shape": [16, 16, 3]}],
        "action_specs": [{"name": "action", "dtype": "float32", "shape": [4], "low": [-1.0], "high": [1.0]}]})
    mapping = tmp_path / "map.yaml"
    mapping.write_text(f"observations: {{hand: observation.state, top: {CAMERA}}}\nactions: {{action: action}}\n"
                       "resize_images: true\n")
    summary = import_lerobot(root, mapping, job, tmp_path / "v2", tasks=["push-v3"], task_map={PUSH: "push-v3"})
    pushes = [ep for ep in source if ep["task"] == PUSH]
    assert summary["format"] == "fleetloop-demos/v2" and summary["skipped"] == 3
    assert summary["frames"] == sum(len(ep["state"]) for ep in pushes)
    for got, want in zip(iter_episodes(tmp_path / "v2"), pushes):
        assert got.obs["top"].shape == (len(want["state"]), 16, 16, 3) and got.obs["top"].dtype == np.uint8
        small = want["camera"].reshape(-1, 16, 2, 16, 2, 3).mean(axis=(2, 4))
        assert np.abs(got.obs["top"] - small).mean() < 10
        np.testing.assert_array_equal(got.obs["hand"], want["state"])
        np.testing.assert_array_equal(got.rewards, np.zeros(len(want["state"]), np.float32))
    cfg = learner_config(job, "lerobot-pixels-000001", tmp_path / "state", None, offline_dataset=tmp_path / "v2")
    obs, act = job.tensor_specs()
    spec = PolicySpec.from_specs(obs, act, job.tasks)
    assert load_offline(cfg, ReplayStore(job.tasks, spec.observations, spec.act_dim)) == summary["frames"]
