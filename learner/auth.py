"""Robot credentials checked by the learner on every RPC.

The learner asks an :class:`Authenticator`; the local default is :class:`StaticTokens` (the job's
configured token list). The control plane plugs in a Redis-backed implementation. Tokens are
compared by sha256 in constant time and never logged; logs carry :func:`token_id` instead.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Iterable, Protocol

from fleetloop.errors import Unauthenticated


def token_id(token: str) -> str:
    """Short non-secret identifier of a token (first 8 hex of its sha256) for logs."""
    return hashlib.sha256(token.encode()).hexdigest()[:8]


class Authenticator(Protocol):
    """Checks a credential for a job; returns a principal name or raises Unauthenticated."""

    def check(self, token: str | None, job_id: str) -> str: ...


class StaticTokens:
    """Accepts any of a fixed set of tokens; with an empty set, authentication is disabled."""

    def __init__(self, tokens: Iterable[str]) -> None:
        self._hashes = [hashlib.sha256(t.encode()).digest() for t in tokens]

    @property
    def enabled(self) -> bool:
        return bool(self._hashes)

    def check(self, token: str | None, job_id: str) -> str:
        if not self._hashes:
            return "anonymous"
        if not token:
            raise Unauthenticated("missing credential (metadata 'authorization: Bearer <token>')", field="authorization")
        digest = hashlib.sha256(token.encode()).digest()
        if not any(hmac.compare_digest(digest, h) for h in self._hashes):
            raise Unauthenticated(f"credential {token_id(token)} is not valid for job {job_id!r}", field="authorization",
                                  value=token_id(token))
        return f"robot-token-{token_id(token)}"


def bearer(metadata: Iterable[tuple[str, str]]) -> str | None:
    """The token from ``authorization: Bearer <token>`` metadata, if present."""
    for key, value in metadata:
        if key.lower() == "authorization" and value.lower().startswith("bearer "):
            return value[7:].strip()
    return None


class EnrollmentTokens:
    """Robot tokens enrolled through the control plane: sha256 digests in the job's Redis hash
    ``fl:job:{id}:enrollments`` (see :mod:`fleetloop.redis_keys`). Checked on every RPC that opens,
    so a revoked token stops working at its next handshake or stream. Redis unreachable -> the
    check fails closed with UNAVAILABLE (actors retry), never open."""

    def __init__(self, redis_client, fallback: StaticTokens | None = None) -> None:
        self._redis = redis_client
        self._fallback = fallback

    enabled = True

    def check(self, token: str | None, job_id: str) -> str:
        import json

        import redis

        from fleetloop import redis_keys as keys
        from fleetloop.errors import Unavailable

        if not token:
            raise Unauthenticated("missing credential (metadata 'authorization: Bearer <token>')", field="authorization")
        if self._fallback is not None and self._fallback.enabled:
            try:
                return self._fallback.check(token, job_id)
            except Unauthenticated:
                pass
        try:
            raw = self._redis.hget(keys.enrollments(job_id), keys.secret_hash(token))
        except redis.RedisError as exc:
            raise Unavailable(f"credential store unreachable: {type(exc).__name__}", field="authorization") from None
        record = json.loads(raw) if raw else None
        if record is None or record.get("revoked_at"):
            state = "revoked" if record else "not enrolled"
            raise Unauthenticated(f"credential {token_id(token)} is {state} for job {job_id!r}", field="authorization",
                                  value=token_id(token))
        return f"enrollment-{record.get('id', token_id(token))}"
