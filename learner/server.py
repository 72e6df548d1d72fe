"""gRPC boundary of the learner: the ``fleetloop.v1.Learner`` service over a LearnerCore.

This is the only place fleetloop errors become gRPC status codes. Every handler checks the
credential first; bad input ends the RPC with INVALID_ARGUMENT (or the matching code) and a
message naming the field and value, is counted in ``fleetloop_learner_rejected_chunks_total``,
and never disturbs other streams. Streams wait with timeouts only, so a cancelled or dead peer
releases its thread within about a second.
"""

from __future__ import annotations

import json
import time
import uuid
from concurrent import futures

import grpc
from google.protobuf.message import DecodeError

from fleetloop.codec import PROTOCOL_VERSION, specs_mismatch
from fleetloop.errors import (FailedPrecondition, FleetloopError, InvalidArgument, NotFound, ResourceExhausted,
                              grpc_status_name)
from fleetloop.logs import event, get_logger
from fleetloop.v1 import fleetloop_pb2 as pb
from learner.auth import Authenticator, StaticTokens, bearer
from learner.core import LearnerCore

log = get_logger("learner.server")
SERVICE = "fleetloop.v1.Learner"


def _abort(context: grpc.ServicerContext, exc: FleetloopError | Exception) -> None:
    code = getattr(grpc.StatusCode, grpc_status_name(exc), grpc.StatusCode.INTERNAL)
    context.abort(code, str(exc))


def _reason(exc: FleetloopError) -> str:
    top = (exc.field or "").split("[")[0].split(".")[0] or "message"
    return f"{exc.code.lower()}:{top}"


def announcement(info, pinned: int | None, job_state: str = "running") -> pb.WeightAnnouncement:
    """Wire form of a weight store VersionInfo (plus the job's state)."""
    return pb.WeightAnnouncement(version=info.version, sha256=info.sha256, size_bytes=info.size_bytes,
                                 learner_step=info.learner_step, published_at=info.published_at,
                                 pinned=pinned == info.version, format="safetensors", job_state=job_state)


class LearnerServicer:
    """Implements the four RPCs of the contract."""

    def __init__(self, core: LearnerCore, auth: Authenticator | None = None) -> None:
        self.core = core
        self.cfg = core.cfg
        self.auth = auth or StaticTokens(core.cfg.robot_tokens)
        self.learner_id = f"learner-{uuid.uuid4().hex[:8]}"
        self.sessions: dict[str, dict] = {}

    def _authorize(self, context: grpc.ServicerContext, job_id: str, credential: str | None = None) -> str:
        token = bearer(context.invocation_metadata()) or credential
        return self.auth.check(token, job_id)

    # -- Handshake ---------------------------------------------------------------------------
    def Handshake(self, req: pb.HandshakeRequest, context: grpc.ServicerContext) -> pb.HandshakeResponse:
        try:
            if req.protocol_version != PROTOCOL_VERSION:
                raise FailedPrecondition(f"protocol_version {req.protocol_version} is not supported; learner speaks {PROTOCOL_VERSION}",
                                         field="protocol_version", value=req.protocol_version)
            if req.job_id != self.cfg.job_id:
                raise NotFound(f"unknown job {req.job_id!r}", field="job_id", value=req.job_id)
            principal = self._authorize(context, req.job_id, req.credential)
            if not req.actor_id or len(req.actor_id) > 128:
                raise InvalidArgument(f"actor_id {req.actor_id!r} must be 1..128 characters", field="actor_id", value=req.actor_id)
            if req.kind != pb.ROBOT:
                raise FailedPrecondition(f"kind {pb.ActorKind.Name(req.kind)} is not served by this job (robot)", field="kind",
                                         value=pb.ActorKind.Name(req.kind))
            for name, declared, expected in (("observation_specs", req.observation_specs, self.core.obs_specs),
                                             ("action_specs", req.action_specs, self.core.act_specs)):
                problem = specs_mismatch(declared, expected)
                if problem:
                    raise FailedPrecondition(problem, field=name, value=len(declared))
            unknown = [t for t in req.tasks if t not in self.cfg.tasks]
            if unknown:
                raise InvalidArgument(f"tasks {unknown} are not tasks of job {self.cfg.job_id!r} ({self.cfg.tasks})",
                                      field="tasks", value=unknown)
        except FleetloopError as exc:
            event(log, "handshake_refused", level=30, job=req.job_id, actor=req.actor_id, error=str(exc))
            _abort(context, exc)
        session = uuid.uuid4().hex
        self.sessions[session] = {"actor_id": req.actor_id, "tasks": list(req.tasks), "since": time.time(),
                                  "kind": pb.ActorKind.Name(req.kind).lower(),
                                  "capabilities": dict(req.capabilities), "principal": principal}
        fv = self.core.weights.fleet_version()
        event(log, "handshake", job=req.job_id, actor=req.actor_id, version=fv.version if fv else -1, principal=principal)
        run = pb.RunConfig(policy_factory=self.cfg.policy_factory, policy_kwargs_json=json.dumps(self.cfg.policy_kwargs),
                           task_ids=self.cfg.tasks, chunk_steps=self.cfg.chunk_steps,
                           max_episode_steps=self.cfg.max_episode_steps, max_message_bytes=self.cfg.max_message_bytes,
                           algorithm=self.cfg.algorithm, inference_json="{}")
        return pb.HandshakeResponse(protocol_version=PROTOCOL_VERSION, session_id=session, run_config=run,
                                    current_policy=announcement(fv, self.core.weights.pinned, self.core.job_state) if fv else None,
                                    learner_id=self.learner_id)

    # -- Experience --------------------------------------------------------------------------
    def StreamExperience(self, request_iterator, context: grpc.ServicerContext):
        m, job = self.core.metrics, self.cfg.job_id
        try:
            self._authorize(context, job)
        except FleetloopError as exc:
            m.rejected.labels(job, _reason(exc)).inc()
            _abort(context, exc)
        for raw in request_iterator:
            try:
                if len(raw) > self.cfg.max_message_bytes:
                    raise ResourceExhausted(f"chunk of {len(raw)} bytes exceeds max_message_bytes {self.cfg.max_message_bytes}",
                                            field="message_size", value=len(raw))
                try:
                    chunk = pb.EpisodeChunk.FromString(raw)
                except DecodeError as exc:
                    raise InvalidArgument(f"chunk is not a valid EpisodeChunk: {exc}", field="message", value=len(raw)) from None
                duplicate = self.core.ingestor.ingest(chunk, len(raw), self.core.version, raw=raw)
            except FleetloopError as exc:
                m.rejected.labels(job, _reason(exc)).inc()
                event(log, "chunk_rejected", level=30, job=job, error=str(exc)[:300])
                _abort(context, exc)
            yield pb.Ack(episode_id=chunk.episode_id, seq=chunk.seq, duplicate=duplicate,
                         learner_version=max(self.core.version, 0), backoff_ms=self.core.backoff_ms())

    # -- Weights -----------------------------------------------------------------------------
    def SubscribeWeights(self, req: pb.SubscribeRequest, context: grpc.ServicerContext):
        try:
            self._authorize(context, req.job_id)
            if req.job_id != self.cfg.job_id:
                raise NotFound(f"unknown job {req.job_id!r}", field="job_id", value=req.job_id)
        except FleetloopError as exc:
            _abort(context, exc)
        store = self.core.weights
        known = None
        while context.is_active():
            info = store.wait_for_change(known[:2] if known else None, timeout=1.0)  # job_state: seen within 1 s
            if info is None:
                continue
            current = (info.version, store.pinned is not None, self.core.job_state)
            if current != known:
                known = current
                yield announcement(info, store.pinned, self.core.job_state)

    def FetchWeights(self, req: pb.FetchRequest, context: grpc.ServicerContext):
        try:
            self._authorize(context, req.job_id)
            if req.job_id != self.cfg.job_id:
                raise NotFound(f"unknown job {req.job_id!r}", field="job_id", value=req.job_id)
            info = self.core.weights.info(req.version)
            blob = self.core.weights.blob(req.version)
            if req.offset > len(blob):
                raise InvalidArgument(f"offset {req.offset} is past the blob's {len(blob)} bytes", field="offset", value=req.offset)
        except FleetloopError as exc:
            _abort(context, exc)
        size = min(max(req.chunk_bytes or self.cfg.weight_chunk_bytes, 4096), self.cfg.weight_chunk_bytes)
        view = memoryview(blob)
        served = self.core.metrics.served_bytes.labels(self.cfg.job_id)
        for off in range(int(req.offset), len(blob), size):
            if not context.is_active():
                return
            data = view[off:off + size]
            served.inc(len(data))
            yield pb.WeightChunk(version=info.version, offset=off, data=bytes(data), total_size=len(blob), sha256=info.sha256)
        if len(blob) == 0 or req.offset == len(blob):
            yield pb.WeightChunk(version=info.version, offset=len(blob), data=b"", total_size=len(blob), sha256=info.sha256)


def build_server(servicer: LearnerServicer, host: str, port: int, workers: int, max_message_bytes: int,
                 credentials: grpc.ServerCredentials | None = None) -> tuple[grpc.Server, int]:
    """A started-ready (not yet started) gRPC server bound to host:port; returns (server, bound port)."""
    limit = max_message_bytes + (1 << 20)  # headroom so oversized chunks get our clear error, not a transport one
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fleetloop-grpc"),
        options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit),
                 ("grpc.keepalive_time_ms", 20_000), ("grpc.keepalive_timeout_ms", 10_000),
                 ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
                 ("grpc.keepalive_permit_without_calls", 1), ("grpc.so_reuseport", 0)],
        maximum_concurrent_rpcs=workers - 2,
    )
    handlers = {
        "Handshake": grpc.unary_unary_rpc_method_handler(
            servicer.Handshake, request_deserializer=pb.HandshakeRequest.FromString,
            response_serializer=pb.HandshakeResponse.SerializeToString),
        "StreamExperience": grpc.stream_stream_rpc_method_handler(
            servicer.StreamExperience, request_deserializer=lambda b: b, response_serializer=pb.Ack.SerializeToString),
        "SubscribeWeights": grpc.unary_stream_rpc_method_handler(
            servicer.SubscribeWeights, request_deserializer=pb.SubscribeRequest.FromString,
            response_serializer=pb.WeightAnnouncement.SerializeToString),
        "FetchWeights": grpc.unary_stream_rpc_method_handler(
            servicer.FetchWeights, request_deserializer=pb.FetchRequest.FromString,
            response_serializer=pb.WeightChunk.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    bound = server.add_secure_port(f"{host}:{port}", credentials) if credentials is not None else \
        server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise FailedPrecondition(f"cannot bind gRPC server to {host}:{port}", field="port", value=port)
    return server, bound
