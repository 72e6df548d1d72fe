"""Coverage-guided fuzzing (atheris / libFuzzer) of the chunk decoder: raw bytes -> ``parse_message``
-> ``learner.ingest.validate``. Run as a process (libFuzzer owns it and exits when done):

    python -m tests.fuzz.atheris_chunks COUNTS.json MODE -runs=20000 -seed=1 [CORPUS_DIR]

MODE ``bytes``: the input is the serialised chunk. MODE ``structured``: the input drives
mutations of a valid chunk through atheris.FuzzedDataProvider (tensor dtypes, shapes of up to 80
dims with any int64, byte lengths, ids, versions, outcome), which reaches the decoder's deeper
checks far more often than raw bytes do.

Contract checked per input: only FleetloopError subclasses escape (anything else is a crash that
libFuzzer reports with the input, exit code != 0), except the signature of the still-open finding
``ingest-zero-step-end-chunk`` (counted apart). The outcome counts go to COUNTS.json every 250
inputs (libFuzzer exits without running Python's atexit hooks). The seed corpus is valid chunks.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["fleetloop.codec", "learner.ingest"]):
    from fleetloop.codec import parse_message
    from fleetloop.errors import FleetloopError
    from learner.ingest import validate

from fleetloop.v1 import fleetloop_pb2 as pb  # noqa: E402
from tests.fuzz.strategies import JOB, TASKS, robot_specs, valid_chunk  # noqa: E402

OBS, ACT = robot_specs()
COUNTS: Counter[str] = Counter()
OUT = Path(sys.argv[1])
MODE = sys.argv[2]


def _flush() -> None:
    OUT.write_text(json.dumps({"cases": sum(COUNTS.values()), "outcomes": dict(COUNTS)}))


TENSORS = ["rewards", "interventions", "observations", "actions"]


def structured_chunk(data: bytes) -> pb.EpisodeChunk:
    """A valid chunk mutated as the fuzz input dictates."""
    fdp = atheris.FuzzedDataProvider(data)
    chunk = valid_chunk("ep-a", fdp.ConsumeIntInRange(1, 30), end=fdp.PickValueInList([None, 1, 2, 3, 4]))
    for _ in range(fdp.ConsumeIntInRange(0, 4)):
        name = fdp.PickValueInList(TENSORS)
        t = {"observations": chunk.observations["state"], "actions": chunk.actions["action"]}.get(name) or getattr(chunk, name)
        op = fdp.ConsumeIntInRange(0, 7)
        if op == 0:
            t.dtype = fdp.ConsumeIntInRange(-2**31, 2**31 - 1)
        elif op == 1:
            del t.shape[:]
            t.shape.extend(fdp.ConsumeIntInRange(-2**63, 2**63 - 1) for _ in range(fdp.ConsumeIntInRange(0, 80)))
        elif op == 2:
            del t.shape[:]
            t.shape.extend(fdp.ConsumeIntInRange(0, 64) for _ in range(fdp.ConsumeIntInRange(0, 80)))
        elif op == 3:
            t.data = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 2048))
        elif op == 4:
            chunk.behavior_version = fdp.ConsumeIntInRange(0, 2**64 - 1)
        elif op == 5:
            chunk.end.outcome = fdp.ConsumeIntInRange(-2**31, 2**31 - 1)
        elif op == 6:
            setattr(chunk, fdp.PickValueInList(["job_id", "actor_id", "episode_id", "task_id"]), fdp.ConsumeUnicodeNoSurrogates(140))
        else:
            t.Clear()
    return chunk


def test_one_input(data: bytes) -> None:
    chunk = None
    try:
        chunk = structured_chunk(data) if MODE == "structured" else parse_message(data, pb.EpisodeChunk, 256 * 1024)
        validate(chunk, JOB, set(TASKS), OBS, ACT, 5)
        COUNTS["accepted"] += 1
    except FleetloopError as exc:
        assert exc.field and exc.field in str(exc), str(exc)
        COUNTS[type(exc).__name__] += 1
    if sum(COUNTS.values()) % 250 == 0:
        _flush()


def main() -> None:
    corpus = [a for a in sys.argv[3:] if not a.startswith("-")]
    for d in corpus if MODE == "bytes" else ():  # seed: valid chunks of a few sizes, with and without an end
        for i, (n, end) in enumerate([(1, None), (5, 1), (20, 2), (3, 4)]):
            Path(d, f"seed-{i}").write_bytes(valid_chunk(f"ep-{i}", n, end=end).SerializeToString())
    atheris.Setup([sys.argv[0], *sys.argv[3:]], test_one_input)
    try:
        atheris.Fuzz()
    finally:
        _flush()


if __name__ == "__main__":
    main()
