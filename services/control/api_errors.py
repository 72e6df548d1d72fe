"""How the control plane's API answers errors (installed by :func:`install_error_handlers`).

Contracts:

- The FleetloopError hierarchy is mapped to HTTP here and only here, as ``{"error": {"code",
  "message", "field", "value"}}`` (401 adds ``WWW-Authenticate: Bearer``; 5xx are logged).
- Request validation errors keep FastAPI's 422 body, ``{"detail": [{"type", "loc", "msg", "input"}]}``,
  where ``loc`` is the full field path (``["body", "algorithm_params", "lr"]``, ``["query", "after"]``).
- Authentication and authorization come before body parsing: a body that is not valid JSON or not
  UTF-8 is answered 401 (no or bad key) or 403 (role too low) when the route needs a key, and only
  an allowed caller gets the parse error (400 for undecodable bytes, 422 ``json_invalid``).
- 405 lists in ``Allow`` every method the path supports (all routes of that path), not only the
  methods of the first route that matched it.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler, request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from fleetloop.errors import FleetloopError
from fleetloop.logs import event, get_logger

log = get_logger("services.api")


class ErrorBody(BaseModel):
    code: str = Field(description="Error class (gRPC status name).")
    message: str = Field(description="What is wrong, naming the field and value.")
    field: str | None = Field(None, description="Offending field.")
    value: Any = Field(None, description="Offending value (secrets are never echoed).")


class ErrorResponse(BaseModel):
    error: ErrorBody


ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorResponse} for code in (401, 403, 404, 409, 503)}


def error_response(request: Request, exc: FleetloopError) -> JSONResponse:
    """The API's JSON error body for ``exc`` with its HTTP status."""
    value = exc.value if isinstance(exc.value, (str, int, float, bool, type(None))) else str(exc.value)
    headers = {"WWW-Authenticate": "Bearer"} if exc.http_status == 401 else None
    if exc.http_status >= 500:
        event(log, "request_failed", level=40, path=request.url.path, error=str(exc)[:300])
    return JSONResponse({"error": {"code": exc.code, "message": str(exc), "field": exc.field, "value": value}},
                        status_code=exc.http_status, headers=headers)


def allowed_methods(request: Request) -> list[str]:
    """Every HTTP method some route of the app serves at ``request``'s path, sorted."""
    scope = {**request.scope, "type": "http"}
    methods: set[str] = set()
    for route in request.app.router.routes:
        route_methods = getattr(route, "methods", None)
        if route_methods and route.matches(scope)[0] != Match.NONE:
            methods |= set(route_methods)
    return sorted(methods)


async def authenticate_first(request: Request) -> Response | None:
    """Run the matched route's key check (the ``services.control.access.require`` dependency) before a body
    error is reported: its 401/403 response when the caller may not use the route, else None."""
    dependant = getattr(request.scope.get("route"), "dependant", None)
    for dep in dependant.dependencies if dependant is not None else []:
        if getattr(dep.call, "required_role", None) is not None:
            try:
                await run_in_threadpool(dep.call, request, None)
            except FleetloopError as exc:
                return error_response(request, exc)
    return None


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers described in the module docstring on ``app``."""

    @app.exception_handler(FleetloopError)
    async def _fleetloop_error(request: Request, exc: FleetloopError) -> JSONResponse:
        return error_response(request, exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 405:
            exc.headers = {**(exc.headers or {}), "Allow": ", ".join(allowed_methods(request))}
        elif exc.status_code == 400:  # FastAPI: the body could not be decoded (e.g. not UTF-8)
            denied = await authenticate_first(request)
            if denied is not None:
                return denied
        return await http_exception_handler(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
        if any(e.get("type") == "json_invalid" for e in exc.errors()):  # raised before the route's dependencies ran
            denied = await authenticate_first(request)
            if denied is not None:
                return denied
        return await request_validation_exception_handler(request, exc)
