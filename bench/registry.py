"""Benchmarks that plug into ``fleetloop bench NAME`` by module.

Each entry is ``name -> (module, help)``; the module exposes ``add_arguments(parser)`` (its flags,
``--out`` among them) and ``main(args) -> int`` (run, write the JSON, print a table; 2 on a bad
argument: :func:`bench.runner.run_reported`). :mod:`bench.cli` (which the ``fleetloop`` parser loads
through the ``fleetloop.cli`` entry point) imports every module listed here when the parser is built,
so their top-level imports stay light (torch, ray, grpc inside functions). ``load`` is wired in
:mod:`bench.cli` directly.
"""

from __future__ import annotations

#: name -> (module with add_arguments/main, one-line help). Add one line per benchmark.
BENCHES: dict[str, tuple[str, str]] = {
    "ingest": ("bench.ingest", "ingest steps/s and MB/s, 1-32 actors, state / images / compressed images / LLM groups, "
                               "vs raw gRPC"),
    "weights": ("bench.weights", "weight delivery (publish -> all robots verified and running) vs raw gRPC, sizes x fan-out"),
    "async": ("bench.llm_async", "LLM GRPO: synchronous (eta=0) vs asynchronous (eta>0) rollouts, wall clock per step and "
                                 "to a reward, idle shares, staleness"),
    "utilisation": ("bench.utilisation", "learner idle share, updates/s and staleness under a fast and a slow fleet, vs no fleet"),
    "latency": ("bench.latency", "step produced on an actor -> trainable on the learner, P50/P99, vs raw gRPC one-way"),
    "learner-scaling": ("bench.learner_scaling", "learner samples/s, 1 and 2 Ray Train DDP workers (gloo; NCCL on CUDA) vs one process"),
    "render": ("bench.render", "camera observations of the simulated robot: ms per frame per camera, CPU per step with "
                               "cameras + JPEG, JPEG bytes, vs a state-only step"),
}
