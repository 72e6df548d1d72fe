"""``fleetloop learner --config``: the file's ``kind`` picks the config model (robot or LLM), and
flags > FLEETLOOP_LEARNER_* environment > file; bad values name the file and the field."""

from __future__ import annotations

import argparse

import pytest

from fleetloop.errors import InvalidArgument
from learner.config import LearnerConfig
from learner.llm.config import LlmLearnerConfig
from services.cli import learner_config


def _args(config=None, **kw) -> argparse.Namespace:
    return argparse.Namespace(config=str(config) if config else None, port=kw.get("port"), host=kw.get("host"),
                              metrics_port=kw.get("metrics_port"), state_dir=kw.get("state_dir"))


def test_no_file_is_a_robot_learner():
    assert type(learner_config(_args())) is LearnerConfig


def test_kind_llm_in_yaml_is_an_llm_learner(tmp_path, monkeypatch):
    path = tmp_path / "llm.yaml"
    path.write_text("kind: llm\njob_id: grpo-1\nmodel: tiny\ngroup_size: 4\nbatch_groups: 2\neta: 2\n"
                    "tasks: [{name: arith, params: {digits: 1}}]\n")
    monkeypatch.setenv("FLEETLOOP_LEARNER_METRICS_PORT", "9999")
    cfg = learner_config(_args(path, port=7001))
    assert isinstance(cfg, LlmLearnerConfig)
    assert (cfg.job_id, cfg.group_size, cfg.eta, cfg.serving.port, cfg.serving.metrics_port) == ("grpo-1", 4, 2, 7001, 9999)


def test_robot_file_stays_a_robot_learner(tmp_path):
    path = tmp_path / "robot.json"
    path.write_text('{"job_id": "robots-1"}')
    cfg = learner_config(_args(path))
    assert type(cfg) is LearnerConfig and cfg.job_id == "robots-1"


def test_bad_llm_field_names_file_and_field(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('kind = "llm"\ngroup_size = 1\n')
    with pytest.raises(InvalidArgument, match=r"bad\.toml: group_size"):
        learner_config(_args(path))


def test_env_variable_of_the_other_kind_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "llm.json"
    path.write_text('{"kind": "llm"}')
    monkeypatch.setenv("FLEETLOOP_LEARNER_BATCH_SIZE", "64")  # a robot-only field
    with pytest.raises(InvalidArgument, match="FLEETLOOP_LEARNER_BATCH_SIZE"):
        learner_config(_args(path))
