"""REST authentication and roles.

Every ``/v1`` request carries ``Authorization: Bearer <API key>``. Keys have one role:
``viewer`` (read everything), ``operator`` (also submit and steer jobs, enroll robots) or
``admin`` (also manage API keys). A missing/unknown/revoked key is 401, a role too low 403.
Keys are looked up by sha256 digest; the plain key never reaches a log.
"""

from __future__ import annotations

from typing import Callable

from fastapi import Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from fleetloop.errors import PermissionDenied
from services.control.state import ROLE_RANK, ApiKey, Role, StateStore


def bearer_key(request: Request) -> str | None:
    value = request.headers.get("authorization", "")
    if value.lower().startswith("bearer "):
        return value[7:].strip() or None
    return None


_BEARER = HTTPBearer(auto_error=False, scheme_name="apiKey", description="API key: `Authorization: Bearer <key>`.")


def require(role: Role) -> Callable[..., ApiKey]:
    """FastAPI dependency: the caller's key record, if its role is at least ``role``. The returned
    function carries ``required_role`` so error handlers can run the same check before reporting a
    body that could not be parsed (authentication first)."""

    def dependency(request: Request, creds: HTTPAuthorizationCredentials | None = Security(_BEARER)) -> ApiKey:
        store: StateStore = request.app.state.store
        key = store.check_api_key(creds.credentials if creds else bearer_key(request))
        if ROLE_RANK[key.role] < ROLE_RANK[role]:
            raise PermissionDenied(f"role {key.role!r} of key {key.id} may not do this (needs {role!r})", field="role",
                                   value=key.role)
        request.state.principal = key
        return key

    dependency.__name__ = f"require_{role}"
    dependency.required_role = role  # type: ignore[attr-defined]
    return dependency
