"""gRPC boundary of the learner: the ``fleetloop.v1.Learner`` service over a LearnerCore.

This is the only place fleetloop errors become gRPC status codes. Every handler checks the
credential first; bad input ends the RPC with INVALID_ARGUMENT (or the matching code) and a
message naming the field and value, is counted in ``fleetloop_learner_rejected_chunks_total``,
and never disturbs other streams.

Stalled peers never block others (:mod:`learner.stream_guard`): experience streams and weight
subscriptions are capped below the thread pool (``max_streams``, ``max_subscriptions``; one more is
refused with RESOURCE_EXHAUSTED naming the cap), and a stream without progress for
``stream_idle_timeout_s`` is ended with UNAVAILABLE, freeing its thread; HTTP/2 keepalive
(``keepalive_time_s`` + ``keepalive_timeout_s``) closes connections to dead or black-holed peers.

Retry contract of RESOURCE_EXHAUSTED: a refusal the peer may retry (rate limit, stream cap,
in-flight memory budget) carries the trailer ``grpc-retry-pushback-ms`` = the wait in ms; one that
can never succeed (an oversized chunk) carries ``grpc-retry-pushback-ms: -1`` (gRPC's "do not
retry"). Acks carry ``backoff_ms`` from :meth:`LearnerCore.backoff_ms` for the chunk's actor.

Identity: every experience stream is bound to one actor id, the first its chunks name, which the
credential's :class:`~learner.auth.Principal` must be allowed to act as; a chunk naming another
actor is PERMISSION_DENIED (as is a handshake or weight subscription naming an actor the credential
was not enrolled for). With a revocable authenticator (control-plane enrollments) the stream guard
re-checks each open stream's credential every ``AUTH_RECHECK_S`` seconds and ends the streams of a
revoked one with UNAUTHENTICATED (closed reason ``revoked``); the actor's row then shows "revoked".
A credential store that cannot be reached during a re-check keeps open streams open (new ones fail
closed with UNAVAILABLE).

Without any credential (no tokens, enrollments or mTLS) every caller is "anonymous": such a learner
binds loopback only unless ``allow_unauthenticated`` (see :mod:`learner.exposure`); it is exported as
``fleetloop_learner_unauthenticated = 1`` and, beyond loopback, logged as a warning at start.

Weight announcements are per actor: the version of the actor's release channel and the channel
(``WeightAnnouncement.channel``: "stable" / "candidate" with ``rollout: canary``, "" otherwise or under
an operator pin), from :meth:`learner.api.Lifecycle.weights_for`; a subscription wakes on every
publish or pin and re-reads the actor's channel at least once a second (release decisions, job state).

LLM jobs (protocol 2, :mod:`learner.llm`): the same service over an ``LlmLearnerCore``; chunks carry
one CompletionGroup each, and ``Admit`` hands out rollout tickets (staleness by admission). The
servicer never switches on the kind of job: it asks the core (:class:`learner.api.LearnerCore`).
"""

from __future__ import annotations

import inspect
import time
import uuid
from concurrent import futures

import grpc
from google.protobuf.message import DecodeError

from fleetloop import wire_settings
from fleetloop.codec import PROTOCOL_VERSION, SUPPORTED_PROTOCOL_VERSIONS
from fleetloop.errors import (FailedPrecondition, FleetloopError, InvalidArgument, NotFound, PermissionDenied,
                              ResourceExhausted, Unauthenticated, grpc_status_name)
from fleetloop.logs import event, get_logger
from fleetloop.v1 import fleetloop_pb2 as pb
from learner.api import LearnerCore
from learner.auth import Authenticator, CredentialRevoked, Principal, StaticTokens, bearer
from learner.exposure import is_loopback
from learner.stream_guard import StreamGuard
from learner.weight_serving import chunks as weight_chunks
from learner.weight_serving import serialize_chunk as serialize_weight_chunk

log = get_logger("learner.server")
SERVICE = "fleetloop.v1.Learner"
PUSHBACK = "grpc-retry-pushback-ms"  # gRPC's retry pushback trailer (A6): ms to wait; negative = do not retry
MAX_ADMIT = 1024  # most rollout tickets one Admit may ask for
AUTH_RECHECK_S = 2.0  # open streams' credentials are re-checked this often (revocation takes effect within it + 1 s)


def _abort(context: grpc.ServicerContext, exc: FleetloopError | Exception) -> None:
    code = getattr(grpc.StatusCode, grpc_status_name(exc), grpc.StatusCode.INTERNAL)
    if isinstance(exc, ResourceExhausted):
        retry = getattr(exc, "retry_after_ms", None)
        context.set_trailing_metadata(((PUSHBACK, str(int(retry)) if retry is not None else "-1"),))
    context.abort(code, str(exc))


def _reason(exc: FleetloopError) -> str:
    reason = getattr(exc, "reason", None)  # flow-control refusals name their own reason (rate_limited, ...)
    if reason:
        return reason
    top = (exc.field or "").split("[")[0].split(".")[0] or "message"
    return f"{exc.code.lower()}:{top}"


def announcement(info, pinned: int | None, job_state: str = "running", channel: str = "") -> pb.WeightAnnouncement:
    """Wire form of a weight store VersionInfo (plus the job's state and the actor's release channel)."""
    return pb.WeightAnnouncement(version=info.version, sha256=info.sha256, size_bytes=info.size_bytes,
                                 learner_step=info.learner_step, published_at=info.published_at,
                                 pinned=pinned == info.version, format="safetensors", channel=channel,
                                 **wire_settings.job_state_fields(job_state))


class LearnerServicer:
    """Implements the five RPCs of the contract over any :class:`~learner.api.LearnerCore` (robot
    :class:`learner.core.LearnerCore` or :class:`~learner.llm.core.LlmLearnerCore`): the core decides
    which actor kind the handshake accepts (``core.kind``; the other is FAILED_PRECONDITION naming
    ``kind``), what else a handshake must satisfy (``check_handshake``), what the run config carries
    (``run_config``), which chunks it stores (``check_chunk``, ``ingest``) and whether Admit serves
    (``check_admit``; robot jobs: FAILED_PRECONDITION)."""

    def __init__(self, core: LearnerCore, auth: Authenticator | None = None) -> None:
        self.core = core
        self.cfg = core.cfg
        self.auth = auth or StaticTokens(core.cfg.serving.robot_tokens)
        self.learner_id = f"learner-{uuid.uuid4().hex[:8]}"
        self.served_kind = pb.ActorKind.Value(core.kind.upper())  # the ActorKind a handshake must declare
        self.sessions: dict[str, dict] = {}
        self.guard = StreamGuard(self.cfg.job_id, {"StreamExperience": self.cfg.serving.stream_cap,
                                                   "SubscribeWeights": self.cfg.serving.subscription_cap,
                                                   "FetchWeights": self.cfg.serving.grpc_workers},  # short-lived: idle guard only
                                 self.cfg.serving.stream_idle_timeout_s, core.metrics,
                                 cap_names={"StreamExperience": "max_streams", "SubscribeWeights": "max_subscriptions"},
                                 recheck=self._recheck if self.auth.revocable else None,
                                 recheck_every_s=AUTH_RECHECK_S,
                                 on_revoked=lambda lease: self._mark_revoked(lease.actor) if lease.actor else None)
        self._report_exposure()

    def _report_exposure(self) -> None:
        """Export whether anonymous callers are accepted, and warn when they are beyond loopback (the
        config refused that unless ``allow_unauthenticated``: :mod:`learner.exposure`)."""
        cfg = self.cfg
        anonymous = not (self.auth.enabled or cfg.tls.client_ca_file is not None)
        self.core.metrics.unauthenticated.labels(cfg.job_id, cfg.serving.host).set(int(anonymous))
        if anonymous and not is_loopback(cfg.serving.host):
            event(log, "unauthenticated_learner", level=30, job=cfg.job_id, host=cfg.serving.host,
                  detail="allow_unauthenticated = true: anonymous callers on a non-loopback interface may stream "
                         "experience and read weights")

    @staticmethod
    def _token(context: grpc.ServicerContext, credential: str | None = None) -> str | None:
        """The call's credential: ``authorization: Bearer`` metadata, else ``credential`` (handshake field)."""
        return bearer(context.invocation_metadata()) or credential

    def _authorize(self, context: grpc.ServicerContext, job_id: str, credential: str | None = None) -> Principal:
        return self.auth.check(self._token(context, credential), job_id)

    def _bind(self, principal: Principal, actor_id: str, what: str) -> None:
        """PermissionDenied unless ``principal`` may act as ``actor_id`` (see the module docstring)."""
        if not principal.may_act_as(actor_id):
            raise PermissionDenied(f"{what}: actor_id {actor_id[:128]!r} is not an actor credential {principal} is "
                                   f"enrolled for (actors {list(principal.actors or [])})", field="actor_id",
                                   value=actor_id[:128])

    def _recheck(self, token: str) -> str | None:
        """Stream guard hook: why an open stream's credential is no longer valid (None: still valid,
        or the credential store cannot say right now)."""
        try:
            self.auth.check(token, self.cfg.job_id)
        except Unauthenticated as exc:
            return str(exc)
        except FleetloopError:  # e.g. the credential store is unreachable: keep open streams open
            pass
        return None

    def _mark_revoked(self, actor_id: str) -> None:
        """The actor's credential was revoked: its sessions say so (its fleet-table row shows "revoked")."""
        for sess in list(self.sessions.values()):
            if sess.get("actor_id") == actor_id:
                sess["revoked"] = True

    # -- Handshake ---------------------------------------------------------------------------
    def Handshake(self, req: pb.HandshakeRequest, context: grpc.ServicerContext) -> pb.HandshakeResponse:
        """Credential first (nothing about the job is revealed to a caller without one), then protocol,
        job, actor id, kind, specs and tasks. Every refusal is logged and counted by reason."""
        try:
            principal = self._authorize(context, req.job_id, req.credential)
            if req.protocol_version not in SUPPORTED_PROTOCOL_VERSIONS:
                raise FailedPrecondition(f"protocol_version {req.protocol_version} is not supported; learner speaks "
                                         f"{sorted(SUPPORTED_PROTOCOL_VERSIONS)}",
                                         field="protocol_version", value=req.protocol_version)
            if req.job_id != self.cfg.job_id:
                raise NotFound(f"unknown job {req.job_id!r}", field="job_id", value=req.job_id)
            if not req.actor_id or len(req.actor_id) > 128:
                raise InvalidArgument(f"actor_id {req.actor_id!r} must be 1..128 characters", field="actor_id", value=req.actor_id)
            self._bind(principal, req.actor_id, "handshake")
            served = self.served_kind
            if req.kind not in pb.ActorKind.values():
                raise FailedPrecondition(f"kind {int(req.kind)} is not a known ActorKind ({sorted(pb.ActorKind.keys())}); "
                                         f"this job serves {pb.ActorKind.Name(served)}", field="kind", value=int(req.kind))
            if req.kind != served:
                raise FailedPrecondition(f"kind {pb.ActorKind.Name(req.kind)} is not served by this job "
                                         f"({pb.ActorKind.Name(served).lower()})", field="kind", value=pb.ActorKind.Name(req.kind))
            self.core.check_handshake(req)
            job_tasks = self.core.job_tasks()
            unknown = [t for t in req.tasks if t not in job_tasks]
            if unknown:
                raise InvalidArgument(f"tasks {unknown} are not tasks of job {self.cfg.job_id!r} ({job_tasks})",
                                      field="tasks", value=unknown)
        except FleetloopError as exc:
            if isinstance(exc, CredentialRevoked) and 0 < len(req.actor_id) <= 128:
                self._mark_revoked(req.actor_id)
            self.core.metrics.refused_handshakes.labels(self.cfg.job_id, _reason(exc)).inc()
            event(log, "handshake_refused", level=30, job=req.job_id, actor=req.actor_id, error=str(exc))
            _abort(context, exc)
        session = uuid.uuid4().hex
        self.sessions[session] = {"actor_id": req.actor_id, "tasks": list(req.tasks), "since": time.time(),
                                  "kind": pb.ActorKind.Name(req.kind).lower(),
                                  "capabilities": dict(req.capabilities), "principal": principal}
        fv, channel = self.core.weights_for(req.actor_id)  # the version of the actor's release channel
        event(log, "handshake", job=req.job_id, actor=req.actor_id, version=fv.version if fv else -1, principal=principal)
        return pb.HandshakeResponse(protocol_version=PROTOCOL_VERSION, session_id=session, run_config=self.core.run_config(),
                                    current_policy=announcement(fv, self.core.weights.pinned, self.core.job_state, channel)
                                    if fv else None, learner_id=self.learner_id)

    # -- Experience --------------------------------------------------------------------------
    def StreamExperience(self, request_iterator, context: grpc.ServicerContext):
        m, job = self.core.metrics, self.cfg.job_id
        try:
            principal = self._authorize(context, job)
            lease = self.guard.open("StreamExperience", context, token=self._token(context))
        except FleetloopError as exc:
            if not isinstance(exc, ResourceExhausted):  # a full stream cap refuses no chunk (counted as over_cap)
                m.rejected.labels(job, _reason(exc)).inc()
            _abort(context, exc)
        try:
            for raw in request_iterator:
                lease.touch()
                try:
                    if len(raw) > self.cfg.serving.max_message_bytes:
                        raise ResourceExhausted(f"chunk of {len(raw)} bytes exceeds max_message_bytes {self.cfg.serving.max_message_bytes}",
                                                field="message_size", value=len(raw))
                    with self.core.reserve(len(raw)):
                        try:
                            chunk = pb.EpisodeChunk.FromString(raw)
                        except DecodeError as exc:
                            raise InvalidArgument(f"chunk is not a valid EpisodeChunk: {exc}", field="message",
                                                  value=len(raw)) from None
                        if not lease.actor:  # the stream is bound to the first actor its chunks name
                            self._bind(principal, chunk.actor_id, f"chunk (episode {chunk.episode_id[:128]!r}, seq {chunk.seq})")
                            lease.actor = chunk.actor_id[:128]
                        elif chunk.actor_id != lease.actor:
                            raise PermissionDenied(f"chunk (episode {chunk.episode_id[:128]!r}, seq {chunk.seq}): actor_id "
                                                   f"{chunk.actor_id[:128]!r} on a stream bound to actor {lease.actor!r}",
                                                   field="actor_id", value=chunk.actor_id[:128])
                        self.core.check_chunk(chunk)
                        version = self.core.version  # read once per chunk (the weight store scans its index)
                        duplicate = self.core.ingest(chunk, len(raw), version, raw=raw)
                except FleetloopError as exc:
                    m.rejected.labels(job, _reason(exc)).inc()
                    event(log, "chunk_rejected", level=30, job=job, actor=lease.actor or "?", error=str(exc)[:300])
                    _abort(context, exc)
                except Exception as exc:  # a bug, not bad input: INTERNAL (the actor retries, then sets the chunk aside)
                    m.rejected.labels(job, "internal").inc()
                    log.exception("chunk_internal_error job=%s actor=%s", job, lease.actor or "?")
                    context.abort(grpc.StatusCode.INTERNAL, f"internal error storing a chunk of actor {lease.actor!r}: "
                                                            f"{type(exc).__name__}: {str(exc)[:200]}")
                yield pb.Ack(episode_id=chunk.episode_id, seq=chunk.seq, duplicate=duplicate,
                             learner_version=max(version, 0), backoff_ms=self.core.backoff_ms(chunk.actor_id))
                lease.touch()
        except grpc.RpcError:  # ended by the peer or by the stream guard: nobody to answer
            return
        finally:
            lease.close()

    # -- Weights -----------------------------------------------------------------------------
    def SubscribeWeights(self, req: pb.SubscribeRequest, context: grpc.ServicerContext):
        try:
            principal = self._authorize(context, req.job_id)
            if req.job_id != self.cfg.job_id:
                raise NotFound(f"unknown job {req.job_id!r}", field="job_id", value=req.job_id)
            self._bind(principal, req.actor_id, "weight subscription")
            lease = self.guard.open("SubscribeWeights", context, token=self._token(context))
        except FleetloopError as exc:
            _abort(context, exc)
        lease.actor = req.actor_id[:128]
        store = self.core.weights
        fleet = announced = None
        try:
            while context.is_active():
                lease.touch()  # progress = the loop turns; a send blocked on a peer that stopped reading stops it
                # wakes on a publish or pin; job_state and release decisions are seen within the 1 s timeout
                fv = store.wait_for_change(fleet, timeout=1.0)
                if fv is None:
                    continue
                fleet = (fv.version, store.pinned is not None)
                info, channel = self.core.weights_for(req.actor_id)  # the actor's release channel (or the fleet version)
                if info is None:
                    continue
                current = (info.version, store.pinned is not None, self.core.job_state, channel)
                if current != announced:
                    announced = current
                    yield announcement(info, store.pinned, self.core.job_state, channel)
        finally:
            lease.close()

    def FetchWeights(self, req: pb.FetchRequest, context: grpc.ServicerContext):
        try:
            principal = self._authorize(context, req.job_id)
            if req.job_id != self.cfg.job_id:
                raise NotFound(f"unknown job {req.job_id!r}", field="job_id", value=req.job_id)
            if req.actor_id:  # optional on fetches; when named it must be one the credential may act as
                self._bind(principal, req.actor_id, "weight fetch")
            info = self.core.weights.info(req.version)
            blob = self.core.weights.blob(req.version)
            if req.offset > len(blob):
                raise InvalidArgument(f"offset {req.offset} is past the blob's {len(blob)} bytes", field="offset", value=req.offset)
            lease = self.guard.open("FetchWeights", context)
        except FleetloopError as exc:
            _abort(context, exc)
        lease.actor = req.actor_id[:128]
        size = min(max(req.chunk_bytes or self.cfg.serving.weight_chunk_bytes, 4096), self.cfg.serving.weight_chunk_bytes)
        served = self.core.metrics.served_bytes.labels(self.cfg.job_id)
        try:  # chunks pre-encoded with one copy of their bytes (learner.weight_serving); serializer passes them through
            for n, wire in weight_chunks(info.version, info.sha256, blob, int(req.offset), size):
                if not context.is_active():
                    return
                lease.touch()  # the previous chunk was sent
                served.inc(n)
                yield wire
        finally:
            lease.close()

    # -- Admission (LLM jobs) ------------------------------------------------------------------
    def Admit(self, req: pb.AdmitRequest, context: grpc.ServicerContext) -> pb.AdmitResponse:
        """Grant up to ``rollouts`` admission tickets (AReaL's capacity rule, see learner.llm.admission).
        Credential first; then job (NOT_FOUND), kind of job (a robot job: FAILED_PRECONDITION naming
        ``kind``), ``actor_id`` and ``rollouts`` (1..MAX_ADMIT, else INVALID_ARGUMENT naming it)."""
        try:
            principal = self._authorize(context, req.job_id)
            if req.job_id != self.cfg.job_id:
                raise NotFound(f"unknown job {req.job_id!r}", field="job_id", value=req.job_id)
            self.core.check_admit()
            if not req.actor_id or len(req.actor_id) > 128:
                raise InvalidArgument(f"actor_id {req.actor_id!r} must be 1..128 characters", field="actor_id",
                                      value=req.actor_id)
            self._bind(principal, req.actor_id, "admit")
            if not 1 <= req.rollouts <= MAX_ADMIT:
                raise InvalidArgument(f"rollouts {req.rollouts} must be 1..{MAX_ADMIT}", field="rollouts", value=req.rollouts)
            grant = self.core.admit(req.actor_id, int(req.rollouts), int(req.current_version))
        except FleetloopError as exc:
            event(log, "admit_refused", level=30, job=req.job_id, actor=req.actor_id[:128], error=str(exc)[:300])
            _abort(context, exc)
        return pb.AdmitResponse(ticket_ids=grant.ticket_ids, learner_version=grant.learner_version,
                                retry_after_ms=grant.retry_after_ms, ticket_ttl_s=grant.ticket_ttl_s,
                                max_staleness=grant.max_staleness)


def _parsed(cls, method, metrics, job: str):
    """Wrap a handler so its request arrives as bytes and is parsed here: undecodable bytes get
    INVALID_ARGUMENT naming the message type (gRPC's own deserializer would answer INTERNAL)."""
    def parse(raw: bytes, context: grpc.ServicerContext):
        try:
            return cls.FromString(raw)
        except (DecodeError, ValueError) as exc:
            metrics.rejected.labels(job, f"invalid_argument:{cls.__name__}").inc()
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request is not a valid {cls.DESCRIPTOR.full_name} "
                                                            f"({len(raw)} bytes): {str(exc)[:200]}")

    def unary(raw: bytes, context: grpc.ServicerContext):
        return method(parse(raw, context), context)

    def streaming(raw: bytes, context: grpc.ServicerContext):
        yield from method(parse(raw, context), context)

    return streaming if inspect.isgeneratorfunction(method) else unary


def transport_limit(max_message_bytes: int) -> int:
    """The gRPC transport's receive limit for a learner that accepts ``max_message_bytes`` (the limit it
    announces in RunConfig and enforces itself). Actors check every chunk against the announced limit
    before sending (:mod:`fleetloop.client.limits`; their channel sets no lower send cap); the transport takes up to twice as much (at least 1 MiB more)
    so that a client that does send an oversized chunk gets the learner's own refusal (RESOURCE_EXHAUSTED
    naming ``message_size`` and both sizes, ``grpc-retry-pushback-ms: -1``, counted and logged) instead
    of a bare transport error; only past this limit does gRPC itself refuse the message."""
    return max_message_bytes + max(1 << 20, max_message_bytes)


def server_options(max_message_bytes: int, keepalive_time_s: float, keepalive_timeout_s: float) -> list[tuple[str, int]]:
    """Channel arguments of the learner's server: message limits and HTTP/2 keepalive. The server
    pings every connection after ``keepalive_time_s`` without activity (also without calls, and
    without a data frame in between) and closes it when a ping stays unanswered for
    ``keepalive_timeout_s``; clients may ping every 5 s (actors ping every 20 s)."""
    limit = transport_limit(max_message_bytes)
    return [("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit),
            ("grpc.keepalive_time_ms", int(keepalive_time_s * 1000)), ("grpc.keepalive_timeout_ms", int(keepalive_timeout_s * 1000)),
            ("grpc.keepalive_permit_without_calls", 1), ("grpc.http2.max_pings_without_data", 0),
            ("grpc.http2.min_ping_interval_without_data_ms", 5_000), ("grpc.so_reuseport", 0)]


def build_server(servicer: LearnerServicer, host: str, port: int, workers: int, max_message_bytes: int,
                 credentials: grpc.ServerCredentials | None = None) -> tuple[grpc.Server, int]:
    """A started-ready (not yet started) gRPC server bound to host:port; returns (server, bound port).
    Keepalive comes from the servicer's config; at most ``workers - 2`` RPCs run at once (gRPC
    refuses more with RESOURCE_EXHAUSTED), and the stream caps keep some of those for unary calls."""
    cfg = servicer.cfg
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fleetloop-grpc"),
        options=server_options(max_message_bytes, cfg.serving.keepalive_time_s, cfg.serving.keepalive_timeout_s),
        maximum_concurrent_rpcs=workers - 2,
    )
    m, job = servicer.core.metrics, cfg.job_id
    raw = lambda b: b  # noqa: E731 - every request is parsed by the handler (clear INVALID_ARGUMENT on garbage)
    handlers = {
        "Handshake": grpc.unary_unary_rpc_method_handler(
            _parsed(pb.HandshakeRequest, servicer.Handshake, m, job), request_deserializer=raw,
            response_serializer=pb.HandshakeResponse.SerializeToString),
        "StreamExperience": grpc.stream_stream_rpc_method_handler(
            servicer.StreamExperience, request_deserializer=raw, response_serializer=pb.Ack.SerializeToString),
        "SubscribeWeights": grpc.unary_stream_rpc_method_handler(
            _parsed(pb.SubscribeRequest, servicer.SubscribeWeights, m, job), request_deserializer=raw,
            response_serializer=pb.WeightAnnouncement.SerializeToString),
        "FetchWeights": grpc.unary_stream_rpc_method_handler(
            _parsed(pb.FetchRequest, servicer.FetchWeights, m, job), request_deserializer=raw,
            response_serializer=serialize_weight_chunk),
        "Admit": grpc.unary_unary_rpc_method_handler(
            _parsed(pb.AdmitRequest, servicer.Admit, m, job), request_deserializer=raw,
            response_serializer=pb.AdmitResponse.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    bound = server.add_secure_port(f"{host}:{port}", credentials) if credentials is not None else \
        server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise FailedPrecondition(f"cannot bind gRPC server to {host}:{port}", field="port", value=port)
    return server, bound
