"""Conversion of the config's spec models to wire ``TensorSpec`` messages."""

from __future__ import annotations

from fleetloop.codec import make_spec


def to_proto_specs(models) -> list:
    """``SpecModel`` list -> ``fleetloop.v1.TensorSpec`` list (same order)."""
    return [make_spec(m.name, m.dtype, m.shape, m.low, m.high) for m in models]
