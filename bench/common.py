"""Shared benchmark helpers: machine description, child processes, the raw-gRPC baseline, tables, JSON.

Every benchmark compares a fleetloop figure with a raw-gRPC baseline measured in the same run, on
the same machine, over loopback, with the server in the bench's own process (where the learner
runs) and the clients in separate ``spawn`` processes (where the actors run). The raw server uses
generic handlers with identity (bytes) serializers and the learner server's channel options, so
the difference between the two is what fleetloop does per message, not transport settings.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import sys
import threading
import time
from concurrent import futures
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from services.harness import machine as _machine

# where the numbers come from: kept in the harness (services never import bench), named here for the benchmarks
machine_info, load_average = _machine.machine_info, _machine.load_average

MB = 1e6  # benchmarks report MB = 10^6 bytes
JOB = "bench"
TASK = "reach-v3"
EPISODE_STEPS = 200
RAW_SERVICE = "fleetloop.bench.Raw"
RAW_INGEST = f"/{RAW_SERVICE}/Ingest"
RAW_DOWNLOAD = f"/{RAW_SERVICE}/Download"
RAW_ACK = b"\x08\x01"  # a tiny response per message (2 bytes)


# -- machine -----------------------------------------------------------------------------------
@contextmanager
def quiet_fleetloop_logs(level: int = logging.WARNING) -> Iterator[None]:
    """Raise the fleetloop logger's level for the duration (per-chunk / per-publish info lines off)."""
    from fleetloop.logs import get_logger

    get_logger("bench")
    root = logging.getLogger("fleetloop")
    old = root.level
    root.setLevel(level)
    try:
        yield
    finally:
        root.setLevel(old)


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, None when either is missing or b is 0."""
    if a is None or b is None or b == 0:
        return None
    return a / b


def cpu_seconds() -> float:
    """User + system CPU time of this process, all its threads (CLOCK_PROCESS_CPUTIME_ID: ns
    resolution, unlike ``os.times``)."""
    return time.process_time()


def peak_rss_mb() -> float | None:
    """This process's peak resident set (VmHWM), MB; None where /proc is unavailable."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / 1e6
    except OSError:
        pass
    return None


# -- child processes ---------------------------------------------------------------------------
class Children:
    """Spawned helper processes that are always stopped: by their own deadline, by ``stop_all``
    (join, then terminate, then kill, each by pid) and, as daemons, when this process exits."""

    def __init__(self) -> None:
        self.ctx = mp.get_context("spawn")
        self.procs: list[mp.process.BaseProcess] = []

    def start(self, target: Callable, *args: Any, name: str) -> mp.process.BaseProcess:
        proc = self.ctx.Process(target=target, args=args, name=name, daemon=True)
        proc.start()
        self.procs.append(proc)
        return proc

    def alive(self) -> list[str]:
        return [p.name for p in self.procs if p.is_alive()]

    def stop_all(self, timeout: float = 15.0) -> list[int | None]:
        """Wait up to ``timeout`` for a clean exit, then terminate/kill stragglers. Returns exit codes."""
        deadline = time.monotonic() + timeout
        for p in self.procs:
            p.join(max(0.0, deadline - time.monotonic()))
        for p in self.procs:
            if p.is_alive():
                p.terminate()
                p.join(3.0)
            if p.is_alive():
                p.kill()
                p.join(3.0)
        codes = [p.exitcode for p in self.procs]
        for p in self.procs:
            try:
                p.close()
            except ValueError:
                pass
        self.procs = []
        return codes

    def __enter__(self) -> "Children":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop_all(timeout=5.0 if exc[0] is not None else 15.0)


def wait_ready(queue, n: int, timeout: float, children: Children, what: str) -> list[Any]:
    """Collect ``n`` 'ready' messages from children; raise naming the cause on error or timeout."""
    import queue as queue_mod

    got = []
    deadline = time.monotonic() + timeout
    while len(got) < n:
        try:
            msg = queue.get(timeout=0.5)
        except queue_mod.Empty:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what}: {len(got)} of {n} clients ready after {timeout:.0f} s "
                                   f"(alive: {children.alive()})") from None
            if len(children.alive()) < len(children.procs):
                raise RuntimeError(f"{what}: a client process exited before it was ready (alive: {children.alive()})")
            continue
        if isinstance(msg, dict) and msg.get("error"):
            raise RuntimeError(f"{what}: client {msg.get('idx')} failed: {msg['error']}")
        got.append(msg)
    return got


def collect(queue, n: int, timeout: float, accept: Callable[[Any], bool] = lambda m: True) -> list[Any]:
    """Up to ``n`` accepted messages from ``queue`` within ``timeout`` (fewer on timeout)."""
    import queue as queue_mod

    got = []
    deadline = time.monotonic() + timeout
    while len(got) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            msg = queue.get(timeout=min(left, 0.5))
        except queue_mod.Empty:
            continue
        if isinstance(msg, dict) and msg.get("error"):
            raise RuntimeError(f"client {msg.get('idx')} failed: {msg['error']}")
        if accept(msg):
            got.append(msg)
    return got


class Lifeline:
    """A child's reasons to go on: its parent (the bench) is alive and its hard deadline has not passed.
    Children check it in every loop, so none outlives a bench that was killed."""

    def __init__(self, hard_deadline_s: float) -> None:
        self.ppid = os.getppid()
        self.end_by = time.monotonic() + hard_deadline_s

    def ok(self) -> bool:
        return os.getppid() == self.ppid and time.monotonic() < self.end_by


def child_setup(hard_deadline_s: float) -> Lifeline:
    """First thing in every child: leave Ctrl-C to the parent (it stops the children in order),
    quiet logs (warnings still shown); returns the child's :class:`Lifeline`."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ["FLEETLOOP_LOG_LEVEL"] = "WARNING"
    from fleetloop.logs import get_logger

    get_logger("bench")
    logging.getLogger("fleetloop").setLevel(logging.WARNING)
    return Lifeline(hard_deadline_s)


# -- the learner, in this process -----------------------------------------------------------------
def start_learner_in_process(state_dir: Path, chunk_steps: int = 50, max_chunk_wait_s: float | None = None, hooks=None):
    """The real learner (``build_learner(...).serve()``: LearnerCore + gRPC server + training thread, no Ray)
    on a free loopback port, with the Meta-World default specs and training kept idle:
    ``min_online_steps=10**12`` makes ``train_step`` return at once after a buffer-size check under
    the ingest lock, and ``max_updates_per_s=0.1`` makes the loop sleep ~10 s between such checks.
    ``max_chunk_wait_s`` None: the learner's default; ``hooks``: :class:`learner.api.LearnerHooks`."""
    from learner.config import LearnerConfig
    from learner.process import build_learner

    cfg = LearnerConfig(job_id=JOB, host="127.0.0.1", port=0, metrics_port=None, state_dir=state_dir, tasks=[TASK],
                        chunk_steps=chunk_steps, max_episode_steps=EPISODE_STEPS, min_online_steps=10 ** 12,
                        max_updates_per_s=0.1, checkpoint_every_s=1e6, device="cpu",
                        **({} if max_chunk_wait_s is None else {"max_chunk_wait_s": max_chunk_wait_s}))
    return build_learner(cfg, hooks=hooks).serve()


def stop_learner_in_process(impl) -> None:
    """Stop serving (short grace), stop the training thread, close the ingest log; no checkpoint."""
    impl.stop(checkpoint=False, grace_s=1.0, wait_s=10.0, announce=False)


# -- raw gRPC baseline server --------------------------------------------------------------------
def server_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """The learner server's options (learner.server.build_server), so transport settings match."""
    limit = max_message_bytes + (1 << 20)
    return [("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit),
            ("grpc.keepalive_time_ms", 20_000), ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
            ("grpc.keepalive_permit_without_calls", 1), ("grpc.so_reuseport", 0)]


class RawServer:
    """Baseline gRPC server on a free loopback port, bytes in and out, no parsing:

    - ``Ingest`` (stream-stream): counts each message and its bytes, answers each with ``RAW_ACK``;
    - ``Download`` (unary-stream): streams :attr:`blob` in ``chunk_bytes`` pieces (the request is ignored).
    """

    def __init__(self, workers: int = 64, max_message_bytes: int = 8 << 20, chunk_bytes: int = 1 << 20) -> None:
        import grpc

        self.messages = 0
        self.bytes = 0
        self.blob = b""
        self.chunk_bytes = chunk_bytes
        self._lock = threading.Lock()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="bench-raw"),
                                  options=server_options(max_message_bytes), maximum_concurrent_rpcs=workers - 2)
        handlers = {
            "Ingest": grpc.stream_stream_rpc_method_handler(self._ingest, request_deserializer=lambda b: b,
                                                            response_serializer=lambda b: b),
            "Download": grpc.unary_stream_rpc_method_handler(self._download, request_deserializer=lambda b: b,
                                                             response_serializer=lambda b: b),
        }
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(RAW_SERVICE, handlers),))
        self.port = self.server.add_insecure_port("127.0.0.1:0")  # a free port, bound at once (no race)
        if self.port == 0:
            raise RuntimeError("raw baseline server could not bind a loopback port")
        self.target = f"127.0.0.1:{self.port}"

    def _ingest(self, request_iterator, context):
        for raw in request_iterator:
            with self._lock:
                self.messages += 1
                self.bytes += len(raw)
            yield RAW_ACK

    def _download(self, request: bytes, context):
        blob, size = self.blob, self.chunk_bytes
        view = memoryview(blob)
        for off in range(0, len(blob), size):
            yield bytes(view[off:off + size])

    def counters(self) -> tuple[int, int]:
        with self._lock:
            return self.messages, self.bytes

    def __enter__(self) -> "RawServer":
        self.server.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.stop(grace=1.0).wait(5.0)


def raw_channel(target: str):
    """A client channel with the actors' own options (:func:`fleetloop.channels.channel_options`; no torch import)."""
    import grpc

    from fleetloop.channels import channel_options

    return grpc.insecure_channel(target, options=channel_options())


def raw_ingest_client(idx: int, target: str, messages: list[bytes], window: int, ready_q, active, stop, result_q,
                      hard_deadline_s: float) -> None:
    """Child process: stream ``messages`` (cycled) to ``RawServer.Ingest`` whenever ``active`` is set,
    until ``stop``, with at most ``window`` unacknowledged: the flow control of the actor's Sender."""
    try:
        life = child_setup(hard_deadline_s)
        import grpc

        channel = raw_channel(target)
        grpc.channel_ready_future(channel).result(timeout=30)
        call_factory = channel.stream_stream(RAW_INGEST, request_serializer=lambda b: b, response_deserializer=lambda b: b)
        window_sem = threading.Semaphore(window)
        sent = [0]

        def requests():
            i = 0
            while not stop.is_set() and life.ok():
                if not active.is_set():
                    active.wait(0.2)
                    continue
                if not window_sem.acquire(timeout=0.5):
                    continue
                yield messages[i % len(messages)]
                i += 1
                sent[0] = i

        cpu0 = cpu_seconds()
        call = call_factory(requests())
        ready_q.put({"idx": idx, "ready": True})
        acked = 0
        for _ack in call:
            window_sem.release()
            acked += 1
        channel.close()
        result_q.put({"idx": idx, "sent": sent[0], "acked": acked, "cpu_s": round(cpu_seconds() - cpu0, 3)})
    except Exception as exc:  # report, never hang the parent
        result_q.put({"idx": idx, "error": repr(exc)[:500]})
        ready_q.put({"idx": idx, "error": repr(exc)[:500]})


def row(metric: str, unit: str, actors: int | str, fleetloop: float | None, raw: float | None, better: str,
        note: str = "") -> dict[str, Any]:
    """One comparison: a fleetloop figure beside its raw-gRPC baseline and their ratio (fleetloop / raw)."""
    return {"metric": metric, "unit": unit, "actors": actors, "fleetloop": fleetloop, "raw_grpc": raw,
            "ratio": ratio(fleetloop, raw), "better": better, "note": note}


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.3g}" if abs(v) >= 0.001 else f"{v:.2e}"


def print_table(result: dict[str, Any]) -> None:
    """Print ``result['rows']`` (and the config line) as a rich table on stdout."""
    from rich.console import Console
    from rich.table import Table

    m = result["machine"]
    table = Table(title=f"fleetloop bench {result['bench']}: fleetloop vs raw gRPC (same run)",
                  caption=f"{m['cpus_usable']} CPUs, {m['platform']}, Python {m['python']}, "
                          f"grpcio {m['packages'].get('grpcio')}; ratio = fleetloop / raw")
    for col, just in (("metric", "left"), ("unit", "left"), ("actors", "right"), ("fleetloop", "right"),
                      ("raw gRPC", "right"), ("ratio", "right"), ("better", "left")):
        table.add_column(col, justify=just)
    for r in result["rows"]:
        table.add_row(r["metric"], r["unit"], str(r["actors"]), _fmt(r["fleetloop"]), _fmt(r["raw_grpc"]),
                      "-" if r["ratio"] is None else f"{r['ratio']:.2f}", r["better"])
    console = Console(width=max(120, Console().width))
    console.print(table)
    for note in result.get("notes", []):
        console.print(f"  - {note}", highlight=False)


def write_json(result: dict[str, Any], out: str | os.PathLike) -> Path:
    """Write ``result`` as indented JSON (parent folders created); returns the path."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    return path


def median(values: list[float]) -> float | None:
    import statistics

    return statistics.median(values) if values else None


def log_progress(msg: str) -> None:
    """Progress lines go to stderr, keeping stdout for the table."""
    print(f"[bench] {msg}", file=sys.stderr, flush=True)
