"""Hypothesis strategies: valid robot EpisodeChunks and HandshakeRequests, and mutations of them.

A mutation is applied in place to a protobuf message and described in one short string (kept in
failure reports and fuzz.json), e.g. ``observations[state].shape=[0, 100000000000000000000]``.
Valid chunks are built as in ``tests/helpers/chunks.py`` (39-dim float32 state, 4-dim float32
action, float32 rewards, bool interventions).
"""

from __future__ import annotations

import math
import struct

import numpy as np
from hypothesis import strategies as st

from fleetloop.codec import encode, make_spec
from fleetloop.v1 import fleetloop_pb2 as pb

JOB = "demo"
TASKS = ["reach-v3"]
TOKEN = "tok"
OBS_DIM, ACT_DIM = 39, 4
TENSORS = ["rewards", "interventions", "dones", "observations[state]", "actions[action]"]
U64 = 2**64 - 1

# text without lone surrogates (protobuf strings must be valid UTF-8)
text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40)
ascii_token = st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), min_size=0, max_size=30)


def robot_specs() -> tuple[list, list]:
    """The job's specs (same as actor.main.robot_specs, without importing the actor)."""
    return [make_spec("state", "float32", [OBS_DIM])], [make_spec("action", "float32", [ACT_DIM], [-1] * ACT_DIM, [1] * ACT_DIM)]


def valid_chunk(episode: str, steps: int, seq: int = 0, version: int = 0, end: int | None = None,
                actor: str = "fuzz-actor") -> pb.EpisodeChunk:
    """A chunk the job accepts: ``steps`` steps of random finite data, the first third by the operator."""
    rng = np.random.default_rng(steps * 1000 + seq)
    c = pb.EpisodeChunk(job_id=JOB, actor_id=actor, episode_id=episode, seq=seq, task_id=TASKS[0],
                        behavior_version=version, first_step=seq * 20)
    encode(rng.normal(size=(steps, OBS_DIM)).astype(np.float32), c.observations["state"])
    encode(rng.uniform(-1, 1, size=(steps, ACT_DIM)).astype(np.float32), c.actions["action"])
    encode(rng.normal(size=steps).astype(np.float32), c.rewards)
    encode(np.arange(steps) < steps // 3, c.interventions)
    if end is not None:
        c.end.outcome = end
    return c


def tensor_of(chunk: pb.EpisodeChunk, name: str) -> pb.Tensor:
    """The Tensor message called ``name`` (``observations[state]`` style for map entries; created if absent)."""
    if "[" in name:
        field, key = name[:-1].split("[")
        return getattr(chunk, field)[key]
    return getattr(chunk, name)


def _flip_nonfinite(t: pb.Tensor, index: int, value: float) -> str:
    """Overwrite element ``index`` of a float tensor's data with ``value`` (NaN / inf)."""
    fmt = {1: "<f", 2: "<e", 4: "<d"}.get(int(t.dtype))
    if fmt is None or not t.data:
        return "nonfinite(skipped: not float)"
    size = struct.calcsize(fmt)
    n = len(t.data) // size
    i = index % max(n, 1)
    data = bytearray(t.data)
    data[i * size:(i + 1) * size] = struct.pack(fmt, value)
    t.data = bytes(data)
    return f"element {i}={value}"


@st.composite
def tensor_mutation(draw, chunk: pb.EpisodeChunk) -> str:
    """Mutate one tensor of ``chunk``: dtype, shape (huge, negative, many dims, empty), bytes, NaN/inf."""
    name = draw(st.sampled_from(TENSORS))
    t = tensor_of(chunk, name)
    kind = draw(st.sampled_from(["dtype", "shape", "huge_shape", "zero_huge", "many_dims", "negative", "data_len",
                                 "data_random", "nonfinite", "clear"]))
    if kind == "dtype":
        t.dtype = draw(st.one_of(st.integers(0, 9), st.integers(-2**31, 2**31 - 1)))
        desc = f"dtype={t.dtype}"
    elif kind == "shape":
        del t.shape[:]
        t.shape.extend(draw(st.lists(st.integers(0, 64), max_size=4)))
        desc = f"shape={list(t.shape)}"
    elif kind == "huge_shape":
        del t.shape[:]
        t.shape.extend(draw(st.lists(st.sampled_from([10**6, 10**12, 2**31, 2**62, 2**63 - 1]), min_size=1, max_size=3)))
        desc = f"shape={list(t.shape)}"
    elif kind == "zero_huge":  # zero elements, absurd layout: must be refused before numpy sees it
        del t.shape[:]
        t.shape.extend([0, *draw(st.lists(st.sampled_from([10**12, 2**40, 2**62, 2**63 - 1]), min_size=1, max_size=4))])
        t.data = b""
        desc = f"shape={list(t.shape)} data=b''"
    elif kind == "many_dims":
        del t.shape[:]
        t.shape.extend([1] * draw(st.integers(17, 200)))
        desc = f"shape=[1]*{len(t.shape)}"
    elif kind == "negative":
        t.shape.append(draw(st.integers(-2**63, -1)))
        desc = f"shape={list(t.shape)}"
    elif kind == "data_len":
        cut = draw(st.integers(-64, 64))
        t.data = t.data[:cut] if cut < 0 else t.data + bytes(cut)
        desc = f"data {cut:+d} bytes"
    elif kind == "data_random":
        t.data = draw(st.binary(max_size=256))
        desc = f"data={len(t.data)} random bytes"
    elif kind == "nonfinite":
        desc = _flip_nonfinite(t, draw(st.integers(0, 10**6)), draw(st.sampled_from([math.nan, math.inf, -math.inf])))
    else:
        t.Clear()
        desc = "cleared"
    return f"{name}.{desc}"


@st.composite
def scalar_mutation(draw, chunk: pb.EpisodeChunk) -> str:
    """Mutate one scalar or map field of ``chunk``: ids, task, versions, seq, outcome, time, map keys."""
    kind = draw(st.sampled_from(["job_id", "actor_id", "episode_id", "task_id", "behavior_version", "seq",
                                 "first_step", "outcome", "produced_at", "drop_key", "extra_key", "rename_key", "empty_maps"]))
    if kind in ("job_id", "actor_id", "episode_id", "task_id"):
        special = {"job_id": ["", "demo2", "DEMO"], "actor_id": ["", "a" * 129], "episode_id": ["", "e" * 129],
                   "task_id": ["", "fly-v3", "Reach-v3", "reach-v3 "]}[kind]
        setattr(chunk, kind, draw(st.one_of(st.sampled_from(special), text)))
        return f"{kind}={getattr(chunk, kind)!r}"
    if kind == "behavior_version":
        chunk.behavior_version = draw(st.sampled_from([10**6, 2**62, 2**63, U64]))
    elif kind == "seq":
        chunk.seq = draw(st.sampled_from([2**31, 2**63, U64]))
    elif kind == "first_step":
        # kept under int64: past it is the open finding ingest-first-step-overflow, reproduced apart
        chunk.first_step = draw(st.sampled_from([2**31, 2**40, 2**62]))
    elif kind == "outcome":
        chunk.end.outcome = draw(st.one_of(st.integers(0, 6), st.integers(-2**31, 2**31 - 1)))
        return f"end.outcome={chunk.end.outcome}"
    elif kind == "produced_at":
        chunk.produced_at = draw(st.sampled_from([math.nan, math.inf, -math.inf, -1e300, 1e300]))
    elif kind == "drop_key":
        field = draw(st.sampled_from(["observations", "actions"]))
        getattr(chunk, field).clear()
        return f"{field}={{}}"
    elif kind == "extra_key":
        field = draw(st.sampled_from(["observations", "actions"]))
        key = draw(text)
        getattr(chunk, field)[key].CopyFrom(chunk.rewards)
        return f"{field}[{key!r}] added"
    elif kind == "rename_key":
        field, old = draw(st.sampled_from([("observations", "state"), ("actions", "action")]))
        new = draw(text)
        m = getattr(chunk, field)
        t = pb.Tensor()
        t.CopyFrom(m[old])
        del m[old]
        m[new].CopyFrom(t)
        return f"{field}[{old}] renamed {new!r}"
    else:
        chunk.observations.clear()
        chunk.actions.clear()
        return "observations={} actions={}"
    return f"{kind}={getattr(chunk, kind)}"


@st.composite
def chunk_mutations(draw, chunk: pb.EpisodeChunk, max_mutations: int = 3) -> list[str]:
    """Apply 0..``max_mutations`` random mutations to ``chunk`` in place; returns their descriptions."""
    out = []
    for _ in range(draw(st.integers(0, max_mutations))):
        out.append(draw(st.one_of(tensor_mutation(chunk), scalar_mutation(chunk))))
    return out


@st.composite
def byte_mutations(draw, raw: bytes) -> tuple[bytes, str]:
    """Byte-level mutations of a serialised message: flips, truncation, insertion, splices."""
    data = bytearray(raw)
    descs = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "varint"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "truncate":
            del data[pos:]
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del data[pos:pos + draw(st.integers(1, 16))]
        elif kind == "varint":  # a length prefix claiming a huge field
            data[pos:pos] = b"\x0a\xff\xff\xff\xff\x0f"
        descs.append(f"{kind}@{pos}")
    return bytes(data), "bytes:" + ",".join(descs)


@st.composite
def handshake_mutation(draw, req: pb.HandshakeRequest) -> str:
    """Mutate one field of a valid HandshakeRequest in place; returns the field name mutated."""
    field = draw(st.sampled_from(["protocol_version", "job_id", "actor_id", "kind", "observation_specs", "action_specs",
                                  "tasks", "capabilities"]))
    if field == "protocol_version":
        req.protocol_version = draw(st.sampled_from([0, 1, 2, 99, 2**32 - 1]))
    elif field == "job_id":
        req.job_id = draw(st.one_of(st.sampled_from(["", "demo", "demo ", "other"]), text))
    elif field == "actor_id":
        req.actor_id = draw(st.one_of(st.sampled_from(["", "r", "a" * 128, "a" * 129]), text))
    elif field == "kind":
        req.kind = draw(st.sampled_from([pb.ACTOR_KIND_UNSPECIFIED, pb.ROBOT, pb.LLM]))
    elif field in ("observation_specs", "action_specs"):
        specs = getattr(req, field)
        if not specs:  # emptied by an earlier mutation
            specs.add().CopyFrom(make_spec("state", "float32", [OBS_DIM]))
        op = draw(st.sampled_from(["drop", "dup_conflict", "dtype", "shape", "name", "extra", "huge"]))
        if op == "drop":
            del specs[:]
        elif op == "dup_conflict":  # same name twice, the wrong one first
            good = pb.TensorSpec()
            good.CopyFrom(specs[0])
            if specs[0].shape:
                specs[0].shape[0] += 1
            else:
                specs[0].shape.append(1)
            specs.add().CopyFrom(good)
        elif op == "dtype":
            specs[0].dtype = draw(st.integers(0, 9))
        elif op == "shape":
            del specs[0].shape[:]
            specs[0].shape.extend(draw(st.lists(st.integers(-2**63, 2**63 - 1), max_size=4)))
        elif op == "name":
            specs[0].name = draw(text)
        elif op == "extra":
            specs.add().CopyFrom(make_spec(draw(text) or "x", "float32", [1]))
        else:
            specs[0].name = "n" * draw(st.integers(1000, 100_000))
            specs[0].shape.extend([7] * draw(st.integers(100, 20_000)))
    elif field == "tasks":
        del req.tasks[:]
        req.tasks.extend(draw(st.lists(st.one_of(st.sampled_from(TASKS + ["fly-v3", ""]), text), max_size=4)))
    else:
        req.capabilities.update(draw(st.dictionaries(text, text, max_size=4)))
    return field


def valid_handshake(actor: str = "fuzz-hs") -> pb.HandshakeRequest:
    obs, act = robot_specs()
    return pb.HandshakeRequest(protocol_version=1, job_id=JOB, actor_id=actor, kind=pb.ROBOT, observation_specs=obs,
                               action_specs=act, tasks=TASKS)
