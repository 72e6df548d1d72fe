"""Robot credentials checked by the learner on every RPC.

The learner asks an :class:`Authenticator`; the local default is :class:`StaticTokens` (the job's
configured token list). The control plane plugs in a Redis-backed implementation. Tokens are
compared by sha256 in constant time and never logged; logs carry :func:`token_id` instead.

A check returns a :class:`Principal`: the credential's name and the actor ids it may act as
(glob patterns). An enrolled credential acts as the actors its enrollment names (``actors``, by
default exactly its ``name``); a static ``robot_tokens`` entry is a fleet-wide secret (any actor
id). The servicer binds every stream to one actor the principal may act as (PERMISSION_DENIED
otherwise). Authenticators whose credentials can be revoked while a stream is open say so with
``revocable = True``; the servicer re-checks open streams' credentials and closes revoked ones.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
from typing import Iterable, Protocol

from fleetloop.errors import Unauthenticated


class CredentialRevoked(Unauthenticated):
    """The credential was valid once and has been revoked (UNAUTHENTICATED at the boundary)."""


class Principal(str):
    """Who a credential belongs to: a ``str`` (its name, for logs and the fleet table) that also knows
    the actor ids it may act as: ``actors`` glob patterns, or None for any actor."""

    actors: tuple[str, ...] | None

    def __new__(cls, name: str, actors: Iterable[str] | None = None) -> "Principal":
        obj = super().__new__(cls, name)
        obj.actors = tuple(actors) if actors is not None else None
        return obj

    def may_act_as(self, actor_id: str) -> bool:
        """True when this principal may send and receive as ``actor_id``."""
        return self.actors is None or any(fnmatch.fnmatchcase(actor_id, p) for p in self.actors)


def token_id(token: str) -> str:
    """Short non-secret identifier of a token (first 8 hex of its sha256) for logs."""
    return hashlib.sha256(token.encode()).hexdigest()[:8]


class Authenticator(Protocol):
    """Checks a credential for a job; returns its Principal or raises Unauthenticated."""

    enabled: bool     # False: every caller is accepted as "anonymous" (no credentials configured)
    revocable: bool   # True: a credential may be revoked while its streams are open (re-checked)

    def check(self, token: str | None, job_id: str) -> Principal: ...


class StaticTokens:
    """Accepts any of a fixed set of tokens (fleet-wide: any actor id); with an empty set,
    authentication is disabled (the learner then binds loopback only unless ``allow_unauthenticated``)."""

    revocable = False

    def __init__(self, tokens: Iterable[str]) -> None:
        self._hashes = [hashlib.sha256(t.encode()).digest() for t in tokens]

    @property
    def enabled(self) -> bool:
        return bool(self._hashes)

    def check(self, token: str | None, job_id: str) -> Principal:
        if not self._hashes:
            return Principal("anonymous")
        if not token:
            raise Unauthenticated("missing credential (metadata 'authorization: Bearer <token>')", field="authorization")
        digest = hashlib.sha256(token.encode()).digest()
        if not any(hmac.compare_digest(digest, h) for h in self._hashes):
            raise Unauthenticated(f"credential {token_id(token)} is not valid for job {_job(job_id, token)}", field="authorization",
                                  value=token_id(token))
        return Principal(f"robot-token-{token_id(token)}")


def _job(job_id: str, token: str) -> str:
    """The job as named in a credential error; never the token itself (a caller may send it as job id)."""
    return repr(job_id) if job_id != token else "(the requested job)"


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
    check fails closed with UNAVAILABLE (actors retry), never open. The principal acts as the
    enrollment's ``actors`` patterns (records without the field: exactly its ``name``)."""

    def __init__(self, redis_client, fallback: StaticTokens | None = None) -> None:
        self._redis = redis_client
        self._fallback = fallback

    enabled = True
    revocable = True

    def check(self, token: str | None, job_id: str) -> Principal:
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
        if record is None:
            raise Unauthenticated(f"credential {token_id(token)} is not enrolled for job {_job(job_id, token)}", field="authorization",
                                  value=token_id(token))
        if record.get("revoked_at"):
            raise CredentialRevoked(f"credential {token_id(token)} is revoked for job {_job(job_id, token)}", field="authorization",
                                    value=token_id(token))
        actors = record.get("actors") or [record.get("name") or ""]
        return Principal(f"enrollment-{record.get('id', token_id(token))}", actors)
