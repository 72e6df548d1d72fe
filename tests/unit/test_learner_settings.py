"""Nested learner configs (issue 18, item 6): every old flat name lifts to its group, old + new
together is refused naming both, an old flat config (file, JSON, kwargs) keeps every value, and
:func:`learner.settings.load_learner_config` reads nested and old flat ``FLEETLOOP_LEARNER_*`` names,
refuses unknown ones, logs each old name once with its new one, and keeps flags > env > file."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from pydantic import ValidationError

from fleetloop.errors import InvalidArgument
from learner.config import LEGACY, LearnerConfig
from learner.llm.config import LLM_LEGACY, LlmLearnerConfig
from learner.process import parse_config
from learner.settings import load_learner_config

#: A valid, non-default value for every old flat name (TLS files are made per test: see ``_tls_files``).
SAMPLES = {
    "host": "127.0.0.2", "advertise_host": "robots.example", "port": 7001, "metrics_port": 9401, "grpc_workers": 64,
    "max_streams": 10, "max_subscriptions": 10, "stream_idle_timeout_s": 30.0, "keepalive_time_s": 5.0,
    "keepalive_timeout_s": 2.0, "max_message_bytes": 1 << 22, "weight_chunk_bytes": 1 << 16, "keep_versions": 3,
    "robot_tokens": ["t1"], "allow_unauthenticated": True,
    "tls_cert_file": "cert", "tls_key_file": "key", "tls_client_ca_file": "ca",
    "max_actor_steps_per_s": 100.0, "actor_burst_s": 1.0, "actor_hard_factor": 2.0, "max_ingest_steps_per_s": 1000.0,
    "max_backoff_ms": 1000, "memory_budget_mb": 512.0, "online_capacity": 5000, "actor_metrics_ttl_s": 60.0,
    "policy_factory": "fleetloop.policies:recap_mlp_policy", "policy_kwargs": {"hidden": 32},
    "initial_weights": "w.safetensors", "algorithm": "recap", "algorithm_params": {"lr": 1e-4},
    "sampler": {"mode": "fixed", "fixed_online_share": 0.25}, "staleness": {"bound": 3}, "offline_dataset": "demos",
    "batch_size": 16, "publish_every": 5, "min_publish_interval_s": 1.0, "max_updates_per_s": 2.0,
    "min_online_steps": 100, "checkpoint_every_s": 30.0,
    "chunk_steps": 20, "max_chunk_wait_s": 0.1, "max_episode_steps": 150,
    "keep_versions_on_disk": 2,
}

#: the flat ``LearnerConfig().model_dump(mode="json")`` before item 6 (``git show 7301c62:learner/config.py``)
OLD_DEFAULT_DUMP = json.loads(
    '{"job_id": "demo", "host": "127.0.0.1", "advertise_host": null, "port": 0, "metrics_port": null, "state_dir": '
    '"runs/learner", "tasks": ["reach-v3", "push-v3", "drawer-open-v3"], "observation_specs": [{"name": "state", "dtype": '
    '"float32", "shape": [39], "low": [], "high": []}], "action_specs": [{"name": "action", "dtype": "float32", "shape": '
    '[4], "low": [-1.0, -1.0, -1.0, -1.0], "high": [1.0, 1.0, 1.0, 1.0]}], "policy_factory": '
    '"fleetloop.policies:mlp_policy", "policy_kwargs": {}, "initial_weights": null, "algorithm": "hg_dagger", '
    '"algorithm_params": {}, "sampler": {"mode": "adaptive", "window": 200, "alpha": 2.0, "clip": [0.2, 0.8], '
    '"fixed_online_share": 0.5, "min_losses": 10, "allocation": "systematic"}, "staleness": null, "offline_dataset": '
    'null, "batch_size": 256, "publish_every": 25, "min_publish_interval_s": 0.0, "max_updates_per_s": null, '
    '"min_online_steps": 0, "max_ingest_steps_per_s": null, "checkpoint_every_s": 60.0, "keep_versions": 8, '
    '"online_capacity": 200000, "chunk_steps": 50, "max_chunk_wait_s": 0.5, "max_episode_steps": 200, '
    '"max_message_bytes": 8388608, "weight_chunk_bytes": 1048576, "robot_tokens": [], "allow_unauthenticated": false, '
    '"control_redis_url": null, "tls_cert_file": null, "tls_key_file": null, "tls_client_ca_file": null, "device": '
    '"auto", "grpc_workers": 136, "max_streams": null, "max_subscriptions": null, "stream_idle_timeout_s": 60.0, '
    '"keepalive_time_s": 20.0, "keepalive_timeout_s": 10.0, "max_actor_steps_per_s": null, "actor_burst_s": 2.0, '
    '"actor_hard_factor": 3.0, "max_backoff_ms": 5000, "memory_budget_mb": null, "seed": 0, "actor_metrics_ttl_s": '
    '600.0, "fsync_log": false}')

#: the same old model with a non-default value in every field (built from the old flat class, dumped as JSON)
OLD_FULL_DUMP = json.loads(
    '{"job_id": "flat-1", "host": "127.0.0.2", "advertise_host": "robots.example", "port": 7001, "metrics_port": 9401, '
    '"state_dir": "/var/lib/fl", "tasks": ["reach-v3", "push-v3"], "observation_specs": [{"name": "state", "dtype": '
    '"float32", "shape": [39], "low": [], "high": []}], "action_specs": [{"name": "action", "dtype": "float32", "shape": '
    '[4], "low": [-1.0, -1.0, -1.0, -1.0], "high": [1.0, 1.0, 1.0, 1.0]}], "policy_factory": '
    '"fleetloop.policies:recap_mlp_policy", "policy_kwargs": {"hidden": 32}, "initial_weights": "w.safetensors", '
    '"algorithm": "recap", "algorithm_params": {"lr": 0.0001}, "sampler": {"mode": "fixed", "window": 200, "alpha": 2.0, '
    '"clip": [0.2, 0.8], "fixed_online_share": 0.25, "min_losses": 10, "allocation": "systematic"}, "staleness": '
    '{"bound": 3, "policy": "drop", "downweight_factor": 0.5, "admit_expert": true}, "offline_dataset": "demos", '
    '"batch_size": 16, "publish_every": 5, "min_publish_interval_s": 1.0, "max_updates_per_s": 2.0, "min_online_steps": '
    '100, "max_ingest_steps_per_s": 1000.0, "checkpoint_every_s": 30.0, "keep_versions": 3, "online_capacity": 5000, '
    '"chunk_steps": 20, "max_chunk_wait_s": 0.1, "max_episode_steps": 150, "max_message_bytes": 4194304, '
    '"weight_chunk_bytes": 65536, "robot_tokens": ["t1"], "allow_unauthenticated": true, "control_redis_url": '
    '"redis://r:6379/0", "tls_cert_file": null, "tls_key_file": null, "tls_client_ca_file": null, "device": "cpu", '
    '"grpc_workers": 64, "max_streams": 10, "max_subscriptions": 10, "stream_idle_timeout_s": 30.0, "keepalive_time_s": '
    '5.0, "keepalive_timeout_s": 2.0, "max_actor_steps_per_s": 100.0, "actor_burst_s": 1.0, "actor_hard_factor": 2.0, '
    '"max_backoff_ms": 1000, "memory_budget_mb": 512.0, "seed": 7, "actor_metrics_ttl_s": 60.0, "fsync_log": true}')


def _flat(cfg: LearnerConfig) -> dict:
    """The new nested dump, flattened back to the old names through LEGACY (``kind`` left out)."""
    dump = cfg.model_dump(mode="json")
    out = {k: v for k, v in dump.items() if k not in ("kind", "serving", "tls", "flow", "optimisation", "episodes", "images",
                                                        "rollout")}
    for old, (group, name) in LEGACY.items():
        out[old] = dump[group][name]
    return out


def _tls_files(tmp_path: Path) -> dict[str, str]:
    paths = {}
    for name in ("cert", "key", "ca"):
        (tmp_path / name).write_text("PEM")
        paths[name] = str(tmp_path / name)
    return paths


def _sample(old: str, tmp_path: Path) -> tuple[object, dict]:
    """A sample value of ``old`` and the other (nested) TLS settings it needs to be valid."""
    if not old.startswith("tls_"):
        return SAMPLES[old], {}
    files = _tls_files(tmp_path)
    tls = {"cert_file": files["cert"], "key_file": files["key"]}
    tls.pop(LEGACY[old][1], None)
    return files[SAMPLES[old]], ({"tls": tls} if tls else {})


class _Events(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def events():
    handler = _Events()
    loggers = [logging.getLogger(n) for n in ("fleetloop.learner.settings", "fleetloop.learner.config")]
    for lg in loggers:
        lg.addHandler(handler)
    yield handler
    for lg in loggers:
        lg.removeHandler(handler)


def test_samples_cover_every_old_name():
    assert set(LEGACY) | set(LLM_LEGACY) == set(SAMPLES)
    assert len(LEGACY) == 43 and set(LLM_LEGACY) - set(LEGACY) == {"keep_versions_on_disk"}
    # the old flat model's fields are the top-level fields plus LEGACY, each once
    top = set(LearnerConfig.model_fields) - {"kind", "serving", "tls", "flow", "optimisation", "episodes", "images", "rollout"}
    assert top | set(LEGACY) == set(OLD_DEFAULT_DUMP) and not top & set(LEGACY)


@pytest.mark.parametrize("old", sorted(LEGACY))
def test_old_flat_name_lifts_to_its_group(old, tmp_path, events):
    group, name = LEGACY[old]
    value, extra = _sample(old, tmp_path)
    lifted = LearnerConfig(**{old: value}, **extra)
    nested = LearnerConfig(**{group: {name: value, **extra.get(group, {})}}, **{k: v for k, v in extra.items() if k != group})
    assert getattr(getattr(lifted, group), name) == getattr(getattr(nested, group), name)
    assert getattr(getattr(lifted, group), name) != getattr(getattr(LearnerConfig(), group), name)
    assert lifted == nested
    assert not events.lines  # in code: silent


@pytest.mark.parametrize("old", sorted(LLM_LEGACY))
def test_old_flat_name_lifts_in_an_llm_config(old, tmp_path):
    group, name = LLM_LEGACY[old]
    value, extra = _sample(old, tmp_path)
    lifted = LlmLearnerConfig(**{old: value}, **extra)
    assert getattr(getattr(lifted, group), name) != getattr(getattr(LlmLearnerConfig(), group), name)
    assert lifted == LlmLearnerConfig(**{group: {name: value, **extra.get(group, {})}},
                                      **{k: v for k, v in extra.items() if k != group})


@pytest.mark.parametrize("old", sorted(LEGACY))
def test_old_and_new_name_together_are_refused_naming_both(old, tmp_path):
    group, name = LEGACY[old]
    value, _ = _sample(old, tmp_path)
    with pytest.raises(ValidationError) as info:
        LearnerConfig(**{old: value, group: {name: value}})
    assert f"{old} and {group}.{name}" in str(info.value)


def test_robot_only_names_stay_refused_on_an_llm_config():
    for old in ("batch_size", "max_actor_steps_per_s", "chunk_steps", "control_redis_url"):
        with pytest.raises(ValidationError, match=old):
            LlmLearnerConfig(**{old: SAMPLES.get(old, "redis://r")})
    with pytest.raises(ValidationError, match="max_actor_steps_per_s"):
        LlmLearnerConfig(flow={"max_actor_steps_per_s": 1.0})


@pytest.mark.parametrize("old_dump", [OLD_DEFAULT_DUMP, OLD_FULL_DUMP], ids=["defaults", "every-field-set"])
def test_old_flat_config_round_trips(old_dump, tmp_path, events):
    text = json.dumps(old_dump)
    cfg = LearnerConfig.model_validate_json(text)
    assert _flat(cfg) == old_dump
    assert _flat(parse_config(text)) == old_dump                     # the Ray actor's path
    assert _flat(LearnerConfig(**old_dump)) == old_dump               # kwargs in code
    assert _flat(parse_config(cfg.model_dump_json())) == old_dump    # the new nested JSON
    assert not events.lines
    path = tmp_path / "old.json"
    path.write_text(text)
    assert _flat(load_learner_config(path, {}, environ={})) == old_dump  # an old file (or ConfigMap)
    logged = [line for line in events.lines if "event=config_name_deprecated" in line]
    assert len(logged) == len(LEGACY)  # once per old name
    assert any("old=port" in line and "new=serving.port" in line and f"source={path}" in line for line in logged)


def test_old_flat_toml_and_yaml_files_load(tmp_path):
    toml = tmp_path / "learner.toml"
    toml.write_text('job_id = "t"\nport = 7001\nbatch_size = 16\n[tls]\n')
    yaml = tmp_path / "learner.yaml"
    yaml.write_text("job_id: t\nserving: {port: 7001}\noptimisation: {batch_size: 16}\n")
    a, b = load_learner_config(toml, {}, environ={}), load_learner_config(yaml, {}, environ={})
    assert a == b and (a.serving.port, a.optimisation.batch_size) == (7001, 16)


def test_old_and_new_name_in_one_file_are_refused(tmp_path):
    path = tmp_path / "both.yaml"
    path.write_text("port: 1\nserving: {port: 2}\n")
    with pytest.raises(InvalidArgument, match=r"both\.yaml: port and serving\.port"):
        load_learner_config(path, {}, environ={})


def test_bad_value_under_an_old_name_names_file_field_and_old_name(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"batch_size": 0}')
    with pytest.raises(InvalidArgument, match=r"bad\.json \(batch_size is now optimisation\.batch_size\): "
                                              r"optimisation\.batch_size: Input should be greater"):
        load_learner_config(path, {}, environ={})


def test_nested_and_old_env_names_both_work(events):
    env = {"FLEETLOOP_LEARNER_SERVING__PORT": "7001", "FLEETLOOP_LEARNER_BATCH_SIZE": "16",
           "FLEETLOOP_LEARNER_OPTIMISATION__STALENESS__BOUND": "3",
           "FLEETLOOP_LEARNER_SERVING__ROBOT_TOKENS": '["a", "b"]', "FLEETLOOP_LEARNER_POLICY_KWARGS": '{"hidden": 8}',
           "FLEETLOOP_LEARNER_EPISODES": '{"chunk_steps": 10}', "FLEETLOOP_LEARNER_SEED": "5", "OTHER": "x"}
    cfg = load_learner_config(None, {}, environ=env)
    assert (cfg.serving.port, cfg.optimisation.batch_size, cfg.optimisation.staleness.bound, cfg.serving.robot_tokens,
            cfg.optimisation.policy_kwargs, cfg.episodes.chunk_steps, cfg.seed) == (7001, 16, 3, ["a", "b"], {"hidden": 8}, 10, 5)
    logged = sorted(line.split("event=config_name_deprecated ")[1].split(" source=")[0]
                    for line in events.lines if "config_name_deprecated" in line)
    assert logged == ["new=FLEETLOOP_LEARNER_OPTIMISATION__BATCH_SIZE old=FLEETLOOP_LEARNER_BATCH_SIZE",
                      "new=FLEETLOOP_LEARNER_OPTIMISATION__POLICY_KWARGS old=FLEETLOOP_LEARNER_POLICY_KWARGS"]


def test_unknown_env_name_is_refused_naming_it():
    for name in ("FLEETLOOP_LEARNER_PROT", "FLEETLOOP_LEARNER_SERVING__PROT", "FLEETLOOP_LEARNER_SERVING__PORT__X",
                 "FLEETLOOP_LEARNER_OPTIMISATION__SAMPLER__MOD"):
        with pytest.raises(InvalidArgument, match=name + " is not a LearnerConfig setting"):
            load_learner_config(None, {}, environ={name: "1"})
    with pytest.raises(InvalidArgument, match="FLEETLOOP_LEARNER_FLOW__MAX_ACTOR_STEPS_PER_S"):  # robot-only on LLM
        load_learner_config(None, {"kind": "llm"}, environ={"FLEETLOOP_LEARNER_FLOW__MAX_ACTOR_STEPS_PER_S": "1"})


def test_old_and_new_env_names_together_are_refused():
    env = {"FLEETLOOP_LEARNER_PORT": "1", "FLEETLOOP_LEARNER_SERVING__PORT": "2"}
    with pytest.raises(InvalidArgument, match="FLEETLOOP_LEARNER_PORT and FLEETLOOP_LEARNER_SERVING__PORT"):
        load_learner_config(None, {}, environ=env)


def test_bad_env_value_names_the_variable():
    with pytest.raises(InvalidArgument, match="FLEETLOOP_LEARNER_PORT: serving.port: Input should be a valid integer"):
        load_learner_config(None, {}, environ={"FLEETLOOP_LEARNER_PORT": "x"})
    with pytest.raises(InvalidArgument, match="FLEETLOOP_LEARNER_TASKS"):
        load_learner_config(None, {}, environ={"FLEETLOOP_LEARNER_TASKS": "[oops"})


def test_precedence_flags_over_env_over_file(tmp_path):
    path = tmp_path / "l.toml"
    path.write_text('job_id = "f"\nstate_dir = "from-file"\n[serving]\nport = 1\nhost = "127.0.0.3"\nmetrics_port = 5\n')
    env = {"FLEETLOOP_LEARNER_SERVING__PORT": "2", "FLEETLOOP_LEARNER_STATE_DIR": "from-env"}
    cfg = load_learner_config(path, {"serving": {"host": "127.0.0.4"}}, environ=env)
    assert (cfg.job_id, cfg.serving.port, cfg.serving.host, cfg.serving.metrics_port, cfg.state_dir) == \
        ("f", 2, "127.0.0.4", 5, Path("from-env"))
    cfg = load_learner_config(path, {"port": 3, "state_dir": "from-flag"}, environ=env)  # old names as flags too
    assert (cfg.serving.port, cfg.state_dir) == (3, Path("from-flag"))


def test_kind_comes_from_file_env_or_flags(tmp_path):
    path = tmp_path / "llm.json"
    path.write_text('{"kind": "llm", "port": 7001, "max_backoff_ms": 100}')
    cfg = load_learner_config(path, {}, environ={})
    assert isinstance(cfg, LlmLearnerConfig) and (cfg.serving.port, cfg.flow.max_backoff_ms) == (7001, 100)
    assert isinstance(load_learner_config(None, {}, environ={"FLEETLOOP_LEARNER_KIND": "llm"}), LlmLearnerConfig)
    assert type(load_learner_config(None, {}, environ={})) is LearnerConfig
    assert isinstance(parse_config('{"kind": "llm"}'), LlmLearnerConfig) and type(parse_config("{}")) is LearnerConfig


def test_kube_settings_read_the_environment(monkeypatch):
    from services.control.launchers.k8s_settings import KubeSettings
    monkeypatch.setenv("FLEETLOOP_K8S_NAMESPACE", "fleet")
    monkeypatch.setenv("FLEETLOOP_K8S_NODE_SELECTOR", '{"gpu": "yes"}')
    s = KubeSettings(redis_url="redis://r")
    assert (s.namespace, s.node_selector) == ("fleet", {"gpu": "yes"})
    assert KubeSettings.from_env({}, defaults={"redis_url": "r"}).namespace == "default"  # only the mapping given
    env = {"FLEETLOOP_K8S_NAMESPACE": "x"}
    assert KubeSettings.from_env(env, defaults={"redis_url": "r", "namespace": "d"}).namespace == "x"  # env > defaults
    assert KubeSettings.from_env(env, defaults={"redis_url": "r"}, namespace="y").namespace == "y"    # overrides > env
    monkeypatch.setenv("FLEETLOOP_K8S_NAMESPAC", "fleet")
    with pytest.raises(InvalidArgument, match="FLEETLOOP_K8S_NAMESPAC is not a KubeSettings setting"):
        KubeSettings(redis_url="redis://r")
