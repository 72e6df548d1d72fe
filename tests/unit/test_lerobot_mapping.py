"""The LeRobot feature -> job tensor mapping (:mod:`fleetloop.lerobot.mapping`) and the importer's task
resolution (:func:`services.data.importer.resolve_tasks`): every refusal names the mapping key."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fleetloop.errors import InvalidArgument, NotFound
from fleetloop.lerobot import Feature, FeatureMapping, LeRobotEpisode, area_resize
from fleetloop.specs import TensorInfo
from services.data.importer import exported_mapping, output_format, resolve_tasks

pytestmark = pytest.mark.timeout(60)

FEATURES = {f.name: f for f in (
    Feature("observation.state", "float64", (8,)),
    Feature("observation.images.front", "video", (64, 64, 3)),
    Feature("observation.images.depth", "image", (84, 84, 1)),
    Feature("action", "float32", (4,)),
    Feature("action.gripper", "float32", (1,)),
    Feature("next.reward", "float32", (1,)),
    Feature("intervention", "bool", (1,)),
    Feature("step.count", "int64", (1,)),
)}
OBS = [TensorInfo("corner", "uint8", (84, 84, 3)), TensorInfo("proprio", "float32", (8,))]
ACTS = [TensorInfo("action", "float32", (4,))]
GOOD = {"observations": {"proprio": "observation.state", "corner": "observation.images.front"},
        "actions": {"action": "action"}, "reward": "next.reward", "intervention": "intervention", "resize_images": True}


def refused(data: dict, field: str, obs=OBS, acts=ACTS) -> str:
    with pytest.raises(InvalidArgument) as info:
        FeatureMapping.from_dict(data).bind(FEATURES, obs, acts)
    assert info.value.field == field, str(info.value)
    return str(info.value)


def test_good_mapping_converts_an_episode() -> None:
    bound = FeatureMapping.from_dict(GOOD).bind(FEATURES, OBS, ACTS)
    t = 5
    rng = np.random.default_rng(0)
    ep = LeRobotEpisode("push", {
        "observation.state": rng.normal(size=(t, 8)), "observation.images.front": rng.integers(0, 256, (t, 64, 64, 3), np.uint8),
        "observation.images.depth": np.zeros((t, 84, 84, 1), np.uint8), "action": rng.normal(size=(t, 4)).astype(np.float32),
        "action.gripper": np.zeros((t, 1), np.float32), "next.reward": np.arange(t, dtype=np.float32)[:, None],
        "intervention": (np.arange(t) % 2 == 0)[:, None], "step.count": np.arange(t)[:, None]}, {"fleetloop.outcome": "success"})
    out = bound.convert(ep)
    assert out.obs["proprio"].dtype == np.float32 and out.obs["proprio"].shape == (t, 8)
    np.testing.assert_allclose(out.obs["proprio"], ep.frames["observation.state"].astype(np.float32))
    assert out.obs["corner"].shape == (t, 84, 84, 3) and out.obs["corner"].dtype == np.uint8
    np.testing.assert_array_equal(out.actions, ep.frames["action"])
    np.testing.assert_array_equal(out.rewards, np.arange(t, dtype=np.float32))
    np.testing.assert_array_equal(out.interventions, np.arange(t) % 2 == 0)
    assert out.extra == {"fleetloop.outcome": "success"}


def test_defaults_reward_zero_and_all_demonstration() -> None:
    data = {"observations": {"proprio": "observation.state"}, "actions": {"action": "action", "grip": "action.gripper"}}
    bound = FeatureMapping.from_dict(data).bind(FEATURES, OBS[1:], [TensorInfo("grip", "float32", (1,)), *ACTS])
    ep = LeRobotEpisode("t", {"observation.state": np.zeros((3, 8)), "action": np.ones((3, 4), np.float32),
                              "action.gripper": np.full((3, 1), 7, np.float32)})
    out = bound.convert(ep)
    np.testing.assert_array_equal(out.rewards, np.zeros(3, np.float32))
    assert out.interventions.dtype == np.bool_ and out.interventions.all()
    # action tensors concatenated in name order: "action" then "grip"
    np.testing.assert_array_equal(out.actions, np.concatenate([np.ones((3, 4)), np.full((3, 1), 7)], 1).astype(np.float32))


def test_missing_feature_lists_the_dataset_features() -> None:
    msg = refused({**GOOD, "observations": {**GOOD["observations"], "corner": "observation.images.top"}},
                  "mapping.observations.corner")
    assert "observation.images.top" in msg and "observation.images.front" in msg and "observation.state" in msg
    refused({**GOOD, "reward": "next.rew"}, "mapping.reward")
    refused({**GOOD, "actions": {"action": "act"}}, "mapping.actions.action")


def test_shape_and_dtype_mismatches_name_both_sides() -> None:
    msg = refused({**GOOD, "resize_images": False}, "mapping.observations.corner")
    assert "video[64, 64, 3]" in msg and "uint8[84, 84, 3]" in msg and "resize_images" in msg
    msg = refused({**GOOD, "observations": {**GOOD["observations"], "corner": "observation.images.depth"}},
                  "mapping.observations.corner")
    assert "channels" in msg
    msg = refused({**GOOD, "observations": {**GOOD["observations"], "proprio": "action"}}, "mapping.observations.proprio")
    assert "float32[4]" in msg and "float32[8]" in msg
    msg = refused({**GOOD, "observations": {**GOOD["observations"], "proprio": "observation.images.front"}},
                  "mapping.observations.proprio")
    assert "non-visual" in msg
    msg = refused({**GOOD, "observations": {**GOOD["observations"], "corner": "observation.state"}},
                  "mapping.observations.corner")
    assert "video/image" in msg
    # float64 -> float32 is cast; float32 -> float64 and int -> float are not
    msg = refused(GOOD, "mapping.actions.action", acts=[TensorInfo("action", "float64", (4,))])
    assert "dtypes differ" in msg
    refused({**GOOD, "actions": {"action": "step.count"}}, "mapping.actions.action", acts=[TensorInfo("action", "float32", (1,))])
    refused({**GOOD, "reward": "observation.state"}, "mapping.reward")
    msg = refused({**GOOD, "intervention": "next.reward"}, "mapping.intervention")
    assert "bool" in msg


def test_unmapped_and_unknown_job_tensors() -> None:
    msg = refused({**GOOD, "observations": {"proprio": "observation.state"}}, "mapping.observations.corner")
    assert "not mapped" in msg and "uint8[84, 84, 3]" in msg
    msg = refused({**GOOD, "observations": {**GOOD["observations"], "wrist": "observation.images.front"}},
                  "mapping.observations.wrist")
    assert "no observation tensor" in msg
    refused({**GOOD, "actions": {"action": "action", "grip": "action.gripper"}}, "mapping.actions.grip")


@pytest.mark.parametrize("data,field", [
    ([1, 2], "mapping"),
    ({**GOOD, "rewards": "x"}, "mapping.rewards"),
    ({**GOOD, "observations": {}}, "mapping.observations"),
    ({k: v for k, v in GOOD.items() if k != "actions"}, "mapping.actions"),
    ({**GOOD, "observations": {"proprio": 3}}, "mapping.observations.proprio"),
    ({**GOOD, "intervention": ""}, "mapping.intervention"),
    ({**GOOD, "resize_images": "yes"}, "mapping.resize_images"),
])
def test_malformed_mapping_files(data, field: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        FeatureMapping.from_dict(data)
    assert info.value.field == field


def test_load_yaml(tmp_path: Path) -> None:
    path = tmp_path / "map.yaml"
    path.write_text("observations:\n  proprio: observation.state\nactions:\n  action: action\nreward: next.reward\n")
    assert FeatureMapping.load(path) == FeatureMapping({"proprio": "observation.state"}, {"action": "action"}, "next.reward")
    with pytest.raises(NotFound):
        FeatureMapping.load(tmp_path / "none.yaml")
    path.write_text("observations: [\n")
    with pytest.raises(InvalidArgument) as info:
        FeatureMapping.load(path)
    assert info.value.field == "mapping"


def test_area_resize() -> None:
    frames = np.arange(2 * 4 * 4 * 1, dtype=np.uint8).reshape(2, 4, 4, 1) * 4
    half = area_resize(frames, 2, 2)
    want = frames.reshape(2, 2, 2, 2, 2, 1).astype(np.float64).mean(axis=(2, 4))
    np.testing.assert_array_equal(half, np.rint(want).astype(np.uint8))
    const = np.full((1, 7, 5, 3), 200, np.uint8)
    assert np.all(area_resize(const, 3, 9) == 200) and area_resize(const, 3, 9).shape == (1, 3, 9, 3)


def test_resolve_tasks() -> None:
    job = ["reach-v3", "push-v3"]
    eps = [["reach-v3"], ["Push the puck"], ["reach-v3"], ["Open the drawer"]]
    assert resolve_tasks(eps[:3], job, {"Push the puck": "push-v3"}, None) == ["reach-v3", "push-v3", "reach-v3"]
    with pytest.raises(InvalidArgument, match="Open the drawer") as info:
        resolve_tasks(eps, job, {"Push the puck": "push-v3"}, None)
    assert info.value.field == "task" and "--task-map" in str(info.value)
    assert resolve_tasks(eps, job, {}, ["reach-v3"]) == ["reach-v3", None, "reach-v3", None]
    with pytest.raises(InvalidArgument) as info:
        resolve_tasks(eps, job, {"Push the puck": "pick-v3"}, None)
    assert info.value.field == "task_map[Push the puck]"
    with pytest.raises(InvalidArgument) as info:
        resolve_tasks(eps, job, {}, ["reach-v3", "pick-v3"])
    assert info.value.field == "tasks[1]"


def test_output_format() -> None:
    assert output_format([TensorInfo("state", "float32", (39,))]) == "fleetloop-demos/v1"
    assert output_format([TensorInfo("proprio", "float32", (8,))]) == "fleetloop-demos/v2"
    assert output_format(OBS) == "fleetloop-demos/v2"


def test_mapping_recorded_by_an_export(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument) as info:
        exported_mapping(tmp_path)
    assert info.value.field == "mapping" and "--mapping" in str(info.value)
    (tmp_path / "meta").mkdir()
    (tmp_path / "meta" / "fleetloop.json").write_text(
        '{"job_id": "j", "mapping": {"observations": {"state": "observation.state"}, "actions": {"action": "action"}, '
        '"reward": "next.reward", "intervention": "intervention"}}')
    assert exported_mapping(tmp_path) == FeatureMapping({"state": "observation.state"}, {"action": "action"}, "next.reward",
                                                        "intervention")
