"""Helpers of the chaos suite: real OS processes started, killed and stopped by pid, and the
records the tests read back (actor journals, the learner's ingest log, scenario summaries).

Every process is started in its own session (``start_new_session``) with its output in a log
file; :meth:`Proc.kill9` sends SIGKILL to that pid only; :meth:`Proc.stop` sends SIGTERM, waits,
then SIGKILL. Nothing is ever stopped by name.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tests.helpers.control_plane import wait_for as _poll

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable


def free_port() -> int:
    """A free loopback TCP port (bound and released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def chaos_out() -> Path:
    """Where scenario summaries go: $FLEETLOOP_CHAOS_OUT, default runs/test-artifacts/chaos/."""
    out = Path(os.environ.get("FLEETLOOP_CHAOS_OUT") or REPO / "runs" / "test-artifacts" / "chaos")
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_summary(scenario: str, summary: dict[str, Any]) -> Path:
    """Write ``<out>/<scenario>.json`` (atomically) for the docs generator."""
    path = chaos_out() / f"{scenario}.json"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"scenario": scenario, "written_at": time.time(), **summary}, indent=1, sort_keys=True))
    os.replace(tmp, path)
    return path


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.1, alive: list | None = None) -> Any:
    """Poll ``predicate`` until truthy (returned); AssertionError after ``timeout``. ``alive``:
    processes that must stay up meanwhile (their log tail is shown if one exits)."""
    def check() -> Any:
        value = predicate()
        if not value:
            for p in alive or ():
                if p.poll() is not None:
                    raise AssertionError(f"{p.name} exited with {p.poll()} while waiting for {what}:\n{p.tail()}")
        return value
    return _poll(check, timeout, interval=interval, what=what)


class Proc:
    """One child process, its own session, output to ``log``."""

    def __init__(self, name: str, argv: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.name, self.argv, self.log = name, argv, Path(log)
        self.log.parent.mkdir(parents=True, exist_ok=True)
        full_env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
                    "MKL_NUM_THREADS": "1", **(env or {})}
        with open(self.log, "ab") as fh:
            self.popen = subprocess.Popen(argv, cwd=REPO, env=full_env, stdout=fh, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, start_new_session=True)
        self.pid = self.popen.pid

    def poll(self) -> int | None:
        return self.popen.poll()

    def tail(self, n: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def freeze(self) -> None:
        """SIGSTOP this pid: it stays exactly as it is (to inspect it, then kill or thaw it)."""
        os.kill(self.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        """SIGCONT this pid."""
        os.kill(self.pid, signal.SIGCONT)

    def kill9(self) -> None:
        """SIGKILL this pid (the chaos action); reaps it."""
        if self.popen.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
        self.popen.wait(10)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, wait up to ``timeout``, then SIGKILL; returns the exit code."""
        if self.popen.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.popen.wait(10)
        return self.popen.returncode

    def wait(self, timeout: float) -> int:
        return self.popen.wait(timeout)


class ProcGroup:
    """Processes a test started; :meth:`cleanup` stops the ones still running (by pid)."""

    def __init__(self) -> None:
        self.procs: list[Proc] = []

    def add(self, proc: Proc) -> Proc:
        self.procs.append(proc)
        return proc

    def cleanup(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.stop(timeout=10)


# -- the learner as its own process ------------------------------------------------------------
class LearnerProc(Proc):
    """``python -m tests.chaos.learner_process``: the learner's Ray-actor body in a plain process."""

    def __init__(self, config_path: Path, final_path: Path, log: Path) -> None:
        self.final_path = Path(final_path)
        self.final_path.unlink(missing_ok=True)
        super().__init__("learner", [PYTHON, "-m", "tests.chaos.learner_process", "--config", str(config_path),
                                     "--final", str(final_path)], log)
        self.address: dict[str, Any] | None = None

    def wait_ready(self, timeout: float = 120.0) -> dict[str, Any]:
        """The address line the process prints once it serves."""
        def ready():
            for line in self.tail(1 << 20).splitlines():
                if line.startswith("LEARNER_READY "):
                    return json.loads(line.split(" ", 1)[1])
            return None
        self.address = wait_for(ready, timeout, "learner ready", interval=0.2, alive=[self])
        return self.address

    def final(self) -> dict[str, Any]:
        """What the process wrote at its graceful stop (status, audit, buffer contents, metrics)."""
        return json.loads(self.final_path.read_text())


def versions_on_disk(state_dir: Path) -> dict[int, str]:
    """The learner's published versions (version -> sha256) from its weight store index."""
    path = Path(state_dir) / "weights" / "index.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {int(v["version"]): v["sha256"] for v in data.get("versions", [])}


# -- the actor with a journal ------------------------------------------------------------------
class ActorProc(Proc):
    """``python -m tests.chaos.actor_process --journal J -- <fleetloop actor flags>``."""

    def __init__(self, name: str, journal: Path, flags: list[str], log: Path) -> None:
        self.journal = Path(journal)
        super().__init__(name, [PYTHON, "-m", "tests.chaos.actor_process", "--journal", str(journal), "--", *flags], log)

    def records(self) -> list[dict[str, Any]]:
        return read_journal(self.journal)


def read_journal(path: Path) -> list[dict[str, Any]]:
    """Journal lines (a line torn by SIGKILL at the end is skipped)."""
    out = []
    try:
        text = Path(path).read_text()
    except OSError:
        return out
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


@dataclass
class ChunkRec:
    """One chunk as the audit sees it."""

    episode_id: str
    seq: int
    first_step: int
    steps: int
    behavior_version: int
    outcome: str | None
    task_id: str = ""

    @property
    def key(self) -> tuple[str, int]:
        return self.episode_id, self.seq


def chunk_rec(raw: bytes) -> ChunkRec:
    """ChunkRec of a serialised EpisodeChunk."""
    from fleetloop.v1 import fleetloop_pb2 as pb

    c = pb.EpisodeChunk.FromString(raw)
    outcome = {1: "success", 2: "failure", 3: "timeout", 4: "aborted"}.get(int(c.end.outcome)) if c.HasField("end") else None
    return ChunkRec(c.episode_id, int(c.seq), int(c.first_step), int(c.rewards.shape[0]) if c.rewards.shape else 0,
                    int(c.behavior_version), outcome, c.task_id)


def frame_torn(actor_id: str, episode_id: str, seq: int, task: str) -> tuple[bytes, bytes]:
    """A spool file torn by a power loss: the frame of a one-step chunk with an ``end`` field, cut
    just before that field. Returns (the cut payload, which still parses as an EpisodeChunk; the
    file bytes)."""
    import numpy as np

    from fleetloop.client.spool import frame
    from fleetloop.codec import encode
    from fleetloop.v1 import fleetloop_pb2 as pb

    chunk = pb.EpisodeChunk(job_id="demo", actor_id=actor_id, episode_id=episode_id, seq=seq, task_id=task,
                            behavior_version=0, first_step=0)
    encode(np.zeros((1, 39), np.float32), chunk.observations["state"])
    encode(np.zeros((1, 4), np.float32), chunk.actions["action"])
    encode(np.zeros(1, np.float32), chunk.rewards)
    encode(np.zeros(1, np.bool_), chunk.interventions)
    cut = chunk.SerializeToString()
    chunk.end.CopyFrom(pb.EpisodeEnd(outcome=pb.SUCCESS, length=1))
    full = chunk.SerializeToString()
    assert full.startswith(cut)
    return cut, frame(full)[:len(frame(full)) - (len(full) - len(cut))]


def spool_snapshot(spool_dir: Path) -> list[ChunkRec]:
    """The chunks in a (dead) actor's spool folder, read with the spool's own frame check."""
    from fleetloop.client.spool import unframe

    out = []
    for path in sorted(Path(spool_dir).glob("*.chunk")):
        out.append(chunk_rec(unframe(path.read_bytes())))
    return out


@dataclass
class LogView:
    """The learner's ingest log: every durable record, in order."""

    records: list[ChunkRec] = field(default_factory=list)

    @property
    def keys(self) -> set[tuple[str, int]]:
        return {r.key for r in self.records}

    def duplicates(self) -> int:
        """Records whose (episode_id, seq) appears more than once (a chunk stored twice)."""
        return sum(n - 1 for n in Counter(r.key for r in self.records).values() if n > 1)

    @property
    def steps(self) -> int:
        return sum(r.steps for r in self.records)


def read_ingest_log(path: Path, copy_to: Path | None = None) -> LogView:
    """Parse the ingest log at ``path`` with the learner's own reader, on a copy (the reader
    truncates a torn tail; the original is left alone)."""
    import shutil

    from learner.ingest_log import IngestLog

    src = Path(path)
    dst = Path(copy_to) if copy_to else src.with_name(f"{src.name}.copy-{os.getpid()}-{time.monotonic_ns()}")
    if src.exists():
        shutil.copyfile(src, dst)
    else:
        dst.write_bytes(b"")
    try:
        return LogView([chunk_rec(p) for p in IngestLog(dst).replay()])
    finally:
        if copy_to is None:
            dst.unlink(missing_ok=True)


def journal_chunks(records: list[dict[str, Any]], kind: str = "put") -> dict[tuple[str, int], dict[str, Any]]:
    """Journal records of one kind keyed by (episode_id, seq)."""
    return {(r["episode"], int(r["seq"])): r for r in records if r.get("ev") == kind}
