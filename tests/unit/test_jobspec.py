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
