"""Argument namespaces for calling benchmark mains directly from tests (tiny configurations)."""

from __future__ import annotations

import argparse
from pathlib import Path


def ingest_args(tmp_path: Path, **over) -> argparse.Namespace:
    """``fleetloop bench ingest`` arguments: the IngestConfig defaults shrunk to one short slice of one
    actor, writing into ``tmp_path``; ``over`` replaces any of them."""
    from bench.ingest import IngestConfig

    base = {name: field.default for name, field in IngestConfig.model_fields.items()}
    base.update(actors="1", seconds=0.6, slices=1, warmup_s=0.3, profile_seconds=0.0, processes=1, episode_steps=32,
                out=str(tmp_path / "nested" / "ingest.json"))
    return argparse.Namespace(**(base | over))


def load_args(tmp_path: Path, **over) -> argparse.Namespace:
    """``fleetloop bench load`` arguments: 4 actors for a few seconds against a learner it starts itself,
    writing ``tmp_path/load.json``; ``over`` replaces any of them."""
    base = dict(actors=4, minutes=0.12, baseline_minutes=0.08, chunk_steps=25, hz=100.0, processes=2, max_inflight=32,
                learner=None, learner_pid=None, learner_metrics=None, job="bench-load", tasks=None, token=None, tls_ca=None,
                no_training=False, max_updates_per_s=5.0, online_capacity=None, grpc_workers=None, seed=0, no_progress=True,
                out=str(tmp_path / "load.json"))
    return argparse.Namespace(**(base | over))
