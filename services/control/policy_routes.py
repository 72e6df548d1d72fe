"""Policy export and retention routes of the REST API, registered on the app by
:func:`install_policy_routes` (called from :func:`services.control.api.create_app`).

- ``GET /v1/jobs/{id}/policies/{v}/metadata`` (viewer): the version's ``fleetloop-policy.json``
  document (:func:`fleetloop.policy_bundle.bundle_metadata`), built from the job record (factory,
  kwargs, tensor specs, tasks, algorithm of its JobSpec), the version index row the learner reported
  (step, time, sha256, size) and the control plane's evaluation of the version, if any.
- ``GET /v1/jobs/{id}/policies/{v}/weights`` (viewer): the version's safetensors blob, streamed as
  the launcher reads it (:meth:`~services.control.launchers.base.Launcher.open_weights`: the local
  file, or the learner's gRPC weight service), one piece at a time, never whole in the API's memory.
  Headers: ``X-Fleetloop-Sha256`` (the client checks the bytes against it), ``X-Fleetloop-Version``,
  ``X-Fleetloop-Learner-Step``, ``Content-Length``.
- ``GET /v1/jobs/{id}/policies/{v}/export`` (viewer): the export folder as an uncompressed tar,
  streamed the same way: ``<job>-v<v>/model.safetensors`` first, then
  ``<job>-v<v>/fleetloop-policy.json`` (last, as in a folder written by
  :func:`fleetloop.policy_bundle.write_bundle`: an archive cut short has no metadata).
- ``POST`` / ``DELETE /v1/jobs/{id}/policies/{v}/keep`` (operator): weight retention never deletes
  the version / releases it again; a command to the learner like pin (200 done, 202 queued), persisted
  in its weight store's index, shown as ``kept`` in ``GET /policies``.

A version the version index does not hold (never published, or pruned: the learner removes pruned
versions from it) is a 404 naming it, as are weights that are gone by the time they are read;
409 when the launcher cannot reach them (a stopped job on Kubernetes, the hold launcher). A failure
after the first byte was sent can only cut the body short (the client's size and sha256 checks fail).
"""

from __future__ import annotations

import json
import tarfile
from typing import Any, Callable, Iterator

from fastapi import FastAPI
from fastapi.params import Depends
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field

from fleetloop.errors import IntegrityError, NotFound
from fleetloop.policy_bundle import FORMAT, METADATA_FILE, WEIGHTS_FILE, bundle_metadata
from services.control.api_errors import ERRORS
from services.control.launchers.base import Launcher, WeightStream
from services.control.state import ApiKey, JobRecord, StateStore

SHA_HEADER, VERSION_HEADER, STEP_HEADER = "X-Fleetloop-Sha256", "X-Fleetloop-Version", "X-Fleetloop-Learner-Step"


class PolicyMetadata(BaseModel):
    """The ``fleetloop-policy.json`` document of one version (see :mod:`fleetloop.policy_bundle`)."""

    format: str = Field(description=f"Always {FORMAT!r}.")
    kind: str = Field(description="robot (or llm).")
    job_id: str
    version: int
    learner_step: int = Field(description="Learner step that produced it.")
    sha256: str = Field(description="sha256 of model.safetensors (the version's identity).")
    size_bytes: int
    published_at: float
    tasks: list[str] = Field(description="Task ids, in the order the policy indexes them.")
    algorithm: str | None = None
    evaluation: dict[str, Any] | None = Field(None, description="The control plane's evaluation of the version, if any.")
    exported_at: float
    policy_factory: str | None = Field(None, description="Robot policies: 'module:function' of the policy plug-in.")
    policy_kwargs: dict[str, Any] | None = Field(None, description="Robot policies: keyword arguments of the factory.")
    observation_specs: list[dict[str, Any]] | None = Field(None, description="Robot policies: {name, dtype, shape, low, high}.")
    action_specs: list[dict[str, Any]] | None = Field(None, description="Robot policies: {name, dtype, shape, low, high}.")
    model: dict[str, Any] | None = Field(None, description="LLM policies: the base model's recipe.")


def version_row(store: StateStore, job_id: str, version: int) -> dict[str, Any]:
    """The version index row of a retained version; NotFound naming the version otherwise."""
    row = store.version(job_id, version)
    if row is None:
        raise NotFound(f"unknown policy version {version} of job {job_id!r} (never published, or pruned)", field="version",
                       value=version)
    return row


def policy_metadata(store: StateStore, rec: JobRecord, version: int) -> dict[str, Any]:
    """The bundle metadata of ``version`` of the job ``rec`` (NotFound when the version is not retained)."""
    row = version_row(store, rec.id, version)
    obs, act = rec.spec.tensor_specs()
    return bundle_metadata(job_id=rec.id, version=row["version"], learner_step=row["step"], sha256=row["sha256"],
                           size_bytes=row["size_bytes"], published_at=row["published_at"], tasks=rec.spec.tasks,
                           kind=rec.spec.kind, policy_factory=rec.spec.policy_factory, policy_kwargs=rec.spec.policy_kwargs,
                           observation_specs=obs, action_specs=act, algorithm=rec.spec.algorithm,
                           evaluation=store.evaluations(rec.id).get(version))


def _counted(weights: WeightStream, what: str) -> Iterator[bytes]:
    """``weights.chunks``, then IntegrityError if they were not exactly ``weights.size_bytes`` long."""
    n = 0
    try:
        for piece in weights.chunks:
            n += len(piece)
            yield piece
    finally:
        weights.close()
    if n != weights.size_bytes:
        raise IntegrityError(f"{what}: read {n} of {weights.size_bytes} bytes", field="version", value=weights.version)


def _tar_header(name: str, size: int, mtime: float) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = int(size), int(mtime), 0o644
    return info.tobuf(format=tarfile.GNU_FORMAT)


def _pad(size: int) -> bytes:
    return b"\0" * (-size % tarfile.BLOCKSIZE)


def tar_parts(prefix: str, meta: bytes, weights: WeightStream, mtime: float) -> tuple[int, Iterator[bytes]]:
    """(total length, pieces) of an uncompressed tar of ``prefix/model.safetensors`` (streamed from
    ``weights``) then ``prefix/fleetloop-policy.json``."""
    head_w = _tar_header(f"{prefix}/{WEIGHTS_FILE}", weights.size_bytes, mtime)
    head_m = _tar_header(f"{prefix}/{METADATA_FILE}", len(meta), mtime)
    end = b"\0" * (2 * tarfile.BLOCKSIZE)
    total = len(head_w) + weights.size_bytes + len(_pad(weights.size_bytes)) + len(head_m) + len(meta) + len(_pad(len(meta))) + len(end)

    def gen() -> Iterator[bytes]:
        yield head_w
        yield from _counted(weights, f"version {weights.version}")
        yield _pad(weights.size_bytes)
        yield head_m + meta + _pad(len(meta))
        yield end
    return total, gen()


def install_policy_routes(app: FastAPI, store: StateStore, launcher: Launcher, *, viewer: Depends, operator: Depends,
                          active_job: Callable[[str], JobRecord], command: Callable[..., Any],
                          reply: Callable[[Any], JSONResponse], command_model: type[BaseModel]) -> None:
    """Register the routes of the module docstring on ``app``. ``viewer`` / ``operator``: the role
    dependencies; ``active_job``, ``command``, ``reply``, ``command_model``: the API's own helpers for
    learner commands (so keep answers exactly like pin)."""
    described = {SHA_HEADER: {"description": "sha256 (hex) of the weights: check the bytes against it.", "schema": {"type": "string"}},
                 VERSION_HEADER: {"description": "Policy version.", "schema": {"type": "integer"}},
                 STEP_HEADER: {"description": "Learner step that produced it.", "schema": {"type": "integer"}}}
    binary = {200: {"content": {"application/octet-stream": {}}, "headers": described,
                    "description": "The version's weights (safetensors)."}}
    tar = {200: {"content": {"application/x-tar": {}}, "headers": described,
                 "description": "The export folder as a tar archive."}}
    queued = {**ERRORS, 202: {"model": command_model}}

    @app.get("/v1/jobs/{job_id}/policies/{version}/metadata", response_model=PolicyMetadata, responses=ERRORS,
             tags=["policies"])
    def metadata(job_id: str, version: int, key: ApiKey = viewer) -> Any:
        """The version's ``fleetloop-policy.json`` (what ``fleetloop policy export`` writes beside the weights)."""
        return JSONResponse(policy_metadata(store, store.get_job(job_id), version))

    def headers(row: dict[str, Any], size: int) -> dict[str, str]:
        return {SHA_HEADER: row["sha256"], VERSION_HEADER: str(row["version"]), STEP_HEADER: str(row["step"]),
                "Content-Length": str(size), "Cache-Control": "no-store"}

    @app.get("/v1/jobs/{job_id}/policies/{version}/weights", response_class=StreamingResponse,
             responses={**ERRORS, **binary}, tags=["policies"])
    def weights(job_id: str, version: int, key: ApiKey = viewer) -> StreamingResponse:
        """The version's weights (safetensors), streamed; sha256 in ``X-Fleetloop-Sha256``."""
        store.get_job(job_id)
        row = version_row(store, job_id, version)
        blob = launcher.open_weights(job_id, version)
        return StreamingResponse(_counted(blob, f"version {version} of job {job_id!r}"), media_type="application/octet-stream",
                                 headers={**headers(row, blob.size_bytes), "Content-Disposition":
                                          f'attachment; filename="{job_id}-v{version}.safetensors"'})

    @app.get("/v1/jobs/{job_id}/policies/{version}/export", response_class=StreamingResponse,
             responses={**ERRORS, **tar}, tags=["policies"])
    def export(job_id: str, version: int, key: ApiKey = viewer) -> StreamingResponse:
        """The export folder (model.safetensors + fleetloop-policy.json) as an uncompressed tar, streamed."""
        meta = policy_metadata(store, store.get_job(job_id), version)
        blob = launcher.open_weights(job_id, version)
        prefix = f"{job_id}-v{version}"
        size, parts = tar_parts(prefix, json.dumps(meta, indent=1, sort_keys=True).encode(), blob, meta["exported_at"])
        row = {"sha256": meta["sha256"], "version": version, "step": meta["learner_step"]}
        return StreamingResponse(parts, media_type="application/x-tar",
                                 headers={**headers(row, size), "Content-Disposition": f'attachment; filename="{prefix}.tar"'})

    def keep_command(job_id: str, version: int, op: str, key: ApiKey) -> Any:
        active_job(job_id)
        version_row(store, job_id, version)
        return reply(command(job_id, op, {"version": version}, key))

    @app.post("/v1/jobs/{job_id}/policies/{version}/keep", response_model=command_model, responses=queued, tags=["policies"])
    def keep(job_id: str, version: int, key: ApiKey = operator) -> Any:
        """Keep the version: weight retention never deletes it (persisted by the learner; ``kept`` in GET /policies)."""
        return keep_command(job_id, version, "keep", key)

    @app.delete("/v1/jobs/{job_id}/policies/{version}/keep", response_model=command_model, responses=queued,
                tags=["policies"])
    def unkeep(job_id: str, version: int, key: ApiKey = operator) -> Any:
        """Release a kept version: retention treats it like any other again (it may be deleted at once)."""
        return keep_command(job_id, version, "unkeep", key)
