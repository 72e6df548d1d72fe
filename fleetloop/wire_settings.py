"""Typed wire settings: the proto's typed settings messages and enums, both ways, for both sides.

Protocol 2 first carried settings as JSON strings (``RunConfig.policy_kwargs_json``,
``inference_json``, ``llm_json``) and states as free strings (``WeightAnnouncement.job_state``,
``Completion.finish_reason``). The typed twins (``RunConfig.policy_kwargs/inference/llm``,
``WeightAnnouncement.state``, ``Completion.finish``) were added without a version bump. The rules
this module implements:

- writers fill both forms (:func:`run_config`, :func:`job_state_fields`, :func:`finish_fields`), so
  an actor that predates the typed fields reads the strings as before;
- readers take the typed field when it is present and fall back to the string
  (:func:`policy_kwargs`, :func:`inference`, :func:`rollout_settings`, :func:`job_state`,
  :func:`finish_reason`), so a new actor still works with a learner that predates them;
- for every value a writer accepts, typed and JSON forms read back equal (ints stay ints, floats
  floats: :class:`PluginArgs` keeps the difference ``google.protobuf.Struct`` would lose).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from fleetloop.errors import InvalidArgument
from fleetloop.v1 import fleetloop_pb2 as pb

INT64_MIN, INT64_MAX = -(2 ** 63), 2 ** 63 - 1

#: JobState names as the JSON/strings carry them <-> the enum.
JOB_STATES: dict[str, int] = {"running": pb.JOB_STATE_RUNNING, "paused": pb.JOB_STATE_PAUSED,
                              "stopping": pb.JOB_STATE_STOPPING}
#: Completion finish reasons (vLLM's words) <-> the enum.
FINISH_REASONS: dict[str, int] = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH}
_STATE_NAMES = {v: k for k, v in JOB_STATES.items()}
_FINISH_NAMES = {v: k for k, v in FINISH_REASONS.items()}

_INFERENCE_FLOATS = ("guidance_beta", "eval_guidance_beta")


# -- plug-in arguments --------------------------------------------------------------------------
def _value(v: Any, path: str) -> pb.ArgValue:
    if v is None:
        return pb.ArgValue()
    if isinstance(v, bool):  # before int: bool is an int subclass
        return pb.ArgValue(bool_value=v)
    if isinstance(v, int):
        if not INT64_MIN <= v <= INT64_MAX:
            raise InvalidArgument(f"{path} = {v} does not fit a signed 64-bit integer", field=path, value=v)
        return pb.ArgValue(int_value=v)
    if isinstance(v, float):
        return pb.ArgValue(float_value=v)
    if isinstance(v, str):
        return pb.ArgValue(string_value=v)
    if isinstance(v, Mapping):
        return pb.ArgValue(map_value=to_args(v, path))
    if isinstance(v, Sequence):
        return pb.ArgValue(list_value=pb.ArgList(items=[_value(x, f"{path}[{i}]") for i, x in enumerate(v)]))
    raise InvalidArgument(f"{path} has type {type(v).__name__}: only JSON-like values (None, bool, int, float, str, "
                          f"list, dict) travel as plug-in arguments", field=path, value=repr(v)[:80])


def to_args(values: Mapping[str, Any], path: str = "kwargs") -> pb.PluginArgs:
    """``values`` (JSON-like, string keys) as :class:`PluginArgs`; a value that is not JSON-like, or an
    int beyond int64, raises InvalidArgument naming its path (``kwargs.layers[2]``)."""
    out = pb.PluginArgs()
    for k, v in values.items():
        if not isinstance(k, str):
            raise InvalidArgument(f"{path} has a non-string key {k!r}", field=path, value=repr(k))
        out.values[k].CopyFrom(_value(v, f"{path}.{k}"))
    return out


def _plain(v: pb.ArgValue) -> Any:
    kind = v.WhichOneof("kind")
    if kind is None:
        return None
    if kind == "list_value":
        return [_plain(x) for x in v.list_value.items]
    if kind == "map_value":
        return from_args(v.map_value)
    return getattr(v, kind)


def from_args(args: pb.PluginArgs) -> dict[str, Any]:
    """The plain dict of :class:`PluginArgs` (inverse of :func:`to_args`)."""
    return {k: _plain(v) for k, v in args.values.items()}


# -- inference settings ---------------------------------------------------------------------------
def inference_message(settings: Mapping[str, Any]) -> pb.InferenceSettings:
    """An algorithm's inference settings dict (e.g. RECAP's ``guidance_beta``, ``eval_guidance_beta``,
    ``indicator``) as :class:`InferenceSettings`; keys it has no field for go to ``extra``."""
    msg = pb.InferenceSettings()
    extra = {}
    for k, v in settings.items():
        if k in _INFERENCE_FLOATS and isinstance(v, (int, float)) and not isinstance(v, bool):
            setattr(msg, k, float(v))
        elif k == "indicator" and isinstance(v, str):
            msg.indicator = v
        else:
            extra[k] = v
    if extra:
        msg.extra.CopyFrom(to_args(extra, "inference"))
    return msg


def inference_dict(msg: pb.InferenceSettings) -> dict[str, Any]:
    """The dict of :class:`InferenceSettings`: only the fields that are set (inverse of :func:`inference_message`)."""
    out: dict[str, Any] = {k: getattr(msg, k) for k in _INFERENCE_FLOATS if msg.HasField(k)}
    if msg.indicator:
        out["indicator"] = msg.indicator
    out.update(from_args(msg.extra))
    return out


# -- LLM rollout settings -------------------------------------------------------------------------
_ROLLOUT_SCALARS = ("model", "model_seed", "group_size", "max_new_tokens", "temperature", "top_p", "max_staleness",
                    "ticket_ttl_s", "batch_groups", "max_prompt_tokens", "algorithm", "vocab_size")


def rollout_message(settings: Mapping[str, Any]) -> pb.LlmRolloutSettings:
    """The learner's rollout settings dict (``LlmLearnerCore.rollout_settings()``) as
    :class:`LlmRolloutSettings`. ``eta`` is ``max_staleness`` under its config name; a key the message
    has no field for is refused (InvalidArgument naming it), so nothing is silently lost on the wire."""
    known = set(_ROLLOUT_SCALARS) | {"tasks", "eta"}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise InvalidArgument(f"rollout setting {unknown[0]!r} has no field in LlmRolloutSettings",
                              field=f"llm.{unknown[0]}", value=settings[unknown[0]])
    msg = pb.LlmRolloutSettings(**{k: settings[k] for k in _ROLLOUT_SCALARS if k in settings})
    if "eta" in settings and "max_staleness" not in settings:
        msg.max_staleness = settings["eta"]
    for i, t in enumerate(settings.get("tasks", [])):
        msg.tasks.add(id=t["id"], name=t["name"], params=to_args(t.get("params", {}), f"llm.tasks[{i}].params"),
                      weight=float(t.get("weight", 1.0)))
    return msg


def rollout_dict(msg: pb.LlmRolloutSettings) -> dict[str, Any]:
    """The dict an LLM actor has always read from ``llm_json`` (``eta`` and ``max_staleness`` both)."""
    out: dict[str, Any] = {k: getattr(msg, k) for k in _ROLLOUT_SCALARS}
    out["eta"] = msg.max_staleness
    out["tasks"] = [{"id": t.id, "name": t.name, "params": from_args(t.params), "weight": t.weight} for t in msg.tasks]
    return out


# -- RunConfig, written and read ------------------------------------------------------------------
def run_config(*, task_ids: Sequence[str], policy_factory: str = "", policy_kwargs: Mapping[str, Any] | None = None,
               chunk_steps: int = 0, max_episode_steps: int = 0, max_message_bytes: int = 0, algorithm: str = "",
               inference: Mapping[str, Any] | None = None, llm: Mapping[str, Any] | None = None,
               max_chunk_wait_s: float = 0.0) -> pb.RunConfig:
    """A RunConfig with both forms of every setting: the typed fields and the JSON strings older actors
    read. ``llm`` only for LLM jobs; ``policy_kwargs`` only for robot jobs."""
    rc = pb.RunConfig(policy_factory=policy_factory, task_ids=list(task_ids), chunk_steps=chunk_steps,
                      max_episode_steps=max_episode_steps, max_message_bytes=max_message_bytes, algorithm=algorithm,
                      max_chunk_wait_s=max_chunk_wait_s, inference_json=json.dumps(dict(inference or {})))
    rc.inference.CopyFrom(inference_message(inference or {}))
    if policy_kwargs is not None:
        rc.policy_kwargs_json = json.dumps(dict(policy_kwargs))
        rc.policy_kwargs.CopyFrom(to_args(policy_kwargs, "policy_kwargs"))
    if llm is not None:
        rc.llm_json = json.dumps(dict(llm))
        rc.llm.CopyFrom(rollout_message(llm))
    return rc


def policy_kwargs(rc: pb.RunConfig) -> dict[str, Any]:
    """The policy factory's keyword arguments: typed when present, else ``policy_kwargs_json``."""
    return from_args(rc.policy_kwargs) if rc.HasField("policy_kwargs") else json.loads(rc.policy_kwargs_json or "{}")


def inference(rc: pb.RunConfig) -> dict[str, Any]:
    """The algorithm's inference settings: typed when present, else ``inference_json``."""
    return inference_dict(rc.inference) if rc.HasField("inference") else json.loads(rc.inference_json or "{}")


def rollout_settings(rc: pb.RunConfig) -> dict[str, Any] | None:
    """The LLM rollout settings: typed when present, else ``llm_json``; None when the job is not an LLM job."""
    if rc.HasField("llm"):
        return rollout_dict(rc.llm)
    return json.loads(rc.llm_json) if rc.llm_json else None


# -- states ---------------------------------------------------------------------------------------
def job_state_fields(state: str) -> dict[str, Any]:
    """Both announcement fields for ``state`` ("running", "paused", "stopping"): ``job_state`` and
    ``state``. An unknown state raises InvalidArgument naming it."""
    state = str(state)  # a JobState (StrEnum) is its value
    if state not in JOB_STATES:
        raise InvalidArgument(f"job state {state!r} is not one of {sorted(JOB_STATES)}", field="job_state", value=state)
    return {"job_state": state, "state": JOB_STATES[state]}


def job_state(ann: pb.WeightAnnouncement) -> str:
    """The announced job state: the enum when set, else the string ("" = running: learners before it)."""
    if ann.state != pb.JOB_STATE_UNSPECIFIED:
        return _STATE_NAMES.get(ann.state, "running")
    return ann.job_state or "running"


def finish_fields(reason: str | None) -> dict[str, Any]:
    """Both completion fields for an engine's finish reason ("stop", "length", or anything else, kept
    as a string with the enum unspecified)."""
    reason = reason or ""
    return {"finish_reason": reason, "finish": FINISH_REASONS.get(reason, pb.FINISH_REASON_UNSPECIFIED)}


def finish_reason(c: pb.Completion) -> str:
    """A completion's finish reason: the enum when set, else the string."""
    if c.finish != pb.FINISH_REASON_UNSPECIFIED:
        return _FINISH_NAMES.get(c.finish, c.finish_reason)  # an enum value newer than this reader: the string
    return c.finish_reason

