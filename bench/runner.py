"""Entry point of ``fleetloop bench ingest|weights``: run, print the table, write the JSON."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from typing import Any, Callable

from bench.common import log_progress, print_table, write_json


def _actor_counts(text: str) -> list[int]:
    try:
        counts = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        counts = []
    if not counts or any(c < 1 for c in counts):
        raise ValueError(f"--actors {text!r} must be comma-separated positive integers")
    return counts


def plan(args: argparse.Namespace) -> Callable[[], dict[str, Any]]:
    """Check the arguments of ``args.bench_cmd`` (ValueError naming the bad one); return the run."""
    if args.bench_cmd == "ingest":
        from bench.ingest import run_ingest

        counts = _actor_counts(args.actors)
        if args.seconds <= 0:
            raise ValueError(f"--seconds {args.seconds} must be > 0")
        if not 1 <= args.chunk_steps <= 10_000:
            raise ValueError(f"--chunk-steps {args.chunk_steps} must be in 1..10000")
        return lambda: run_ingest(counts, float(args.seconds), int(args.chunk_steps))
    if args.bench_cmd == "weights":
        from bench.weights import run_weights

        if args.size_mb <= 0:
            raise ValueError(f"--size-mb {args.size_mb} must be > 0")
        if args.actors < 1:
            raise ValueError(f"--actors {args.actors} must be >= 1")
        if args.repeats < 1:
            raise ValueError(f"--repeats {args.repeats} must be >= 1")
        return lambda: run_weights(float(args.size_mb), int(args.actors), int(args.repeats))
    raise ValueError(f"unknown benchmark {args.bench_cmd!r} (ingest | weights)")


def _with_sigterm_as_exit(job: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run ``job`` with SIGTERM raising SystemExit, so the benches' cleanup (children stopped by pid,
    servers stopped, temp folders removed) also runs when the bench is terminated."""
    if threading.current_thread() is not threading.main_thread():
        return job()

    def _exit(signum, frame):
        raise SystemExit(128 + signum)

    old = signal.signal(signal.SIGTERM, _exit)
    try:
        return job()
    finally:
        signal.signal(signal.SIGTERM, old)


def run_bench(args: argparse.Namespace) -> int:
    """``fleetloop bench``: run, print the table, write ``args.out``; 0 on success, 2 on a bad argument."""
    try:
        job = plan(args)
    except ValueError as exc:
        print(f"fleetloop bench: {exc}", file=sys.stderr)
        return 2
    result = _with_sigterm_as_exit(job)
    print_table(result)
    path = write_json(result, args.out)
    log_progress(f"wrote {path}")
    return 0
