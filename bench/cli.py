"""``fleetloop bench ...``: the benchmark subcommands, added to the ``fleetloop`` parser through the
``fleetloop.cli`` entry point group (``bench = "bench.cli:add_commands"`` in pyproject), so that
services never import bench. ``load`` is wired here; every other benchmark comes from
:data:`bench.registry.BENCHES` (module with ``add_arguments``/``main``)."""

from __future__ import annotations

import argparse
import importlib
import os

from bench.registry import BENCHES


def _cmd_bench_load(args: argparse.Namespace) -> int:
    from bench.load import main
    return main(args)


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``bench`` and its subcommands to the top-level ``fleetloop`` subparsers."""
    b = subparsers.add_parser("bench", help="benchmarks (print a table, write JSON)")
    bsub = b.add_subparsers(dest="bench_cmd", required=True)
    bl = bsub.add_parser("load", help="a fleet of lightweight actors against one learner: errors, ack latency, RSS, "
                                      "ingest rate, vs raw gRPC")
    bl.add_argument("--actors", type=int, default=200, help="lightweight actors (one stream and connection each)")
    bl.add_argument("--minutes", type=float, default=5.0, help="length of the fleetloop phase")
    bl.add_argument("--baseline-minutes", type=float, default=None, help="length of the raw gRPC phase (default min(minutes, 1))")
    bl.add_argument("--chunk-steps", type=int, default=50)
    bl.add_argument("--hz", type=float, default=30.0, help="steps per second per actor (0 = as fast as the window allows)")
    bl.add_argument("--processes", type=int, default=None, help="OS processes driving the actors (default min(actors, 4))")
    bl.add_argument("--max-inflight", type=int, default=32, help="unacknowledged chunks per actor")
    bl.add_argument("--learner", default=None, help="HOST:PORT of an existing learner (default: start one)")
    bl.add_argument("--learner-pid", type=int, default=None, help="pid of --learner for RSS (default: found from the port)")
    bl.add_argument("--learner-metrics", default=None, help="HOST:PORT of --learner's /metrics")
    bl.add_argument("--job", default="bench-load", help="job id (the learner's, with --learner)")
    bl.add_argument("--tasks", default=None, help="comma-separated task ids (default reach, push, pick-place, drawer-open)")
    bl.add_argument("--token", default=os.environ.get("FLEETLOOP_ROBOT_TOKEN"), help="robot token for --learner")
    bl.add_argument("--tls-ca", default=None, help="CA file: connect to --learner with TLS")
    bl.add_argument("--no-training", action="store_true", help="the started learner does not train during the load")
    bl.add_argument("--max-updates-per-s", type=float, default=10.0, help="training rate cap of the started learner")
    bl.add_argument("--online-capacity", type=int, default=None, help="started learner's online ring per task, steps")
    bl.add_argument("--grpc-workers", type=int, default=None, help="started learner's gRPC threads (default 2 x actors + 16)")
    bl.add_argument("--seed", type=int, default=0)
    bl.add_argument("--no-progress", action="store_true", help="no progress bar")
    bl.add_argument("--out", required=True)
    bl.set_defaults(func=_cmd_bench_load)

    for name, (module, help_text) in BENCHES.items():
        bp = bsub.add_parser(name, help=help_text)
        importlib.import_module(module).add_arguments(bp)
        bp.set_defaults(func=lambda a, module=module: importlib.import_module(module).main(a))
