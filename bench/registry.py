"""Benchmarks that plug into ``fleetloop bench NAME`` by module (lazy: nothing is imported until used).

Each entry is ``name -> (module, help)``; the module exposes ``add_arguments(parser)`` (its flags,
``--out`` among them) and ``main(args) -> int`` (run, print a table, write the JSON; 2 on a bad
argument). ``ingest``, ``weights``, ``async`` and ``load`` are wired in :mod:`services.cli` directly.
"""

from __future__ import annotations

#: name -> (module with add_arguments/main, one-line help). Add one line per benchmark.
BENCHES: dict[str, tuple[str, str]] = {
    "utilisation": ("bench.utilisation", "learner idle share, updates/s and staleness under a fast and a slow fleet, vs no fleet"),
    "latency": ("bench.latency", "step produced on an actor -> trainable on the learner, P50/P99, vs raw gRPC one-way"),
    "learner-scaling": ("bench.learner_scaling", "learner samples/s, 1 and 2 Ray Train DDP workers (gloo; NCCL on CUDA) vs one process"),
}
