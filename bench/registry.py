"""Benchmarks that plug into ``fleetloop bench NAME`` by module (lazy: nothing is imported until used).

Each entry is ``name -> (module, help)``; the module exposes ``add_arguments(parser)`` (its flags,
``--out`` among them) and ``main(args) -> int`` (run, print a table, write the JSON; 2 on a bad
argument). ``ingest``, ``weights``, ``async`` and ``load`` are wired in :mod:`services.cli` directly.
"""

from __future__ import annotations

#: name -> (module with add_arguments/main, one-line help). Add one line per benchmark.
BENCHES: dict[str, tuple[str, str]] = {
}
