"""Bad input gets a clear gRPC error naming field and value, is counted, and never disturbs other
actors. Real gRPC server on a free loopback port (the learner in-process, without Ray)."""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest

from actor.main import robot_specs
from fleetloop.codec import PROTOCOL_VERSION, encode, make_spec
from fleetloop.v1 import fleetloop_pb2 as pb
from fleetloop.v1 import fleetloop_pb2_grpc as pb_grpc
from learner.config import LearnerConfig
from learner.process import build_learner
from tests.integration.helpers import RobotThread

pytestmark = [pytest.mark.timeout(180)]
TASKS = ["reach-v3"]
MD = (("authorization", "Bearer tok"),)


@pytest.fixture()
def learner(tmp_path):
    cfg = LearnerConfig(state_dir=tmp_path / "learner", tasks=TASKS, robot_tokens=["tok"], chunk_steps=20,
                        max_message_bytes=256 * 1024, max_updates_per_s=20, publish_every=10)
    impl = build_learner(cfg.model_dump_json()).serve()
    yield impl
    impl.stop()


def _stub(impl):
    ch = grpc.insecure_channel(f"127.0.0.1:{impl.port}")
    return ch, pb_grpc.LearnerStub(ch)


def _chunk(steps=5, obs_shape=(39,), obs_dtype=np.float32, job="demo", task="reach-v3", episode="ep-1", seq=0, nan=False,
           version=0):
    obs = np.zeros((steps, *obs_shape), obs_dtype)
    if nan:
        obs[1, 3] = np.nan
    c = pb.EpisodeChunk(job_id=job, actor_id="bad-actor", episode_id=episode, seq=seq, task_id=task, behavior_version=version)
    encode(obs, c.observations["state"])
    encode(np.zeros((steps, 4), np.float32), c.actions["action"])
    encode(np.zeros(steps, np.float32), c.rewards)
    encode(np.zeros(steps, np.bool_), c.interventions)
    return c


def _send(stub, chunk, md=MD):
    return list(stub.StreamExperience(iter([chunk]), metadata=md, timeout=10))


@pytest.mark.parametrize("kwargs, code, words", [
    ({"obs_shape": (38,)}, grpc.StatusCode.INVALID_ARGUMENT, ["observations[state].shape", "[5, 38]"]),
    ({"obs_dtype": np.float64}, grpc.StatusCode.INVALID_ARGUMENT, ["observations[state].dtype", "float64"]),
    ({"nan": True}, grpc.StatusCode.INVALID_ARGUMENT, ["observations[state]", "nan", "[1, 3]"]),
    ({"job": "nope"}, grpc.StatusCode.NOT_FOUND, ["job_id", "'nope'"]),
    ({"task": "fly-v3"}, grpc.StatusCode.INVALID_ARGUMENT, ["task_id", "'fly-v3'"]),
    ({"version": 999}, grpc.StatusCode.INVALID_ARGUMENT, ["behavior_version", "999"]),
    ({"steps": 2000}, grpc.StatusCode.RESOURCE_EXHAUSTED, ["message_size", "max_message_bytes"]),
])
def test_bad_chunk_gets_clear_error_and_is_counted(learner, kwargs, code, words):
    ch, stub = _stub(learner)
    with pytest.raises(grpc.RpcError) as info:
        _send(stub, _chunk(**kwargs))
    assert info.value.code() == code
    for w in words:
        assert w in info.value.details(), info.value.details()
    text = _metrics_text(learner)
    assert "fleetloop_learner_rejected_chunks_total" in text
    ch.close()


def _metrics_text(impl) -> str:
    from prometheus_client import generate_latest
    return generate_latest(impl.core.metrics.registry).decode()


def test_garbage_bytes_and_missing_token(learner):
    ch = grpc.insecure_channel(f"127.0.0.1:{learner.port}")
    raw = ch.stream_stream("/fleetloop.v1.Learner/StreamExperience", request_serializer=lambda b: b,
                           response_deserializer=pb.Ack.FromString)
    with pytest.raises(grpc.RpcError) as info:
        list(raw(iter([b"\xff\xff\xff\xff not a protobuf"]), metadata=MD, timeout=10))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "EpisodeChunk" in info.value.details()
    stub = pb_grpc.LearnerStub(ch)
    with pytest.raises(grpc.RpcError) as info:
        _send(stub, _chunk(), md=(("authorization", "Bearer wrong"),))
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED and "wrong" not in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        list(stub.FetchWeights(pb.FetchRequest(job_id="demo", version=0), timeout=10))
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    ch.close()


def test_handshake_refusals(learner):
    ch, stub = _stub(learner)
    obs, act = robot_specs()
    good = dict(protocol_version=PROTOCOL_VERSION, job_id="demo", actor_id="r", kind=pb.ROBOT, observation_specs=obs,
                action_specs=act, tasks=TASKS)
    assert stub.Handshake(pb.HandshakeRequest(**good), metadata=MD, timeout=10).run_config.task_ids == TASKS
    cases = [
        ({"protocol_version": 99}, grpc.StatusCode.FAILED_PRECONDITION, "protocol_version 99"),
        ({"job_id": "other"}, grpc.StatusCode.NOT_FOUND, "'other'"),
        ({"observation_specs": [make_spec("state", "float32", [40])]}, grpc.StatusCode.FAILED_PRECONDITION, "[40]"),
        ({"tasks": ["fly-v3"]}, grpc.StatusCode.INVALID_ARGUMENT, "fly-v3"),
        ({"kind": pb.LLM}, grpc.StatusCode.FAILED_PRECONDITION, "LLM"),
    ]
    for change, code, word in cases:
        with pytest.raises(grpc.RpcError) as info:
            stub.Handshake(pb.HandshakeRequest(**{**good, **change}), metadata=MD, timeout=10)
        assert info.value.code() == code and word in info.value.details(), (change, info.value.details())
    with pytest.raises(grpc.RpcError) as info:
        stub.Handshake(pb.HandshakeRequest(**good), timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    ch.close()


def test_handshake_names_the_tensor_that_differs(tmp_path):
    """A pixel job refuses a robot whose camera (or action bounds) differ, naming that tensor (issue 19, item 1)."""
    from fleetloop.presets import metaworld_specs
    obs, act = metaworld_specs("pixels", image_size=16)
    cfg = LearnerConfig(state_dir=tmp_path / "learner", tasks=TASKS, robot_tokens=["tok"], observation_specs=obs,
                        action_specs=act)
    impl = build_learner(cfg.model_dump_json()).serve()
    try:
        ch, stub = _stub(impl)
        good = dict(protocol_version=PROTOCOL_VERSION, job_id="demo", actor_id="cam-robot", kind=pb.ROBOT, tasks=TASKS,
                    observation_specs=[make_spec(**s) for s in reversed(obs)], action_specs=[make_spec(**s) for s in act])
        assert stub.Handshake(pb.HandshakeRequest(**good), metadata=MD, timeout=10).session_id  # order-free
        big = [make_spec(**s) for s in metaworld_specs("pixels", cameras=("corner3",), image_size=16)[0]]
        big[1] = make_spec("corner3", "uint8", [32, 32, 3])
        big.append(make_spec(**obs[2]))
        wide = [make_spec("action", "float32", [4], [-2.0] * 4, [2.0] * 4)]
        for change, words in (({"observation_specs": big}, ["observation_specs[corner3]", "[32, 32, 3]", "[16, 16, 3]",
                                                            "proprio:FLOAT32[8], corner3:UINT8[32, 32, 3]"]),
                              ({"action_specs": wide}, ["action_specs[action]", "bounds", "-2.0"])):
            with pytest.raises(grpc.RpcError) as info:
                stub.Handshake(pb.HandshakeRequest(**{**good, **change}), metadata=MD, timeout=10)
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION, info.value.details()
            for w in words:
                assert w in info.value.details(), (w, info.value.details())
        text = _metrics_text(impl)
        assert 'reason="failed_precondition:observation_specs"' in text and 'reason="failed_precondition:action_specs"' in text
        ch.close()
    finally:
        impl.stop()


def test_bad_chunk_does_not_disturb_other_actor(learner, tmp_path):
    robot = RobotThread(f"127.0.0.1:{learner.port}", "good-robot", TASKS, tmp_path / "spool", "tok", episodes=6, seed=5)
    robot.start()
    deadline = time.monotonic() + 60
    while robot.client.sender.acked < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    before = robot.client.sender.acked
    ch, stub = _stub(learner)
    with pytest.raises(grpc.RpcError) as info:
        _send(stub, _chunk(obs_shape=(7,)))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    robot.join(90)
    assert robot.error is None
    assert robot.client.flush(30)
    assert robot.client.sender.acked > before and robot.client.sender.rejected == 0
    assert learner.core.audit()["stored_steps"]["reach-v3"] == robot.stats.steps
    robot.client.close(flush_timeout=0)
    ch.close()


def test_actor_rejects_poison_chunk_and_keeps_going(learner, tmp_path):
    """A chunk the learner refuses as invalid moves to the spool's rejected/ folder; the rest flows."""
    robot = RobotThread(f"127.0.0.1:{learner.port}", "r2", TASKS, tmp_path / "spool2", "tok", episodes=2, seed=6)
    robot.client.connect()
    bad = _chunk(obs_shape=(7,), episode="poison")
    robot.client.spool.put("poison", 0, bad.SerializeToString())
    robot.start()  # connect() again inside is harmless: it reuses the channel
    robot.join(90)
    assert robot.client.flush(30)
    assert robot.client.sender.rejected == 1
    assert list((tmp_path / "spool2" / "rejected").glob("*.chunk"))
    robot.client.close(flush_timeout=0)
