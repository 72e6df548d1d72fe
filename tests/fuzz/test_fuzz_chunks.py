"""Fuzz target 1: the chunk decoder (``fleetloop.codec`` + ``learner.ingest.validate``), in process.

Contract held here, for mutated valid chunks, mutated serialised bytes and random bytes: every case
either decodes to a valid DecodedChunk (finite float32 obs [T, 39], actions [T, 4], rewards [T],
bool interventions [T], a job task, a version not newer than the learner's) or raises a
FleetloopError subclass whose ``field`` is a real chunk field, named in the message together with the
offending value. Never another exception; memory stays bounded (tracemalloc peak per case within a
few times the message size, so a shape claiming 10^12 elements is refused before allocation).
Hangs are caught by the test timeout.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fleetloop.codec import MAX_NDIM, decode, encode, parse_message
from fleetloop.errors import FleetloopError, InvalidArgument, NotFound, ResourceExhausted
from fleetloop.v1 import fleetloop_pb2 as pb
from learner.ingest import DecodedChunk, validate
from tests.fuzz.record import RECORD
from tests.fuzz.strategies import (JOB, OBS_DIM, ACT_DIM, TASKS, byte_mutations, chunk_mutations, robot_specs,
                                   valid_chunk)

pytestmark = [pytest.mark.timeout(120)]
OBS_SPECS, ACT_SPECS = robot_specs()
LATEST = 5
MAX_BYTES = 256 * 1024
FIELDS = {"job_id", "actor_id", "episode_id", "task_id", "behavior_version", "seq", "first_step", "rewards", "interventions",
          "dones", "observations", "actions", "end", "produced_at", "message", "message_size"}
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def value_named(exc: FleetloopError) -> bool:
    """True when the message shows the offending value (any usual rendering of it)."""
    msg, v = str(exc), exc.value
    if v is None:
        return True
    forms = {str(v), repr(v)}
    if isinstance(v, (tuple, list)):
        forms.add(str(list(v)))
    if isinstance(v, float):
        forms.add(str(np.float32(v)))
    return any(f in msg for f in forms)


def assert_clear(exc: BaseException, desc: str) -> None:
    """The refusal is ours, names a real field and shows the value."""
    assert isinstance(exc, FleetloopError), f"{desc}: {type(exc).__name__}: {exc}"
    root = (exc.field or "").split("[")[0].split(".")[0]
    assert root in FIELDS, f"{desc}: field {exc.field!r} is not a chunk field ({exc})"
    assert exc.field in str(exc), f"{desc}: message does not name field {exc.field!r}: {exc}"
    assert value_named(exc), f"{desc}: message does not show value {exc.value!r}: {exc}"
    assert len(str(exc)) < 2000, f"{desc}: message of {len(str(exc))} chars"


def assert_valid(d: DecodedChunk, chunk: pb.EpisodeChunk) -> None:
    """A decoded chunk satisfies everything the replay store relies on."""
    t = d.steps
    obs = d.obs["state"]  # observations are a dict of named tensors (the fuzzed job has one: state)
    assert set(d.obs) == {"state"} and obs.shape == (t, OBS_DIM) and obs.dtype == np.float32 and np.isfinite(obs).all()
    assert d.actions.shape == (t, ACT_DIM) and d.actions.dtype == np.float32 and np.isfinite(d.actions).all()
    assert d.rewards.shape == (t,) and d.rewards.dtype == np.float32 and np.isfinite(d.rewards).all()
    assert d.interventions.shape == (t,) and d.interventions.dtype == np.bool_
    assert d.task_id in TASKS and 0 <= d.behavior_version <= LATEST
    assert chunk.job_id == JOB and 1 <= len(d.actor_id) <= 128 and 1 <= len(d.episode_id) <= 128
    assert t > 0 or d.outcome is not None


def run_decoder(raw: bytes | None, chunk: pb.EpisodeChunk | None, desc: str, target: str) -> None:
    """Parse (if ``raw``) and validate under tracemalloc; assert the contract; count the case."""
    size = len(raw) if raw is not None else chunk.ByteSize()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        try:
            if raw is not None:
                chunk = parse_message(raw, pb.EpisodeChunk, MAX_BYTES, field="message")
            decoded = validate(chunk, JOB, set(TASKS), OBS_SPECS, ACT_SPECS, LATEST)
        except FleetloopError as exc:
            assert_clear(exc, desc)
            RECORD.case(target, type(exc).__name__)
        except Exception as exc:  # noqa: BLE001 - the property is "nothing else escapes"
            raise AssertionError(f"{desc}: {type(exc).__name__} escaped the decoder: {exc}") from exc
        else:
            assert_valid(decoded, chunk)
            RECORD.case(target, "accepted")
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert peak <= 8 * size + (1 << 20), f"{desc}: peak {peak} bytes for a {size}-byte chunk"


@SETTINGS
@given(steps=st.integers(1, 30), end=st.one_of(st.none(), st.sampled_from([1, 2, 3, 4])), data=st.data())
def test_mutated_chunks_decode_or_refuse_clearly(steps, end, data):
    chunk = valid_chunk("ep-fuzz", steps, end=end)
    muts = data.draw(chunk_mutations(chunk))
    run_decoder(None, chunk, "; ".join(muts) or "unmutated", "chunk_decoder.mutated_fields")


@SETTINGS
@given(steps=st.integers(1, 30), data=st.data())
def test_mutated_chunk_bytes_decode_or_refuse_clearly(steps, data):
    raw, desc = data.draw(byte_mutations(valid_chunk("ep-bytes", steps, end=1).SerializeToString()))
    run_decoder(raw, None, desc, "chunk_decoder.mutated_bytes")


@SETTINGS
@given(st.binary(max_size=4096))
@example(b"\xff\xff\xff\xff not a protobuf")
@example(b"\x0a\xff\xff\xff\xff\x0f")              # job_id claiming a 4 GiB string
@example(b"\x52\x06\x12\x04\x80\x80\x80\x80")      # rewards.shape: truncated varint
def test_random_bytes_decode_or_refuse_clearly(raw):
    run_decoder(raw, None, f"random {raw[:32]!r}", "chunk_decoder.random_bytes")


def test_oversize_refused_before_parsing():
    raw = valid_chunk("ep-big", 2000).SerializeToString()
    with pytest.raises(ResourceExhausted) as info:
        parse_message(raw, pb.EpisodeChunk, MAX_BYTES)
    assert info.value.field == "message_size" and str(len(raw)) in str(info.value)
    RECORD.case("chunk_decoder.examples", "ResourceExhausted")


@pytest.mark.parametrize("shape, data, words", [
    ([0, 2**62], b"", ["[0, 4611686018427387904]", "layout limit"]),     # finding codec-huge-empty-shape
    ([0] + [2**31 - 1] * 4, b"", ["layout limit"]),
    ([10**6, 10**6], b"\0" * 8, ["[1000000, 1000000]", "4000000000000 bytes"]),  # 10^12 elements claimed, 8 bytes sent
    ([10**5, 10**5], b"\0" * 8, ["data is 8 bytes", "needs 40000000000"]),
    ([1] * 70, b"\0" * 4, ["70 dimensions", f"at most {MAX_NDIM}"]),       # finding codec-too-many-dims
    ([3, -1], b"", ["negative dimension", "[3, -1]"]),
])
def test_absurd_shapes_are_refused_before_allocation(shape, data, words):
    t = pb.Tensor(dtype=1, shape=shape, data=data)
    tracemalloc.start()
    try:
        with pytest.raises(InvalidArgument) as info:
            decode(t, "observations[state]")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert info.value.field.startswith("observations[state].")
    for w in words:
        assert w in str(info.value), str(info.value)
    assert peak < 1 << 20
    RECORD.case("chunk_decoder.examples", "InvalidArgument")


def test_unknown_job_is_not_found_naming_it():
    chunk = valid_chunk("ep", 3)
    chunk.job_id = "other-job"
    with pytest.raises(NotFound, match="'other-job'"):
        validate(chunk, JOB, set(TASKS), OBS_SPECS, ACT_SPECS, LATEST)
    RECORD.case("chunk_decoder.examples", "NotFound")


def test_zero_step_end_chunk_is_valid():
    """An episode that ends before its first step: EpisodeRecorder.end() sends exactly this chunk."""
    chunk = pb.EpisodeChunk(job_id=JOB, actor_id="a", episode_id="ep-empty", seq=0, task_id=TASKS[0])
    encode(np.zeros((0, OBS_DIM), np.float32), chunk.observations["state"])
    encode(np.zeros((0, ACT_DIM), np.float32), chunk.actions["action"])
    encode(np.zeros(0, np.float32), chunk.rewards)
    encode(np.zeros(0, np.bool_), chunk.interventions)
    chunk.end.outcome = pb.ABORTED
    decoded = validate(chunk, JOB, set(TASKS), OBS_SPECS, ACT_SPECS, LATEST)
    assert decoded.steps == 0 and decoded.outcome == "aborted" and decoded.obs["state"].shape == (0, OBS_DIM)
