"""gRPC channel options every fleetloop client uses (actors, rollout servers, benchmark clients).

Kept apart from :mod:`fleetloop.client.runtime` so a process can open a channel with the actors' exact
settings without importing torch (benchmark raw clients, where memory is the limit).
"""

from __future__ import annotations


def channel_options(max_message_bytes: int = 16 << 20, max_send_message_bytes: int = -1) -> list[tuple[str, int]]:
    """gRPC channel options shared by actors: message limits, keepalive, reconnect backoff.

    ``max_message_bytes`` caps what the channel receives. Sending is not capped by the channel
    (``max_send_message_bytes`` -1, gRPC's own client default): the learner announces its limit
    (``RunConfig.max_message_bytes``) only in the handshake, after the channel exists, and the actor
    keeps every message within that announced limit itself (``fleetloop.client.limits``), so a fixed send cap
    here could only refuse, locally and without a pushback, a chunk the learner would accept."""
    return [("grpc.max_receive_message_length", max_message_bytes), ("grpc.max_send_message_length", max_send_message_bytes),
            ("grpc.keepalive_time_ms", 20_000), ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1), ("grpc.http2.max_pings_without_data", 0),
            ("grpc.initial_reconnect_backoff_ms", 200), ("grpc.max_reconnect_backoff_ms", 5_000)]
