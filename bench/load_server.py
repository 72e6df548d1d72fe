"""The server side of the load bench, as its own OS process (so its RSS and CPU can be read by pid).

    python -m bench.load_server learner CONFIG.json   # the real learner body, no Ray
    python -m bench.load_server raw --workers N      # bench.common.RawServer (bytes in, 2-byte acks)

``learner`` runs ``learner.process.build_learner(...).serve()`` (LearnerCore: ingest log, ledger, replay,
staleness gate, sampler, training thread, weight store, checkpoints; the gRPC server; /metrics):
exactly what a Ray worker runs for a job, minus Ray. ``raw`` serves the raw baseline and exports
its message and byte counters on /metrics as ``fleetloop_bench_raw_messages_total`` /
``fleetloop_bench_raw_bytes_total`` so both are scraped the same way.

Protocol with the parent: one JSON line on stdout once serving (``port``, ``metrics_port``,
``pid``); the process stops on SIGTERM, SIGINT or end of stdin (so it never outlives a parent that
died), then prints one JSON line with its final state (learner: ``audit()`` and status totals;
raw: counters) and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading


def _wait_for_stop() -> None:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())

    def stdin_closed() -> None:
        try:
            while sys.stdin.readline():
                pass
        finally:
            stop.set()

    threading.Thread(target=stdin_closed, daemon=True).start()
    stop.wait()


def _serve_learner(config_path: str) -> dict:
    from learner.process import build_learner

    with open(config_path) as fh:
        impl = build_learner(fh.read()).serve()
    print(json.dumps({"port": impl.port, "metrics_port": impl.metrics_port, "pid": os.getpid()}), flush=True)
    _wait_for_stop()
    audit = impl.core.audit()
    status = impl.stop()
    keep = ("version", "step", "ingested_steps", "episodes_total", "staleness_max", "staleness_max_autonomous", "gate")
    return {"audit": audit, "status": {k: status.get(k) for k in keep},
            "ledger_episodes": len(impl.core.ingestor.ledger), "open_episodes": len(impl.core.ingestor.open_episodes())}


def _serve_raw(workers: int) -> dict:
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.core import CounterMetricFamily

    from bench.common import RawServer

    server = RawServer(workers=workers)

    class _Counters:
        def collect(self):
            messages, nbytes = server.counters()
            yield CounterMetricFamily("fleetloop_bench_raw_messages", "Messages received by the raw server.", value=messages)
            yield CounterMetricFamily("fleetloop_bench_raw_bytes", "Bytes received by the raw server.", value=nbytes)

    registry = CollectorRegistry()
    registry.register(_Counters())
    http, _thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    with server:
        print(json.dumps({"port": server.port, "metrics_port": int(http.server_port), "pid": os.getpid()}), flush=True)
        _wait_for_stop()
    messages, nbytes = server.counters()
    http.shutdown()
    return {"messages": messages, "bytes": nbytes}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.load_server")
    sub = p.add_subparsers(dest="mode", required=True)
    lr = sub.add_parser("learner")
    lr.add_argument("config", help="LearnerConfig JSON file")
    rw = sub.add_parser("raw")
    rw.add_argument("--workers", type=int, default=64)
    args = p.parse_args(argv)
    final = _serve_learner(args.config) if args.mode == "learner" else _serve_raw(args.workers)
    print(json.dumps(final, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
