"""The fuzz suite's numbers: cases run per target, how each ended, and the bugs the fuzzing found.

Each property calls :meth:`FuzzRecord.case` once per generated example; the session fixture in
``tests/fuzz/conftest.py`` writes ``fuzz.json`` to ``$FLEETLOOP_CHAOS_OUT`` (default
``runs/test-artifacts/chaos/``) when the session ends. :data:`FINDINGS` lists what fuzzing found,
with the input that triggers it and whether it is fixed (and where) or still open (then a strict
xfail test in this folder reproduces it, so the entry must change when someone fixes the bug).
"""

from __future__ import annotations

import json
import os
import threading
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

#: Bugs found by this suite. status "fixed": the fix is in ``where``; "open": reproduced by the
#: strict xfail test named in ``test`` (the file is not this suite's to change).
FINDINGS: list[dict[str, str]] = [
    {"id": "codec-huge-empty-shape", "status": "fixed", "where": "fleetloop/codec.py decode/check_shape",
     "input": "Tensor(dtype=FLOAT32, shape=[0, 2**62], data=b'')",
     "symptom": "ValueError 'array is too big' from numpy reshape (gRPC UNKNOWN, not counted)",
     "fix": "shape checked before numpy: layout (0 counted as 1) <= 2^40 bytes, else InvalidArgument naming the shape"},
    {"id": "codec-too-many-dims", "status": "fixed", "where": "fleetloop/codec.py decode/check_shape",
     "input": "Tensor(dtype=FLOAT32, shape=[1]*70, data=4 bytes)",
     "symptom": "ValueError 'maximum supported dimension for an ndarray is currently 64'",
     "fix": "at most MAX_NDIM=16 dimensions, else InvalidArgument naming the count"},
    {"id": "codec-duplicate-spec-names", "status": "fixed", "where": "fleetloop/codec.py specs_mismatch",
     "input": "HandshakeRequest.observation_specs=[state:FLOAT32[40], state:FLOAT32[39]]",
     "symptom": "handshake accepted: the later spec with the same name hid the wrong one",
     "fix": "a declared list that repeats a name never matches (FAILED_PRECONDITION naming the name)"},
    {"id": "codec-unbounded-spec-message", "status": "fixed", "where": "fleetloop/codec.py describe_specs",
     "input": "HandshakeRequest with a TensorSpec of 20000 dims / a 100 kB spec name",
     "symptom": "the refusal echoed every dimension: ~160 kB of status details, past gRPC's metadata limit, so the "
                "client got RESOURCE_EXHAUSTED 'Stream removed (received metadata size exceeds hard limit)' instead",
     "fix": "spec descriptions capped (names 40 chars, shapes 16 dims, 600 chars per list)"},
    {"id": "weights-claimed-size-allocated", "status": "fixed", "where": "fleetloop/client/weight_client.py fetch_into",
     "input": "WeightAnnouncement(size_bytes=10**15) with a 120-byte blob",
     "symptom": "bytearray(size_bytes) allocated before any byte arrived: MemoryError (not an IntegrityError: the "
                "background fetcher thread died with it)",
     "fix": "size_bytes capped (max_weight_bytes), buffer grows only with bytes received"},
    {"id": "weights-not-safetensors", "status": "fixed", "where": "fleetloop/client/weight_client.py fetch_now",
     "input": "blob b'\\xff'*64 announced with its own (matching) sha256",
     "symptom": "SafetensorError escaped fetch_now: not counted, and it ended the background fetcher thread for good",
     "fix": "a blob that does not parse as safetensors is refused with IntegrityError(field='blob'), counted"},
    {"id": "weights-chunk-identity-unchecked", "status": "fixed", "where": "fleetloop/client/weight_client.py fetch_into",
     "input": "WeightChunk.version / sha256 / total_size differing from the announcement",
     "symptom": "chunks naming another version, digest or size were assembled without notice (only the final digest "
                "guarded the bytes; a wrong chunk surfaced as a bare digest mismatch)",
     "fix": "every chunk must carry the announced version, sha256 and total_size (IntegrityError naming the field)"},
    {"id": "weights-endless-empty-chunks", "status": "fixed", "where": "fleetloop/client/weight_client.py fetch_into",
     "input": "FetchWeights stream of empty WeightChunks at offset 0",
     "symptom": "any number of empty chunks was accepted: an endless stream of them held the fetch until its deadline",
     "fix": "an empty chunk is legal only as the end marker (offset == size_bytes), once"},
    {"id": "ingest-zero-step-end-chunk", "status": "fixed", "where": "learner/ingest.py validate",
     "input": "EpisodeChunk with 0 steps (shapes [0], [0,39], [0,4]) and end.outcome=ABORTED, as "
              "fleetloop.client.runtime.EpisodeRecorder.end() sends when an episode ends before its first step",
     "symptom": "ValueError 'cannot reshape array of size 0 into shape (0,newaxis)' -> gRPC UNKNOWN, not counted; "
                "the actor's Sender retries UNKNOWN forever, so every later chunk of that actor stalls behind it",
     "test": "tests/fuzz/test_fuzz_chunks.py::test_zero_step_end_chunk_is_valid, "
             "tests/fuzz/test_fuzz_server.py::test_episode_ended_before_first_step_does_not_stall_actor",
     "fix": "validate reshapes by the spec's flattened size, so a 0-step chunk decodes (fixed in learner/ingest.py)"},
    {"id": "ingest-first-step-overflow", "status": "fixed", "where": "learner/ingest.py validate (-> replay.add_online)",
     "input": "valid EpisodeChunk with first_step = 2**63 (uint64 on the wire)",
     "symptom": "OverflowError in np.arange(int64) after the chunk was appended to the durable ingest log -> gRPC "
                "UNKNOWN, not counted; every resend appends it to the log again",
     "test": "tests/fuzz/test_fuzz_server.py::test_first_step_past_int64_is_invalid_argument",
     "fix": "validate bounds seq and first_step below 2**40 before anything is logged: INVALID_ARGUMENT naming the field"},
    {"id": "handshake-unknown-kind", "status": "fixed", "where": "learner/server.py Handshake",
     "input": "HandshakeRequest(kind=7) (proto3 enums are open: any int32 arrives)",
     "symptom": "pb.ActorKind.Name(7) raises ValueError -> gRPC UNKNOWN 'Exception calling application'",
     "test": "tests/fuzz/test_fuzz_server.py::test_unknown_actor_kind_is_failed_precondition",
     "fix": "an ActorKind outside the enum is refused with FAILED_PRECONDITION naming the number"},
    {"id": "unary-garbage-internal", "status": "fixed", "where": "learner/server.py build_server (request deserializers)",
     "input": "b'\\xff\\xff garbage' sent to /fleetloop.v1.Learner/Handshake (same for SubscribeWeights, FetchWeights)",
     "symptom": "grpc's own deserializer fails: INTERNAL 'Exception deserializing request!', not INVALID_ARGUMENT naming "
                "the message (StreamExperience parses raw bytes itself and gets this right)",
     "test": "tests/fuzz/test_fuzz_server.py::test_undecodable_handshake_is_invalid_argument",
     "fix": "every unary request arrives as bytes and is parsed by the server: INVALID_ARGUMENT naming the message type"},
    {"id": "handshake-refusals-uncounted", "status": "fixed", "where": "learner/server.py Handshake, learner/metrics.py",
     "input": "any refused HandshakeRequest (bad protocol, job, token, kind, specs, tasks)",
     "symptom": "no counter increases (rejected_chunks_total counts only StreamExperience)",
     "test": "tests/fuzz/test_fuzz_server.py::test_handshake_refusals_are_counted",
     "fix": "fleetloop_learner_refused_handshakes_total{reason} counts every refusal"},
]


class FuzzRecord:
    """Thread-safe tally of fuzz cases per target."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.cases: Counter[str] = Counter()
        self.outcomes: dict[str, Counter[str]] = defaultdict(Counter)
        self.engines: dict[str, str] = {}

    def case(self, target: str, outcome: str, engine: str = "hypothesis") -> None:
        """Count one example of ``target`` that ended in ``outcome`` (e.g. ``accepted``,
        ``InvalidArgument``, ``INVALID_ARGUMENT``)."""
        with self._lock:
            self.cases[target] += 1
            self.outcomes[target][outcome] += 1
            self.engines[target] = engine

    def add(self, target: str, cases: int, outcomes: dict[str, int], engine: str) -> None:
        """Merge counts measured elsewhere (the atheris subprocess)."""
        with self._lock:
            self.cases[target] += cases
            self.outcomes[target].update(outcomes)
            self.engines[target] = engine

    def to_json(self) -> dict:
        with self._lock:
            targets = {t: {"engine": self.engines.get(t, "hypothesis"), "cases": n,
                           "outcomes": dict(sorted(self.outcomes[t].items()))} for t, n in sorted(self.cases.items())}
        fixed = [f for f in FINDINGS if f["status"] == "fixed"]
        return {"suite": "tests/fuzz", "targets": targets, "cases_total": sum(t["cases"] for t in targets.values()),
                "failures_found": len(FINDINGS), "failures_fixed": len(fixed),
                "failures_open": len(FINDINGS) - len(fixed), "findings": FINDINGS}

    def write(self) -> Path | None:
        """Write ``fuzz.json`` (nothing if no case ran). Returns the path written."""
        if not self.cases:
            return None
        out = Path(os.environ.get("FLEETLOOP_CHAOS_OUT") or ROOT / "runs" / "test-artifacts" / "chaos")
        out.mkdir(parents=True, exist_ok=True)
        path = out / "fuzz.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        tmp.replace(path)
        return path


RECORD = FuzzRecord()
