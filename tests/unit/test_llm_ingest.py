"""LLM ingest: every malformed CompletionGroup is refused with an error naming the field (with its
index) and the value; a good group converts to build_token_batch's format; resends are stored once.
Also the LLM learner config's shared-validator rules. Pure: no model, no network."""

from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from fleetloop.errors import InvalidArgument, NotFound
from fleetloop.v1 import fleetloop_pb2 as pb
from learner.llm.config import LlmLearnerConfig
from learner.llm.ingest import GroupIngestor, ValidatedGroup, reason_of, validate_group

LIMITS = dict(job_id="job", task_ids=frozenset({"arith", "sort"}), group_size=4, vocab_size=100, max_new_tokens=8,
              max_prompt_tokens=16)


def make_chunk(g: int = 4, version: int = 2, **over) -> pb.EpisodeChunk:
    comps = [pb.Completion(token_ids=[10 + i, 11, 12], logprobs=[-0.5, -1.0, -0.25], reward=float(i % 2),
                           policy_version=version - (i == 3), text=f"c{i}", finish_reason="stop",
                           verifier_error=(i == 2)) for i in range(g)]
    group = pb.CompletionGroup(prompt_id="p1", prompt_text="1+1?", prompt_token_ids=[1, 2, 3], completions=comps,
                               ticket_id="t1", admitted_version=version, task_id="arith")
    chunk = pb.EpisodeChunk(job_id="job", actor_id="llm-1", episode_id="llm-1-g0", seq=0, task_id="arith",
                            behavior_version=version - 1, group=group, end=pb.EpisodeEnd(outcome=pb.SUCCESS))
    for path, value in over.items():
        _assign(chunk, path, value)
    return chunk


def _assign(msg, path: str, value) -> None:
    """Set ``path`` (dots, ``name[i]`` indices) on ``msg``; repeated fields get a whole new list."""
    parts = path.split(".")
    for part in parts[:-1]:
        name, _, idx = part.partition("[")
        msg = getattr(msg, name)
        if idx:
            msg = msg[int(idx[:-1])]
    leaf = parts[-1]
    field = getattr(msg, leaf)
    if hasattr(field, "extend") and not isinstance(field, (str, bytes)):
        del field[:]
        field.extend(value)
    else:
        setattr(msg, leaf, value)


def check(chunk, field: str, value_text: str | None = None, cls=InvalidArgument, learner_version: int = 2):
    with pytest.raises(cls) as info:
        validate_group(chunk, learner_version=learner_version, **LIMITS)
    assert info.value.field == field, (info.value.field, str(info.value))
    assert field in str(info.value)
    if value_text is not None:
        assert value_text in str(info.value), str(info.value)
    return info.value


def test_good_group_converts_to_token_batch_format():
    vg = validate_group(make_chunk(), learner_version=2, **LIMITS)
    assert isinstance(vg, ValidatedGroup)
    assert (vg.actor_id, vg.episode_id, vg.task_id, vg.prompt_id, vg.ticket_id, vg.admitted_version) == \
        ("llm-1", "llm-1-g0", "arith", "p1", "t1", 2)
    assert vg.group["prompt_token_ids"] == [1, 2, 3]
    comps = vg.group["completions"]
    assert len(comps) == 4
    assert comps[0] == {"token_ids": [10, 11, 12], "logprobs": [-0.5, -1.0, -0.25], "reward": 0.0, "policy_version": 2}
    assert [c["policy_version"] for c in comps] == [2, 2, 2, 1]
    assert (vg.min_version, vg.max_version, vg.verifier_errors, vg.tokens) == (1, 2, 1, 12)
    assert vg.rewards == [0.0, 1.0, 0.0, 1.0]
    assert set(vg.group) == {"prompt_token_ids", "completions"}


def test_good_group_feeds_build_token_batch():
    torch = pytest.importorskip("torch")
    from learner.llm.grpo import build_token_batch
    vg = validate_group(make_chunk(), learner_version=2, **LIMITS)
    batch = build_token_batch([vg.group], pad_id=0, device="cpu", vocab_size=LIMITS["vocab_size"])
    assert tuple(batch.input_ids.shape) == (4, 6)
    assert batch.input_ids[1].tolist() == [1, 2, 3, 11, 11, 12]
    assert batch.completion_mask[0].tolist() == [False, False, False, True, True, True]
    assert torch.allclose(batch.behaviour_logprobs[0, 3:], torch.tensor([-0.5, -1.0, -0.25]))
    assert batch.versions.tolist() == [2, 2, 2, 1]


def test_task_id_from_group_or_chunk():
    chunk = make_chunk()
    chunk.group.task_id = ""
    assert validate_group(chunk, learner_version=2, **LIMITS).task_id == "arith"
    chunk = make_chunk()
    chunk.task_id = ""
    assert validate_group(chunk, learner_version=2, **LIMITS).task_id == "arith"


def test_tiny_positive_logprob_is_rounding_and_clamped():
    chunk = make_chunk()
    chunk.group.completions[0].logprobs[1] = 5e-4
    vg = validate_group(chunk, learner_version=2, **LIMITS)
    assert vg.group["completions"][0]["logprobs"][1] == 0.0


# -- refusals, one per field ------------------------------------------------------------------
def test_wrong_job_is_not_found():
    check(make_chunk(**{"job_id": "other"}), "job_id", "'other'", cls=NotFound)


@pytest.mark.parametrize("path, value, field, text", [
    ("actor_id", "", "actor_id", "''"),
    ("episode_id", "x" * 129, "episode_id", "1..128"),
    ("seq", 3, "seq", "3"),
    ("task_id", "fly", "task_id", "'fly'"),
    ("group.task_id", "fly", "group.task_id", "'fly'"),
    ("behavior_version", 9, "behavior_version", "9"),
    ("group.admitted_version", 7, "group.admitted_version", "7"),
    ("group.prompt_token_ids", [], "group.prompt_token_ids", "empty"),
    ("group.prompt_token_ids", [1, 100, 2], "group.prompt_token_ids[1]", "100"),
    ("group.prompt_token_ids", list(range(17)), "group.prompt_token_ids", "17"),
    ("group.completions[2].token_ids", [], "group.completions[2].token_ids", "empty"),
    ("group.completions[1].token_ids", [5, 6, 100], "group.completions[1].token_ids[2]", "100"),
    ("group.completions[1].token_ids", [5, 6, 4000], "group.completions[1].token_ids[2]", "4000"),
    ("group.completions[0].token_ids", list(range(9)), "group.completions[0].token_ids", "9 tokens"),
    ("group.completions[3].logprobs", [-0.5, -1.0], "group.completions[3].logprobs", "2 values for 3"),
    ("group.completions[3].logprobs", [-0.5, -1.0, -1.0, -1.0], "group.completions[3].logprobs", "4 values for 3"),
    ("group.completions[1].logprobs", [-0.5, float("nan"), -1.0], "group.completions[1].logprobs[1]", "nan"),
    ("group.completions[1].logprobs", [-0.5, -1.0, float("-inf")], "group.completions[1].logprobs[2]", "-inf"),
    ("group.completions[0].logprobs", [0.5, -1.0, -1.0], "group.completions[0].logprobs[0]", "0.5"),
    ("group.completions[2].reward", float("nan"), "group.completions[2].reward", "nan"),
    ("group.completions[2].reward", float("inf"), "group.completions[2].reward", "inf"),
    ("group.completions[0].policy_version", 3, "group.completions[0].policy_version", "3"),
    ("group.ticket_id", "t" * 200, "group.ticket_id", "128"),
])
def test_bad_field_is_refused_naming_it(path, value, field, text):
    chunk = make_chunk()
    _assign(chunk, path, value)
    err = check(chunk, field, text)
    assert err.value is not None or field.endswith("_ids")


@pytest.mark.parametrize("g", [3, 5, 0])
def test_wrong_group_size(g):
    err = check(make_chunk(g=g), "group.completions", f"has {g} completions")
    assert err.value == g and "group_size is 4" in str(err)


def test_task_ids_must_agree():
    chunk = make_chunk()
    chunk.group.task_id = "sort"
    check(chunk, "group.task_id", "'sort'")


def test_chunk_without_group_is_refused():
    chunk = make_chunk()
    chunk.ClearField("group")
    check(chunk, "group", "CompletionGroup")


def test_step_tensors_must_be_empty():
    chunk = make_chunk()
    chunk.observations["state"].shape.append(1)
    check(chunk, "observations")
    chunk = make_chunk()
    chunk.rewards.shape.append(2)
    check(chunk, "rewards")


def test_reason_strips_indices():
    chunk = make_chunk()
    chunk.group.completions[3].logprobs[1] = math.nan
    with pytest.raises(InvalidArgument) as info:
        validate_group(chunk, learner_version=2, **LIMITS)
    assert reason_of(info.value) == "group.completions.logprobs"


# -- exactly once ------------------------------------------------------------------------------
def test_ingestor_stores_once_and_counts_refusals_by_field():
    got: list[ValidatedGroup] = []
    ing = GroupIngestor(LIMITS, got.append)
    chunk = make_chunk()
    assert ing.ingest(chunk, chunk.ByteSize(), 2) is False
    assert ing.ingest(chunk, chunk.ByteSize(), 2) is True  # resend: acknowledged, not stored
    assert len(got) == 1 and (ing.stored, ing.duplicates) == (1, 1)
    bad = make_chunk()
    bad.episode_id = "other"
    bad.group.completions[1].reward = math.inf
    with pytest.raises(InvalidArgument):
        ing.ingest(bad, bad.ByteSize(), 2)
    bad.group.completions[1].reward = 1.0
    bad.group.completions[0].token_ids[0] = 1000
    with pytest.raises(InvalidArgument):
        ing.ingest(bad, bad.ByteSize(), 2)
    assert ing.rejected == {"group.completions.reward": 1, "group.completions.token_ids": 1}
    bad.group.completions[0].token_ids[0] = 10  # fixed, the same episode is stored (refusals store nothing)
    assert ing.ingest(bad, bad.ByteSize(), 2) is False and len(got) == 2


# -- config ------------------------------------------------------------------------------------
def test_config_shorthand_and_shared_fields():
    cfg = LlmLearnerConfig(tasks="arith")
    assert cfg.task_ids == ["arith"] and cfg.kind == "llm"
    cfg = LlmLearnerConfig(tasks=[{"name": "arith", "id": "add", "params": {"digits": 1}}, "sort"], max_streams=4,
                           max_subscriptions=4, grpc_workers=16)
    assert cfg.task_ids == ["add", "sort"] and (cfg.serving.stream_cap, cfg.serving.subscription_cap) == (4, 4)
    assert cfg.grpo_params() == {"temperature": 1.0, "max_staleness": 1}
    assert LlmLearnerConfig.model_fields["serving"].annotation.model_fields["port"].description == \
        __import__("learner.config").config.LearnerConfig.model_fields["serving"].annotation.model_fields["port"].description
    settings = cfg.rollout_settings()
    assert {"model", "model_seed", "tasks", "group_size", "max_new_tokens", "temperature", "top_p", "eta",
            "ticket_ttl_s"} <= set(settings)


@pytest.mark.parametrize("kwargs, words", [
    ({"tasks": ["arith", "arith"]}, "unique"),
    ({"max_backoff_ms": 70_000}, "stream_idle_timeout_s"),              # LearnerConfig's rule, shared
    ({"max_streams": 100, "max_subscriptions": 40}, "grpc_workers"),    # LearnerConfig's rule, shared
    ({"algorithm_params": {"temperature": 0.5}}, "algorithm_params.temperature"),
    ({"algorithm_params": {"max_staleness": 3}}, "eta"),
    ({"group_size": 1}, "group_size"),
    ({"bogus": 1}, "bogus"),
])
def test_config_refusals(kwargs, words):
    with pytest.raises(ValidationError) as info:
        LlmLearnerConfig(**kwargs)
    assert words in str(info.value)
