"""A small REST client of the control plane (used by ``fleetloop job ...``).

Errors come back as :class:`~fleetloop.errors.FleetloopError` subclasses built from the API's
error body (or FastAPI's 422 field list), so the CLI prints the same message the API gave.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import httpx

from fleetloop.errors import (FailedPrecondition, FleetloopError, InvalidArgument, NotFound, PermissionDenied,
                              Unauthenticated, Unavailable)

T = TypeVar("T")
_BY_STATUS = {401: Unauthenticated, 403: PermissionDenied, 404: NotFound, 409: FailedPrecondition, 422: InvalidArgument,
              503: Unavailable}


def load_spec(path: Path) -> dict[str, Any]:
    """A JobSpec from a YAML or JSON file (validated by the API, which names bad fields)."""
    text = Path(path).read_text()
    if Path(path).suffix.lower() == ".json":
        return json.loads(text)
    import yaml
    doc = yaml.safe_load(text)
    if not isinstance(doc, dict):
        raise InvalidArgument(f"{path} must hold a mapping (a JobSpec), got {type(doc).__name__}", field="file", value=str(path))
    return doc


def validation_problem(detail: dict[str, Any]) -> str:
    """One entry of FastAPI's 422 ``detail`` as ``path: message (got value)``: the full field path
    without its ``body``/``query``/``path`` prefix (``algorithm_params.beta_typo``; the prefix alone
    when the problem is the whole body), the message with pydantic's "Value error, " dropped and a
    lower-case first letter, and the offending value when it is a short scalar not already quoted."""
    loc = [str(p) for p in detail.get("loc") or []]
    if detail.get("type") == "json_invalid":
        return f"body: invalid JSON at character {loc[-1] if len(loc) > 1 else '?'} ({(detail.get('ctx') or {}).get('error', '')})"
    path = ".".join(loc[1:]) or (loc[0] if loc else "request")
    msg = str(detail.get("msg", "invalid")).removeprefix("Value error, ")
    if len(msg) > 1 and msg[1].islower():
        msg = msg[0].lower() + msg[1:]
    value = detail.get("input")
    if detail.get("type") != "missing" and isinstance(value, (str, int, float, bool)) and len(repr(value)) <= 80 \
            and repr(value) not in msg:
        msg += f" (got {value!r})"
    return f"{path}: {msg}"


class ApiClient:
    """Thin wrapper over httpx with the API key in the Authorization header."""

    def __init__(self, url: str, key: str | None, timeout: float = 60.0, verify: bool | str = True) -> None:
        self.http = httpx.Client(base_url=url.rstrip("/"), timeout=timeout, verify=verify,
                                 headers={"Authorization": f"Bearer {key}"} if key else {})

    def healthy(self) -> bool:
        try:
            return self.http.get("/healthz").status_code == 200
        except httpx.HTTPError:
            return False

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            r = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise Unavailable(f"control plane at {self.http.base_url} unreachable: {exc}", field="api", value=str(self.http.base_url)) from None
        if r.status_code < 300:
            return r.json()
        raise self.error(r)

    def error(self, r: httpx.Response) -> FleetloopError:
        """The FleetloopError of a failed response (its body read), as :meth:`call` raises it."""
        try:
            body = r.json()
        except ValueError:
            body = {}
        field = value = None
        if isinstance(body.get("detail"), list):  # FastAPI validation error: name every field path
            problems = [d for d in body["detail"] if isinstance(d, dict)]
            msg = "; ".join(validation_problem(d) for d in problems)
            if problems:  # the first problem's path (without the leading "body") and the value given
                field = ".".join(str(p) for p in problems[0].get("loc", []) if p != "body") or None
                value = problems[0].get("input")
        else:
            err = body.get("error") or {}
            msg = err.get("message") or r.text[:300]
            field, value = err.get("field"), err.get("value")
        return _BY_STATUS.get(r.status_code, FleetloopError)(f"HTTP {r.status_code}: {msg}", field=field, value=value)

    def download(self, path: str, sink: Callable[[Iterator[bytes], httpx.Headers], T], chunk_bytes: int = 1 << 20) -> T:
        """Stream ``GET path`` into ``sink(pieces, headers)`` (never the whole body in memory) and return
        what it returns; an error status raises like :meth:`call`."""
        try:
            with self.http.stream("GET", path) as r:
                if r.status_code >= 300:
                    r.read()
                    raise self.error(r)
                return sink(r.iter_bytes(chunk_bytes), r.headers)
        except httpx.HTTPError as exc:
            raise Unavailable(f"control plane at {self.http.base_url}: {path}: {exc}", field="api",
                              value=str(self.http.base_url)) from None

    def submit(self, spec: dict[str, Any]) -> dict[str, Any]:
        return self.call("POST", "/v1/jobs", json=spec)

    def jobs(self) -> list[dict[str, Any]]:
        return self.call("GET", "/v1/jobs")

    def job(self, job_id: str) -> dict[str, Any]:
        return self.call("GET", f"/v1/jobs/{job_id}")

    def action(self, job_id: str, action: str) -> dict[str, Any]:
        return self.call("POST", f"/v1/jobs/{job_id}/{action}")

    def policy_action(self, job_id: str, version: int | None, action: str) -> dict[str, Any]:
        path = f"/v1/jobs/{job_id}/policies/unpin" if action == "unpin" else f"/v1/jobs/{job_id}/policies/{version}/{action}"
        return self.call("POST", path)

    def releases(self, job_id: str) -> dict[str, Any]:
        return self.call("GET", f"/v1/jobs/{job_id}/releases")

    def release_action(self, job_id: str, action: str) -> dict[str, Any]:
        """``action`` promote or abort the job's open release candidate."""
        return self.call("POST", f"/v1/jobs/{job_id}/releases/{action}")

    def set_rollout(self, job_id: str, policy: dict[str, Any]) -> dict[str, Any]:
        return self.call("PUT", f"/v1/jobs/{job_id}/rollout", json=policy)

    def enroll(self, job_id: str, name: str, actors: list[str] | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"name": name} if actors is None else {"name": name, "actors": actors}
        return self.call("POST", f"/v1/jobs/{job_id}/enrollments", json=body)

    def actors(self, job_id: str) -> list[dict[str, Any]]:
        return self.call("GET", f"/v1/jobs/{job_id}/actors")
