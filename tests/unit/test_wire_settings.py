"""fleetloop.wire_settings: typed settings read back equal to their JSON twins; readers prefer the typed
field and fall back to the string (a learner before the typed fields); bad values name their path."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetloop import wire_settings as ws
from fleetloop.errors import InvalidArgument
from fleetloop.v1 import fleetloop_pb2 as pb

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(ws.INT64_MIN, ws.INT64_MAX) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12)


def _same(a, b) -> bool:
    """Equal, with int and float kept apart (1 != 1.0 here, as it is for a policy factory's kwargs)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(max_size=8), json_values, max_size=6))
def test_plugin_args_round_trip_equals_json_round_trip(kwargs):
    rc = ws.run_config(task_ids=["t"], policy_factory="m:f", policy_kwargs=kwargs)
    typed = ws.policy_kwargs(pb.RunConfig.FromString(rc.SerializeToString()))
    assert _same(typed, kwargs)
    assert _same(typed, json.loads(rc.policy_kwargs_json))


def test_int_and_float_stay_apart():
    args = ws.from_args(ws.to_args({"hidden": 256, "lr": 1.0, "flag": True, "layers": [64, 64.0], "none": None}))
    assert _same(args, {"hidden": 256, "lr": 1.0, "flag": True, "layers": [64, 64.0], "none": None})


def test_bad_values_name_their_path():
    with pytest.raises(InvalidArgument) as e:
        ws.to_args({"layers": [1, 2, object()]}, "policy_kwargs")
    assert e.value.field == "policy_kwargs.layers[2]"
    with pytest.raises(InvalidArgument) as e:
        ws.to_args({"big": 2 ** 64})
    assert e.value.field == "kwargs.big"


def test_recap_inference_settings_typed_equal_json():
    recap = {"guidance_beta": 1.5, "eval_guidance_beta": 1.0, "indicator": "positive"}
    for settings_ in (recap, {}, {"guidance_beta": 2, "custom_knob": [1, "a"]}):
        rc = pb.RunConfig.FromString(ws.run_config(task_ids=["t"], inference=settings_).SerializeToString())
        assert rc.HasField("inference")
        assert ws.inference(rc) == json.loads(rc.inference_json) == settings_


def test_llm_rollout_settings_typed_equal_json():
    from learner.llm.config import LlmLearnerConfig, LlmTaskSpec

    cfg = LlmLearnerConfig(tasks=[LlmTaskSpec(name="arith", params={"digits": 2, "ops": ["+", "-"]}),
                                  LlmTaskSpec(name="reverse", weight=2.0)], eta=3)
    settings_ = {**cfg.rollout_settings(), "vocab_size": 512}
    rc = pb.RunConfig.FromString(ws.run_config(task_ids=cfg.task_ids, llm=settings_).SerializeToString())
    assert _same(ws.rollout_settings(rc), json.loads(rc.llm_json))
    assert ws.rollout_settings(rc)["eta"] == ws.rollout_settings(rc)["max_staleness"] == 3
    with pytest.raises(InvalidArgument) as e:
        ws.rollout_message({**settings_, "new_knob": 1})
    assert e.value.field == "llm.new_knob"


def test_readers_fall_back_to_the_strings_of_an_older_learner():
    old = pb.RunConfig(policy_kwargs_json='{"hidden": 64}', inference_json='{"guidance_beta": 1.0}',
                       llm_json='{"model": "tiny"}')
    assert ws.policy_kwargs(old) == {"hidden": 64}
    assert ws.inference(old) == {"guidance_beta": 1.0}
    assert ws.rollout_settings(old) == {"model": "tiny"}
    assert ws.policy_kwargs(pb.RunConfig()) == {} and ws.inference(pb.RunConfig()) == {}
    assert ws.rollout_settings(pb.RunConfig()) is None


def test_job_state_and_finish_reason_both_forms():
    for state in ("running", "paused", "stopping"):
        ann = pb.WeightAnnouncement(version=1, **ws.job_state_fields(state))
        assert ann.job_state == state and ws.job_state(ann) == state
        assert ws.job_state(pb.WeightAnnouncement(job_state=state)) == state  # an older learner: string only
    assert ws.job_state(pb.WeightAnnouncement()) == "running"
    with pytest.raises(InvalidArgument) as e:
        ws.job_state_fields("exploded")
    assert e.value.field == "job_state" and e.value.value == "exploded"
    for reason, enum in (("stop", pb.FINISH_REASON_STOP), ("length", pb.FINISH_REASON_LENGTH), ("abort", 0), ("", 0)):
        c = pb.Completion(**ws.finish_fields(reason))
        assert c.finish == enum and ws.finish_reason(c) == reason
    assert ws.finish_reason(pb.Completion(finish_reason="length")) == "length"
