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
