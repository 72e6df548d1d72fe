"""JobSpec validation (field paths in errors) and its mapping onto the learner configuration."""

from pathlib import Path

import pytest
from pydantic import ValidationError

from learner.control_agent import actor_status
from services.control.jobspec import JobSpec, learner_config


def _errors(**spec):
    with pytest.raises(ValidationError) as info:
        JobSpec.model_validate(spec)
    return {".".join(str(p) for p in e["loc"]): e["msg"] for e in info.value.errors()}


def test_minimal_spec_gets_defaults():
    s = JobSpec(name="j1", tasks=["reach-v3"])
    assert s.kind == "robot" and s.algorithm == "hg_dagger" and s.fleet is None and s.resources.gpus == 0


@pytest.mark.parametrize("spec,path", [
    ({"name": "Bad Name", "tasks": ["reach-v3"]}, "name"),
    ({"name": "ok", "tasks": []}, "tasks"),
    ({"name": "ok", "tasks": ["a", "a"]}, "tasks"),
    ({"name": "ok", "tasks": ["has space"]}, "tasks.0"),
    ({"name": "ok", "tasks": ["t"], "algorithm": "nope"}, "algorithm"),
    ({"name": "ok", "tasks": ["t"], "publish_every": 0}, "publish_every"),
    ({"name": "ok", "tasks": ["t"], "fleet": {"robots": 1000}}, "fleet.robots"),
    ({"name": "ok", "tasks": ["t"], "resources": {"gpus": -1}}, "resources.gpus"),
    ({"name": "ok", "tasks": ["t"], "policy_factory": "no-colon"}, "policy_factory"),
    ({"name": "ok", "tasks": ["t"], "surprise": 1}, "surprise"),
])
def test_invalid_specs_name_the_field(spec, path):
    errs = _errors(**spec)
    assert path in errs, errs


def test_llm_kind_is_refused_with_a_clear_message():
    errs = _errors(name="llm", tasks=["t"], kind="llm")
    assert "kind" in errs and "robot" in errs["kind"]


def test_algorithm_params_are_checked_at_submission():
    errs = _errors(name="p", tasks=["t"], algorithm_params={"lr": "fast"})
    assert "algorithm_params.lr" in errs and "hg_dagger" in errs["algorithm_params.lr"], errs  # the full path, not the body
    assert JobSpec(name="p", tasks=["t"], algorithm_params={"lr": 1e-4}).algorithm_params == {"lr": 1e-4}


def test_learner_config_from_spec(tmp_path):
    s = JobSpec(name="j", tasks=["reach-v3", "push-v3"], staleness_bound=3, publish_every=7, resources={"gpus": 1})
    cfg = learner_config(s, "j-abc123", tmp_path, "redis://x:1/0", initial_weights=Path("w.safetensors"))
    assert cfg.job_id == "j-abc123" and cfg.tasks == ["reach-v3", "push-v3"] and cfg.optimisation.publish_every == 7
    assert cfg.optimisation.staleness.bound == 3 and cfg.device == "cuda" and cfg.control_redis_url == "redis://x:1/0"
    assert cfg.optimisation.initial_weights == Path("w.safetensors") and cfg.serving.port == 0


def test_actor_status_by_age():
    assert actor_status(100.0, 105.0, "running") == "active"
    assert actor_status(100.0, 130.0, "running") == "idle"
    assert actor_status(100.0, 400.0, "running") == "gone"
    assert actor_status(100.0, 101.0, "stopping") == "stopping"


def test_learner_env_overrides():
    from fleetloop.errors import InvalidArgument
    from learner.settings import load_learner_config
    env = {"FLEETLOOP_LEARNER_PORT": "50051", "FLEETLOOP_LEARNER_ROBOT_TOKENS": '["a","b"]', "OTHER": "x",
           "FLEETLOOP_LEARNER_CONTROL_REDIS_URL": "redis://r:6379/0"}
    cfg = load_learner_config(None, {}, environ=env)
    assert cfg.serving.port == 50051 and cfg.serving.robot_tokens == ["a", "b"] and cfg.control_redis_url == "redis://r:6379/0"
    with pytest.raises(InvalidArgument, match="FLEETLOOP_LEARNER_PROT"):
        load_learner_config(None, {}, environ={"FLEETLOOP_LEARNER_PROT": "1"})


# -- task names at submission (issue 17, item 11) -------------------------------------------------
def _task_error(**spec):
    from fleetloop.errors import InvalidArgument
    from services.control.jobspec import check_tasks
    with pytest.raises(InvalidArgument) as info:
        check_tasks(JobSpec(**spec))
    return info.value


def test_simulated_fleet_tasks_must_be_meta_world_v3_names():
    err = _task_error(name="s", tasks=["reach-v3", "reach-v2"], fleet={"robots": 1})
    assert err.field == "tasks[1]" and err.value == "reach-v2" and err.http_status == 422
    assert "tasks[1] 'reach-v2'" in str(err) and "did you mean 'reach-v3'" in str(err) and "simulated fleet" in str(err)
    err = _task_error(name="s", tasks=["push-v3", "qqq", "drawer-opne-v3"], fleet={"robots": 0})
    assert err.field == "tasks[1]" and err.value == "qqq"
    assert "'drawer-open-v3'" in str(err) and "valid tasks: " in str(err) and "window-open-v3" in str(err)


def test_bootstrap_tasks_need_the_registry_unless_data_is_given():
    err = _task_error(name="b", tasks=["pick-plaec-v3"], bootstrap={})
    assert err.field == "tasks[0]" and "'pick-place-v3'" in str(err) and "bootstrap" in str(err)
    from services.control.jobspec import check_tasks
    check_tasks(JobSpec(name="b", tasks=["own-task"], bootstrap={}, offline_dataset="/data/demos"))  # no demos recorded


def test_real_robot_jobs_declare_their_own_task_names():
    from services.control.jobspec import check_tasks, simulated_tasks
    check_tasks(JobSpec(name="r", tasks=["kitchen-wipe", "reach-v2", "shelf.pick_2"]))  # no simulator: any well-formed name
    assert len(simulated_tasks()) == 50
    check_tasks(JobSpec(name="r", tasks=simulated_tasks()[:64], fleet={"robots": 1}))  # every registry name passes
    errs = _errors(name="r", tasks=["a", "b", "a"])
    assert "tasks[2] 'a' repeats tasks[0]" in errs["tasks"], errs
    assert "tasks.1" in _errors(name="r", tasks=["ok", ""]) and "tasks.0" in _errors(name="r", tasks=["bad/name"])


# -- tensor specs in the job (issue 19, item 1) ---------------------------------------------------
PIXELS_YAML = """
name: pix
tasks: [push-v3]
memory_budget_mb: 512
observation_specs:
  - {name: proprio, dtype: float32, shape: [8]}
  - {name: wrist, dtype: uint8, shape: [96, 128, 3]}
action_specs:
  - {name: action, dtype: float32, shape: [7], low: [-1], high: [1]}
"""


def test_specs_from_yaml_reach_the_learner_config(tmp_path):
    import yaml
    s = JobSpec.model_validate(yaml.safe_load(PIXELS_YAML))  # real robots: any valid specs
    cfg = learner_config(s, "pix-abc123", tmp_path, None)
    assert [(o.name, o.dtype, o.shape) for o in cfg.observation_specs] == [("proprio", "float32", [8]),
                                                                         ("wrist", "uint8", [96, 128, 3])]
    assert [o.is_image for o in cfg.observation_specs] == [False, True]
    assert cfg.action_specs[0].shape == [7] and cfg.action_specs[0].low == [-1.0]
    assert cfg.flow.memory_budget_mb == 512


def test_omitted_specs_are_the_fleet_preset(tmp_path):
    from fleetloop.presets import metaworld_specs
    cfg = learner_config(JobSpec(name="s", tasks=["reach-v3"]), "s-1", tmp_path, None)  # no fleet: the state preset
    assert [o.model_dump() for o in cfg.observation_specs] == metaworld_specs("state")[0]
    assert cfg.obs_dim == 39 and cfg.act_dim == 4 and cfg.action_specs[0].low == [-1.0] * 4
    assert cfg.flow.memory_budget_mb is None
    s = JobSpec(name="p", tasks=["push-v3"], fleet={"observations": "pixels", "cameras": ["topview"], "image_size": 32})
    assert s.observation_specs is None  # the spec keeps what was submitted; the preset fills in the learner config
    cfg = learner_config(s, "p-1", tmp_path, None)
    assert [(o.name, o.shape) for o in cfg.observation_specs] == [("proprio", [8]), ("topview", [32, 32, 3])]
    obs, act = metaworld_specs("pixels", ["topview"], 32)
    assert JobSpec(name="p", tasks=["push-v3"], fleet={"observations": "pixels", "cameras": ["topview"], "image_size": 32},
                   observation_specs=obs, action_specs=act).observation_specs is not None  # the preset itself: accepted


@pytest.mark.parametrize("extra,path,words", [
    ({"fleet": {"observations": "pixels"}, "observation_specs": [{"name": "proprio", "shape": [8]},
      {"name": "corner3", "dtype": "uint8", "shape": [64, 64, 3]},
      {"name": "gripperPOV", "dtype": "uint8", "shape": [84, 84, 3]}]},
     "observation_specs", ["observation_specs[corner3]", "[64, 64, 3]", "[84, 84, 3]"]),
    ({"fleet": {}, "observation_specs": [{"name": "state", "shape": [40]}]}, "observation_specs",
     ["observation_specs[state]", "[40]", "simulated fleet"]),
    ({"bootstrap": {}, "action_specs": [{"name": "action", "shape": [4], "low": [-2], "high": [2]}]}, "action_specs",
     ["action_specs[action]", "bounds", "bootstrap"]),
])
def test_simulated_jobs_refuse_specs_other_than_the_preset(extra, path, words):
    errs = _errors(name="s", tasks=["push-v3"], **extra)
    assert path in errs, errs
    for w in words:
        assert w in errs[path], errs


def test_bootstrap_with_data_takes_any_specs():
    s = JobSpec(name="b", tasks=["t"], bootstrap={}, offline_dataset="/d", observation_specs=[{"name": "s", "shape": [3]}])
    assert s.tensor_specs()[0][0].shape == [3]


@pytest.mark.parametrize("extra,path", [
    ({"observation_specs": [{"name": "cam", "dtype": "uint8", "shape": [3, 84, 84]}]}, "observation_specs.0.shape"),
    ({"observation_specs": [{"name": "cam", "dtype": "uint8", "shape": [84, 84, 2]}]}, "observation_specs.0.shape"),
    ({"observation_specs": [{"name": "a", "shape": [1]}, {"name": "a", "shape": [2]}]}, "observation_specs"),
    ({"observation_specs": []}, "observation_specs"),
    ({"action_specs": [{"name": "a", "dtype": "int64", "shape": [2]}]}, "action_specs"),
    ({"action_specs": [{"name": "a", "shape": [3], "low": [0, 0]}]}, "action_specs.0.low"),
    ({"action_specs": [{"name": "a", "shape": [2], "low": [1], "high": [0]}]}, "action_specs.0.high"),
    ({"memory_budget_mb": 10}, "memory_budget_mb"),
    ({"fleet": {"observations": "rgbd"}}, "fleet.observations"),
    ({"fleet": {"cameras": ["corner3", "corner3"]}}, "fleet.cameras"),
    ({"fleet": {"cameras": ["nose"]}}, "fleet.cameras.0"),
    ({"fleet": {"image_size": 8}}, "fleet.image_size"),
    ({"fleet": {"jpeg_quality": 0}}, "fleet.jpeg_quality"),
])
def test_bad_specs_name_the_field(extra, path):
    errs = _errors(name="s", tasks=["push-v3"], **extra)
    assert path in errs, errs


def test_bad_image_layout_names_shape_in_the_learner_config_too():
    from learner.config import LearnerConfig
    with pytest.raises(ValidationError) as info:
        LearnerConfig(observation_specs=[{"name": "cam", "dtype": "uint8", "shape": [3, 84, 84]}])
    (err,) = info.value.errors()
    assert err["loc"] == ("observation_specs", 0, "shape") and "channels last" in err["msg"] and "[84, 84, 3]" in err["msg"]


def test_metaworld_presets():
    from fleetloop.errors import InvalidArgument
    from fleetloop.presets import metaworld_specs
    obs, act = metaworld_specs()
    assert obs == [{"name": "state", "dtype": "float32", "shape": [39], "low": [], "high": []}]
    assert act == [{"name": "action", "dtype": "float32", "shape": [4], "low": [-1.0] * 4, "high": [1.0] * 4}]
    obs, _ = metaworld_specs("pixels", cameras=("gripperPOV", "corner3"), image_size=16)
    assert [(o["name"], o["dtype"], o["shape"]) for o in obs] == [
        ("proprio", "float32", [8]), ("gripperPOV", "uint8", [16, 16, 3]), ("corner3", "uint8", [16, 16, 3])]
    for kwargs, field in (({"observations": "rgb"}, "observations"), ({"cameras": ["corner3", "nose"]}, "cameras[1]"),
                          ({"cameras": ["corner3", "corner3"]}, "cameras[1]"), ({"cameras": "corner3"}, "cameras"),
                          ({"cameras": []}, "cameras"), ({"image_size": 8}, "image_size"), ({"image_size": 84.0}, "image_size")):
        with pytest.raises(InvalidArgument) as info:
            metaworld_specs("pixels", **kwargs) if "observations" not in kwargs else metaworld_specs(**kwargs)
        assert info.value.field == field, (kwargs, info.value.field)


@pytest.mark.parametrize("name", ["job-metaworld.yaml", "job-pixels.yaml"])
def test_examples_validate(name):
    import yaml
    from services.control.jobspec import check_tasks
    spec = JobSpec.model_validate(yaml.safe_load((Path(__file__).parents[2] / "examples" / name).read_text()))
    check_tasks(spec)
    cfg = learner_config(spec, "ex-abc123", Path("/tmp/unused"), None)
    if name == "job-pixels.yaml":
        assert [o.name for o in cfg.observation_specs if o.is_image] == ["corner3", "gripperPOV"]
        assert cfg.optimisation.batch_size == 64 and cfg.flow.memory_budget_mb and spec.fleet.observations == "pixels"
