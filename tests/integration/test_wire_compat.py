"""Old actors keep working: protocol 2 as it was before the typed settings (``tests/compat/
fleetloop_v2.proto``, frozen), compiled here and spoken to today's learner through generic channel
calls on the ``fleetloop.v1`` method paths. A robot speaking protocol 1 and 2 and an LLM actor speaking
2 get the JSON settings they always read, equal to the typed twins a new actor reads from the same
bytes; chunks built from the frozen messages are acknowledged; weight announcements carry the
``job_state`` string."""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path
from types import ModuleType

import grpc
import numpy as np
import pytest

from fleetloop import wire_settings as ws
from fleetloop.v1 import fleetloop_pb2 as pb
from learner.config import LearnerConfig
from learner.process import build_learner

pytestmark = pytest.mark.timeout(180)
FROZEN = Path(__file__).resolve().parents[1] / "compat" / "fleetloop_v2.proto"
TOKEN = "compat-token"
MD = (("authorization", f"Bearer {TOKEN}"),)


@pytest.fixture(scope="module")
def old(tmp_path_factory) -> ModuleType:
    """The frozen protocol-2 messages, compiled now (grpc_tools' protoc, in-process)."""
    from grpc_tools import protoc

    out = tmp_path_factory.mktemp("frozen")
    (out / "fleetloop_v2.proto").write_text(FROZEN.read_text())
    assert protoc.main(["protoc", f"-I{out}", f"--python_out={out}", str(out / "fleetloop_v2.proto")]) == 0
    spec = importlib.util.spec_from_file_location("fleetloop_v2_frozen_pb2", out / "fleetloop_v2_pb2.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    assert mod.DESCRIPTOR.package == "fleetloop.v2frozen" and "policy_kwargs" not in mod.RunConfig.DESCRIPTOR.fields_by_name
    return mod


def _call(channel: grpc.Channel, method: str, request, response_cls, stream: bool = False, **kw):
    """One RPC on the fleetloop.v1 path with frozen messages (old bytes out, old parser in)."""
    path = f"/fleetloop.v1.Learner/{method}"
    if stream:
        fn = channel.stream_stream(path, request_serializer=lambda m: m.SerializeToString(),
                                   response_deserializer=response_cls.FromString)
    else:
        fn = channel.unary_unary(path, request_serializer=lambda m: m.SerializeToString(),
                                 response_deserializer=response_cls.FromString)
    return fn(request, metadata=MD, timeout=20, **kw)


def _tensor(old: ModuleType, arr: np.ndarray, dtype: int):
    return old.Tensor(dtype=dtype, shape=list(arr.shape), data=np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<")).tobytes())


def _typed_twin(raw: bytes) -> pb.RunConfig:
    """The same RunConfig bytes as today's actors parse them."""
    return pb.RunConfig.FromString(raw)


@pytest.mark.parametrize("protocol", [1, 2])
def test_old_robot_handshakes_streams_and_follows_weights(old, tmp_path, protocol):
    cfg = LearnerConfig(state_dir=tmp_path / "learner", tasks=["reach-v3"], robot_tokens=[TOKEN],
                        policy_kwargs={"hidden": [64, 32], "conditioned": False}, min_online_steps=10 ** 9)
    impl = build_learner(cfg).serve()
    try:
        ch = grpc.insecure_channel(f"127.0.0.1:{impl.port}")
        req = old.HandshakeRequest(protocol_version=protocol, job_id=cfg.job_id, actor_id="old-robot", kind=old.ROBOT,
                                   tasks=["reach-v3"],
                                   observation_specs=[old.TensorSpec(name="state", dtype=old.FLOAT32, shape=[39])],
                                   action_specs=[old.TensorSpec(name="action", dtype=old.FLOAT32, shape=[4],
                                                                low=[-1.0] * 4, high=[1.0] * 4)])
        resp = _call(ch, "Handshake", req, old.HandshakeResponse)
        rc = resp.run_config
        assert json.loads(rc.policy_kwargs_json) == {"hidden": [64, 32], "conditioned": False}
        assert json.loads(rc.inference_json) == {}
        assert resp.current_policy.job_state == "running"
        new = _typed_twin(rc.SerializeToString())  # unknown fields kept: the typed twins ride along
        new_full = pb.HandshakeResponse.FromString(resp.SerializeToString())
        assert new_full.run_config.HasField("policy_kwargs") and new_full.run_config.HasField("inference")
        assert ws.policy_kwargs(new_full.run_config) == json.loads(new.policy_kwargs_json)
        assert ws.inference(new_full.run_config) == json.loads(new.inference_json)
        assert ws.job_state(new_full.current_policy) == "running"

        n = 5
        c = old.EpisodeChunk(job_id=cfg.job_id, actor_id="old-robot", episode_id="e1", seq=0, task_id="reach-v3",
                             behavior_version=0, first_step=0, produced_at=time.time())
        c.observations["state"].CopyFrom(_tensor(old, np.full((n, 39), 0.1, np.float32), old.FLOAT32))
        c.actions["action"].CopyFrom(_tensor(old, np.full((n, 4), 0.5, np.float32), old.FLOAT32))
        c.rewards.CopyFrom(_tensor(old, np.zeros(n, np.float32), old.FLOAT32))
        c.interventions.CopyFrom(_tensor(old, np.zeros(n, np.bool_), old.BOOL))
        c.end.outcome = old.SUCCESS
        acks = list(_call(ch, "StreamExperience", iter([c]), old.Ack, stream=True))
        assert [(a.episode_id, a.seq, a.duplicate) for a in acks] == [("e1", 0, False)]
        assert impl.core.audit()["stored_steps"]["reach-v3"] == n

        def first_announcement():
            sub = ch.unary_stream("/fleetloop.v1.Learner/SubscribeWeights",
                                  request_serializer=lambda m: m.SerializeToString(),
                                  response_deserializer=old.WeightAnnouncement.FromString)(
                old.SubscribeRequest(job_id=cfg.job_id, actor_id="old-robot", current_version=10 ** 6),
                metadata=MD, timeout=20)
            ann = next(iter(sub))
            sub.cancel()
            return ann

        ann = first_announcement()
        assert ann.job_state == "running" and ann.version == impl.core.version
        impl.core.begin_stop()
        ann = first_announcement()
        assert ann.job_state == "stopping"
        assert ws.job_state(pb.WeightAnnouncement.FromString(ann.SerializeToString())) == "stopping"
        ch.close()
    finally:
        impl.stop()


def test_old_llm_actor_gets_llm_json_equal_to_the_typed_settings(old, tmp_path):
    from learner.llm.config import LlmLearnerConfig

    cfg = LlmLearnerConfig(job_id="compat-llm", state_dir=tmp_path / "learner", model_cache_dir=str(tmp_path / "models"),
                           robot_tokens=[TOKEN], tasks=["arith", {"name": "sort", "params": {"min_n": 2, "max_n": 4}, "weight": 2.0}],
                           group_size=4, batch_groups=2, eta=2, max_new_tokens=12, device="cpu")
    impl = build_learner(cfg).serve()
    try:
        ch = grpc.insecure_channel(f"127.0.0.1:{impl.port}")
        resp = _call(ch, "Handshake", old.HandshakeRequest(protocol_version=2, job_id=cfg.job_id, actor_id="old-llm",
                                                           kind=old.LLM), old.HandshakeResponse)
        settings = json.loads(resp.run_config.llm_json)
        assert (settings["model"], settings["group_size"], settings["eta"], settings["max_staleness"]) == ("tiny", 4, 2, 2)
        assert [t["name"] for t in settings["tasks"]] == ["arith", "sort"]
        new = pb.HandshakeResponse.FromString(resp.SerializeToString()).run_config
        assert new.HasField("llm")
        assert ws.rollout_settings(new) == settings
        grant = _call(ch, "Admit", old.AdmitRequest(job_id=cfg.job_id, actor_id="old-llm", rollouts=1, current_version=0),
                      old.AdmitResponse)
        assert grant.max_staleness == 2 and grant.learner_version == impl.core.version
        ch.close()
    finally:
        impl.stop()
