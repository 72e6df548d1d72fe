"""The control plane's REST API (FastAPI) and the dashboard it serves.

Routes live under ``/v1`` (OpenAPI at ``/openapi.json``); ``/healthz`` (process up) and
``/readyz`` (Redis reachable) need no key; ``/`` is the dashboard. Errors (:mod:`services.control.api_errors`):
the FleetloopError hierarchy is mapped to HTTP there and only there, as ``{"error": {"code",
"message", "field", "value"}}``; request validation errors are FastAPI's 422 with the field paths;
the key is checked before a body that cannot be parsed is reported; 405 lists every allowed method.

Operator commands on a running learner (pause, resume, pin, unpin, keep, rollback, releases) are queued in Redis
for the learner's control agent; the API waits up to ``command_timeout_s`` for the result (200),
else answers 202 with the queued command's id (the learner runs it when it next polls).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import AfterValidator, BaseModel, Field

from fleetloop.errors import FailedPrecondition, FleetloopError, NotFound
from fleetloop.logs import event, get_logger
from services.control.access import require
from services.control.api_errors import ERRORS, install_error_handlers
from services.control.job_views import ActorRow, learner_report
from services.control.jobspec import JobSpec
from services.control.launchers.base import Launcher
from services.control.policy_routes import install_policy_routes
from services.control.release_routes import install_release_routes, releases_view
from services.control.state import TERMINAL_STATES, ApiKey, Enrollment, JobRecord, Role, StateStore

log = get_logger("services.api")
STATIC = Path(__file__).parent / "dashboard"
JOB_ID = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


STREAM_ID_PART_MAX = 2**64 - 1  # a Redis stream id is two unsigned 64-bit integers, "<ms>-<seq>"


def _stream_cursor(value: str) -> str:
    """``value`` ('-' or '<ms>-<seq>', pattern already checked) if both parts fit Redis's unsigned
    64-bit stream id parts; else ValueError naming ``after`` and the value (FastAPI's 422)."""
    if value != "-" and any(int(part) > STREAM_ID_PART_MAX for part in value.split("-")):
        raise ValueError(f"after={value!r} is out of range: a Redis stream id is '<ms>-<seq>', "
                         f"each part at most {STREAM_ID_PART_MAX}")
    return value


EventCursor = Annotated[str, Query(max_length=64, pattern=r"^(-|\d+-\d+)$",
                                   description="Stream id of the last event seen (exclusive); '-' = from the start."),
                        AfterValidator(_stream_cursor)]


# -- response models -------------------------------------------------------------------------
class JobView(JobRecord):
    """A job record plus what its learner last reported."""

    learner_alive: bool = Field(description="The learner's heartbeat is fresh.")
    heartbeat_age_s: float | None = Field(None, description="Seconds since the learner's last report.")
    status: dict[str, Any] | None = Field(None, description="The learner's newest status snapshot.")


class PolicyVersion(BaseModel):
    version: int
    step: int = Field(description="Learner step that produced it.")
    published_at: float
    sha256: str
    size_bytes: int
    pinned: bool = Field(description="The fleet is pinned to this version.")
    kept: bool = Field(False, description="Kept: weight retention never deletes it (POST/DELETE .../keep).")
    evaluation: dict[str, Any] | None = Field(None, description="Evaluation results, when known.")


class PoliciesView(BaseModel):
    versions: list[PolicyVersion]
    latest: int | None = Field(description="Newest version.")
    pinned: int | None = Field(description="Pinned version (None = the fleet follows the newest).")
    fleet_version: int | None = Field(description="Version the fleet is told to run.")


class CommandResult(BaseModel):
    command_id: str
    op: str
    status: Literal["done", "queued"]
    result: dict[str, Any] | None = None


class EnrollmentRequest(BaseModel):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
                      description="Robot or fleet name for the credential.")
    actors: list[Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9*?_.:\[\]-]+$")]] | None = Field(
        None, max_length=64, description="Actor ids the token may act as (glob patterns, e.g. 'arm-*'); omitted = "
        "exactly `name`. The learner refuses other actor ids with PERMISSION_DENIED.")


class EnrollmentCreated(Enrollment):
    token: str = Field(description="The robot token: shown once, never again.")


class ApiKeyRequest(BaseModel):
    role: Role = Field(description="admin, operator or viewer.")
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.@-]*$", description="Who holds the key.")


class ApiKeyCreated(ApiKey):
    key: str = Field(description="The API key: shown once, never again.")


class FleetRequest(BaseModel):
    robots: int = Field(ge=0, le=64, description="Simulated robots to run.")


class EventRow(BaseModel):
    id: str
    type: str | None
    source: str | None
    data: dict[str, Any]
    time: float


class Health(BaseModel):
    status: str
    redis: bool | None = None


class WhoAmI(BaseModel):
    id: str
    name: str
    role: Role


def create_app(store: StateStore, launcher: Launcher, command_timeout_s: float = 15.0, reconcile: bool = True,
               stop_jobs_on_exit: bool = False, supervise: bool = True) -> FastAPI:
    """The API over ``store`` and ``launcher``. ``reconcile``: re-attach to / relaunch active jobs
    at startup (in the background); ``supervise``: relaunch learners that die (launchers that can);
    ``stop_jobs_on_exit``: stop this launcher's jobs at shutdown."""
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if reconcile:
            threading.Thread(target=_reconcile, args=(launcher,), name="reconcile", daemon=True).start()
        if supervise and hasattr(launcher, "start_supervisor"):
            launcher.start_supervisor()
        yield
        if stop_jobs_on_exit:
            await asyncio.to_thread(launcher.shutdown)

    app = FastAPI(title="fleetloop control plane", version="1", lifespan=lifespan,
                  description="Submit and steer fleet post-training jobs; enroll robots; watch the fleet.")
    app.state.store, app.state.launcher = store, launcher
    install_error_handlers(app)

    viewer, operator, admin = Depends(require("viewer")), Depends(require("operator")), Depends(require("admin"))

    def job_view(rec: JobRecord) -> JobView:
        alive, age, status = learner_report(store, rec)  # a stopped job: the final status its learner left
        if alive and status and rec.state in ("running", "paused") and status.get("time", 0.0) > rec.updated_at:
            # the learner's report is newer than the record: adopt what commands (maybe queued ones) changed
            want = {"paused": bool(status.get("paused")), "pinned": status.get("pinned"),
                    "state": "paused" if status.get("paused") else "running"}
            if any(getattr(rec, k) != v for k, v in want.items()):
                rec = store.update_job(rec.id, **want)
        return JobView(**rec.model_dump(), learner_alive=alive, heartbeat_age_s=age, status=status)

    def active_job(job_id: str) -> JobRecord:
        rec = store.get_job(job_id)
        if rec.state not in ("running", "paused"):
            raise FailedPrecondition(f"job {job_id!r} is {rec.state}, not running", field="state", value=rec.state)
        return rec

    def command(job_id: str, op: str, args: dict[str, Any] | None, key: ApiKey) -> CommandResult:
        cmd_id = store.push_command(job_id, op, args, by=key.id)
        result = store.wait_result(cmd_id, command_timeout_s)
        if result is None:
            return CommandResult(command_id=cmd_id, op=op, status="queued")
        if not result["ok"]:
            from fleetloop.errors import FleetloopError as E
            err = E(result.get("error", "command failed"))
            err.http_status = int(result.get("status", 409))
            err.code = {404: "NOT_FOUND", 422: "INVALID_ARGUMENT"}.get(err.http_status, "FAILED_PRECONDITION")
            raise err
        return CommandResult(command_id=cmd_id, op=op, status="done", result=result.get("result"))

    def reply(res: CommandResult) -> JSONResponse:
        return JSONResponse(res.model_dump(), status_code=200 if res.status == "done" else 202)

    # -- health --------------------------------------------------------------------------
    @app.get("/healthz", response_model=Health, tags=["health"])
    def healthz() -> Health:
        return Health(status="ok")

    @app.get("/readyz", response_model=Health, responses={503: {"model": Health}}, tags=["health"])
    def readyz() -> Any:
        ok = store.ping()
        return JSONResponse(Health(status="ok" if ok else "unavailable", redis=ok).model_dump(), status_code=200 if ok else 503)

    @app.get("/v1/whoami", response_model=WhoAmI, responses=ERRORS, tags=["auth"])
    def whoami(key: ApiKey = viewer) -> WhoAmI:
        return WhoAmI(id=key.id, name=key.name, role=key.role)

    # -- jobs ----------------------------------------------------------------------------
    @app.post("/v1/jobs", response_model=JobView, status_code=201, responses=ERRORS, tags=["jobs"])
    def submit(spec: JobSpec, key: ApiKey = operator) -> JobView:
        check = getattr(launcher, "validate", None)
        if check:
            check(spec)
        rec = store.create_job(spec, created_by=key.id)
        event(log, "job_submitted", job=rec.id, by=key.id)
        launcher.launch(rec)
        return job_view(store.get_job(rec.id))

    @app.get("/v1/jobs", response_model=list[JobView], responses=ERRORS, tags=["jobs"])
    def list_jobs(key: ApiKey = viewer) -> list[JobView]:
        return [job_view(r) for r in store.list_jobs()]

    @app.get("/v1/jobs/{job_id}", response_model=JobView, responses=ERRORS, tags=["jobs"])
    def get_job(job_id: str, key: ApiKey = viewer) -> JobView:
        return job_view(store.get_job(job_id))

    @app.post("/v1/jobs/{job_id}/pause", response_model=CommandResult, responses={**ERRORS, 202: {"model": CommandResult}},
              tags=["jobs"])
    def pause(job_id: str, key: ApiKey = operator) -> Any:
        active_job(job_id)
        res = command(job_id, "pause", None, key)
        if res.status == "done":  # a queued one reaches the record via the learner's report
            store.update_job(job_id, paused=True, state="paused")
        return reply(res)

    @app.post("/v1/jobs/{job_id}/resume", response_model=CommandResult, responses={**ERRORS, 202: {"model": CommandResult}},
              tags=["jobs"])
    def resume(job_id: str, key: ApiKey = operator) -> Any:
        active_job(job_id)
        res = command(job_id, "resume", None, key)
        if res.status == "done":  # a queued one reaches the record via the learner's report
            store.update_job(job_id, paused=False, state="running")
        return reply(res)

    @app.post("/v1/jobs/{job_id}/stop", response_model=JobView, status_code=202, responses=ERRORS, tags=["jobs"])
    def stop(job_id: str, key: ApiKey = operator) -> JobView:
        rec = store.get_job(job_id)
        if rec.state in TERMINAL_STATES or rec.state == "stopping":
            return job_view(rec)
        store.emit(job_id, "stop_requested", by=key.id)
        store.update_job(job_id, state="stopping")
        threading.Thread(target=_stop, args=(launcher, store, job_id), name=f"stop-{job_id}", daemon=True).start()
        return job_view(store.get_job(job_id))

    @app.post("/v1/jobs/{job_id}/fleet", response_model=JobView, responses=ERRORS, tags=["jobs"])
    def scale(job_id: str, body: FleetRequest, key: ApiKey = operator) -> JobView:
        active_job(job_id)
        launcher.scale_fleet(job_id, body.robots)
        return job_view(store.get_job(job_id))

    # -- policies ------------------------------------------------------------------------
    @app.get("/v1/jobs/{job_id}/policies", response_model=PoliciesView, responses=ERRORS, tags=["policies"])
    def policies(job_id: str, key: ApiKey = viewer) -> PoliciesView:
        rec = store.get_job(job_id)
        status = store.learner_status(job_id) or {}
        fresh = status.get("time", 0.0) > rec.updated_at  # else the record (just changed by a command) is newer
        pinned = status.get("pinned", rec.pinned) if fresh else rec.pinned
        evals = store.evaluations(job_id)
        rows = [PolicyVersion(**v, pinned=v["version"] == pinned, evaluation=evals.get(v["version"]))
                for v in store.versions(job_id)]
        return PoliciesView(versions=rows, latest=rows[-1].version if rows else None, pinned=pinned,
                            fleet_version=status.get("fleet_version"))

    def _version(job_id: str, version: int) -> None:
        if not store.version_exists(job_id, version):
            raise NotFound(f"unknown policy version {version} of job {job_id!r}", field="version", value=version)

    @app.post("/v1/jobs/{job_id}/policies/{version}/pin", response_model=CommandResult,
              responses={**ERRORS, 202: {"model": CommandResult}}, tags=["policies"])
    def pin(job_id: str, version: int, key: ApiKey = operator) -> Any:
        active_job(job_id)
        _version(job_id, version)
        res = command(job_id, "pin", {"version": version}, key)
        if res.status == "done":  # a queued one reaches the record via the learner's report
            store.update_job(job_id, pinned=version)
        return reply(res)

    @app.post("/v1/jobs/{job_id}/policies/unpin", response_model=CommandResult,
              responses={**ERRORS, 202: {"model": CommandResult}}, tags=["policies"])
    def unpin(job_id: str, key: ApiKey = operator) -> Any:
        active_job(job_id)
        res = command(job_id, "unpin", None, key)
        if res.status == "done":  # a queued one reaches the record via the learner's report
            store.update_job(job_id, pinned=None)
        return reply(res)

    @app.post("/v1/jobs/{job_id}/policies/{version}/evaluate", response_model=PolicyVersion, status_code=202,
              responses=ERRORS, tags=["policies"])
    def evaluate(job_id: str, version: int, trials: int = Query(20, ge=1, le=500), key: ApiKey = operator) -> PolicyVersion:
        """Evaluate a version on held-out seeds without an operator, in the background; the result
        appears in this version's ``evaluation`` (GET /policies) and as an ``evaluated`` event."""
        store.get_job(job_id)
        _version(job_id, version)
        launcher.evaluate(job_id, version, trials)
        row = next(v for v in policies(job_id, key).versions if v.version == version)
        return row

    @app.post("/v1/jobs/{job_id}/policies/{version}/rollback", response_model=CommandResult,
              responses={**ERRORS, 202: {"model": CommandResult}}, tags=["policies"])
    def rollback(job_id: str, version: int, key: ApiKey = operator) -> Any:
        """Continue training from ``version``: its weights are republished as a new version (and unpinned)."""
        active_job(job_id)
        _version(job_id, version)
        res = command(job_id, "rollback", {"version": version}, key)
        if res.status == "done":  # a queued one reaches the record via the learner's report
            store.update_job(job_id, pinned=None)
        return reply(res)

    install_policy_routes(app, store, launcher, viewer=viewer, operator=operator, active_job=active_job, command=command,
                          reply=reply, command_model=CommandResult)  # export (metadata, weights, tar) and keep
    install_release_routes(app, store, viewer=viewer, operator=operator, active_job=active_job, command=command, reply=reply,
                           command_model=CommandResult)  # releases: snapshot, promote, abort, rollout policy

    # -- fleet ---------------------------------------------------------------------------
    @app.get("/v1/jobs/{job_id}/actors", response_model=list[ActorRow], responses=ERRORS, tags=["fleet"])
    def actors(job_id: str, key: ApiKey = viewer) -> list[ActorRow]:
        store.get_job(job_id)
        return [ActorRow.model_validate(a) for a in store.actors(job_id)]

    @app.post("/v1/jobs/{job_id}/enrollments", response_model=EnrollmentCreated, status_code=201, responses=ERRORS,
              tags=["fleet"])
    def enroll(job_id: str, body: EnrollmentRequest, key: ApiKey = operator) -> EnrollmentCreated:
        rec = store.get_job(job_id)
        if rec.state in TERMINAL_STATES:
            raise FailedPrecondition(f"job {job_id!r} is {rec.state}", field="state", value=rec.state)
        token, enrollment = store.enroll(job_id, body.name, by=key.id, actors=body.actors)
        return EnrollmentCreated(**enrollment.model_dump(), token=token)

    @app.get("/v1/jobs/{job_id}/enrollments", response_model=list[Enrollment], responses=ERRORS, tags=["fleet"])
    def enrollments(job_id: str, key: ApiKey = viewer) -> list[Enrollment]:
        store.get_job(job_id)
        return store.enrollments(job_id)

    @app.delete("/v1/jobs/{job_id}/enrollments/{enrollment_id}", response_model=Enrollment, responses=ERRORS, tags=["fleet"])
    def revoke(job_id: str, enrollment_id: str, key: ApiKey = operator) -> Enrollment:
        store.get_job(job_id)
        return store.revoke_enrollment(job_id, enrollment_id, by=key.id)

    # -- observation ---------------------------------------------------------------------
    @app.get("/v1/jobs/{job_id}/events", response_model=list[EventRow], responses=ERRORS, tags=["observe"])
    def events(job_id: str, after: EventCursor = "-",
               limit: int = Query(200, ge=1, le=1000), key: ApiKey = viewer) -> list[EventRow]:
        store.get_job(job_id)
        return [EventRow(**e) for e in store.events(job_id, after, limit)]

    @app.get("/v1/jobs/{job_id}/series", response_model=list[dict[str, Any]], responses=ERRORS, tags=["observe"])
    def series(job_id: str, since: float = Query(0.0, ge=0, le=1e12), key: ApiKey = viewer) -> list[dict[str, Any]]:
        store.get_job(job_id)
        return store.series(job_id, since)

    @app.get("/v1/jobs/{job_id}/live", responses={**ERRORS, 200: {"content": {"text/event-stream": {}}}}, tags=["observe"])
    async def live(job_id: str, request: Request, interval: float = Query(1.0, ge=0.2, le=60),
                   key: ApiKey = viewer) -> StreamingResponse:
        """Server-sent events: one ``snapshot`` event per ``interval`` until the client goes away:
        the job, the actors, the policy summary with the versions published since the previous
        snapshot (and evaluated ones), the releases (as GET .../releases), new series points, new
        events (the first snapshot carries the whole series and the newest 500 events). Read it with fetch() so the key
        travels in the Authorization header, never in the URL."""
        store.get_job(job_id)

        async def gen():
            since, after, last_version = 0.0, "-", -1
            while not await request.is_disconnected():
                snap, since, after, last_version = await asyncio.to_thread(_snapshot, store, job_view, policies, key, job_id,
                                                                           since, after, last_version)
                yield f"event: snapshot\ndata: {json.dumps(snap)}\n\n"
                await asyncio.sleep(interval)

        return StreamingResponse(gen(), media_type="text/event-stream", headers={"Cache-Control": "no-store"})

    # -- API keys (admin) ------------------------------------------------------------------
    @app.post("/v1/apikeys", response_model=ApiKeyCreated, status_code=201, responses=ERRORS, tags=["auth"])
    def create_key(body: ApiKeyRequest, key: ApiKey = admin) -> ApiKeyCreated:
        plain, rec = store.create_api_key(body.role, body.name)
        event(log, "api_key_created", id=rec.id, role=rec.role, by=key.id)
        return ApiKeyCreated(**rec.model_dump(), key=plain)

    @app.get("/v1/apikeys", response_model=list[ApiKey], responses=ERRORS, tags=["auth"])
    def list_keys(key: ApiKey = admin) -> list[ApiKey]:
        return store.api_keys()

    @app.delete("/v1/apikeys/{key_id}", response_model=ApiKey, responses=ERRORS, tags=["auth"])
    def revoke_key(key_id: str, key: ApiKey = admin) -> ApiKey:
        return store.revoke_api_key(key_id)

    # -- dashboard -------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    def index() -> Response:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    if STATIC.exists():
        app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.middleware("http")
    async def _no_stale_assets(request: Request, call_next):
        response = await call_next(request)
        if request.url.path.startswith("/static/"):
            response.headers["Cache-Control"] = "no-cache"  # revalidate (ETag) so an upgrade is seen at once
        return response
    return app


def _snapshot(store: StateStore, job_view, policies, key: ApiKey, job_id: str, since: float, after: str, last_version: int):
    job = job_view(store.get_job(job_id)).model_dump()
    if job.get("status"):
        job["status"].pop("actors", None)  # the fleet table is sent once, as "actors"
    points = store.series(job_id, since)
    evs = store.events(job_id, after, 500) if after != "-" else store.last_events(job_id, 500)
    pols = policies(job_id, key).model_dump()
    newest = pols["versions"][-1]["version"] if pols["versions"] else last_version
    pols["versions"] = [v for v in pols["versions"] if v["version"] > last_version or v["evaluation"]]
    snap = {"job": job, "actors": store.actors(job_id), "policies": pols, "series": points, "events": evs, "role": key.role,
            "releases": releases_view(store, store.get_job(job_id)).model_dump(mode="json"), "time": time.time()}
    return snap, (points[-1]["t"] if points else since), (evs[-1]["id"] if evs else after), newest


def _stop(launcher: Launcher, store: StateStore, job_id: str) -> None:
    try:
        launcher.stop(job_id)
    except Exception as exc:
        event(log, "stop_failed", level=40, job=job_id, error=repr(exc)[:300])
        try:
            store.update_job(job_id, state="failed", error=f"stop failed: {exc!r}"[:2000])
        except FleetloopError:
            pass


def _reconcile(launcher: Launcher) -> None:
    try:
        resumed = launcher.reconcile()
        if resumed:
            event(log, "jobs_resumed", jobs=resumed)
    except Exception as exc:
        event(log, "reconcile_failed", level=40, error=repr(exc)[:300])
