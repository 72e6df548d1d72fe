"""One actor's connection to its learner: the part the robot runtime (:class:`fleetloop.client.runtime.FleetClient`)
and the LLM rollout server (:class:`actor.llm.runtime.LlmActor`) share.

    conn = LearnerConnection(learner, job_id, actor_id, spool=Spool(folder), credential=token,
                             on_ack=..., on_reject=...)
    resp = conn.handshake(req, connect_timeout_s, on_retry=..., deadline_error=...)
    weights = conn.follow_weights(on_verified=...)
    conn.start(announced_limit(resp.run_config))      # background sender + weight follower
    ...
    conn.close(flush_timeout=10.0)

What it holds: the bearer-token metadata, the spool, one TLS or insecure channel (with
:func:`fleetloop.channels.channel_options`), the Learner stub, the raw StreamExperience call the
:class:`~fleetloop.client.sender.Sender` streams spooled bytes over, the sender, and the
:class:`~fleetloop.client.weight_client.WeightClient` once :meth:`LearnerConnection.follow_weights` made it.
What it leaves to its owner: the handshake request, what to log while the learner is unreachable and
the error for a connect deadline (the robot and LLM actors word these differently), and what an
acknowledgement or a set-aside chunk means (``on_ack`` / ``on_reject``).

Contract on data: everything handed to the spool stays there until the learner acknowledges it (the
sender deletes a chunk on its ack) or it is set aside for good (the spool's ``rejected/`` folder).
:meth:`LearnerConnection.close` never deletes spooled data: what is unacknowledged when it returns
stays in the spool folder and is resent by the next process on that folder (exactly-once on the
learner by (episode_id, seq)).
"""

from __future__ import annotations

import time
from typing import Callable

import grpc

from fleetloop.client.sender import Sender
from fleetloop.client.spool import Spool, SpoolEntry
from fleetloop.client.weight_client import WeightClient
from fleetloop.channels import channel_options
from fleetloop.errors import FleetloopError, Unavailable
from fleetloop.v1 import fleetloop_pb2 as pb
from fleetloop.v1 import fleetloop_pb2_grpc as pb_grpc

__all__ = ["ConnectionParts", "LearnerConnection", "RETRYABLE", "error_from_rpc"]

RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
"""Status codes a call is retried on (the learner is unreachable right now); any other is a refusal."""


def error_from_rpc(err: grpc.RpcError) -> FleetloopError:
    """The :class:`~fleetloop.errors.FleetloopError` subclass whose ``code`` is ``err``'s status
    (message: the status details, else the code's name); a plain FleetloopError naming code and
    details for a status no subclass has."""
    from fleetloop import errors
    for cls in errors.FleetloopError.__subclasses__():
        if cls.code == err.code().name:
            return cls(err.details() or err.code().name)
    return FleetloopError(f"{err.code().name}: {err.details()}")


class ConnectionParts:
    """The parts of ``self.connection`` (a :class:`LearnerConnection`) as the owner's own read-only
    attributes: what callers of the robot client and the LLM actor read (``metadata``, ``spool``,
    ``channel``, ``stub``, ``sender``, ``weights``)."""

    connection: "LearnerConnection"

    @property
    def metadata(self) -> tuple:
        """The call metadata (bearer token; empty without a credential)."""
        return self.connection.metadata

    @property
    def spool(self) -> Spool:
        return self.connection.spool

    @property
    def channel(self) -> grpc.Channel:
        return self.connection.channel

    @property
    def stub(self) -> pb_grpc.LearnerStub:
        return self.connection.stub

    @property
    def sender(self) -> Sender:
        return self.connection.sender

    @property
    def weights(self) -> WeightClient | None:
        """The weight follower (None before ``connect``)."""
        return self.connection.weights


class LearnerConnection:
    """Channel, stub, sender and weight follower of one actor talking to one learner.

    Threads: :meth:`handshake`, :meth:`follow_weights`, :meth:`start` and :meth:`close` belong to the
    owner's control thread (one call at a time, in that order; :meth:`close` may come at any point).
    :meth:`unary`, :meth:`flush` and :attr:`job_stopping` may be called from any thread (gRPC channels
    and the spool are thread-safe). ``on_ack(ack)`` and ``on_reject(entry, label, reason)`` are called
    from the sender's threads (see :class:`~fleetloop.client.sender.Sender`)."""

    def __init__(self, learner: str, job_id: str, actor_id: str, *, spool: Spool, credential: str | None = None,
                 tls_ca_file: str | None = None, tls_cert_file: str | None = None, tls_key_file: str | None = None,
                 max_inflight: int = 32, on_ack: Callable[[pb.Ack], None],
                 on_reject: Callable[[SpoolEntry, str, str], None]) -> None:
        """Opens the channel (TLS when ``tls_ca_file`` or ``tls_cert_file`` is given; a client
        certificate with ``tls_key_file`` makes it mutual TLS) without contacting the learner: gRPC
        connects lazily. ``credential``: the bearer token sent with every call (None: no metadata)."""
        self.learner, self.job_id, self.actor_id = learner, job_id, actor_id
        self.metadata: tuple = (("authorization", f"Bearer {credential}"),) if credential else ()
        self.spool = spool
        if tls_ca_file or tls_cert_file:
            from fleetloop.tls import channel_credentials
            self.channel: grpc.Channel = grpc.secure_channel(
                learner, channel_credentials(tls_ca_file, tls_cert_file, tls_key_file), options=channel_options())
        else:
            self.channel = grpc.insecure_channel(learner, options=channel_options())
        self.stub = pb_grpc.LearnerStub(self.channel)
        # the sender streams spooled bytes as they are (no parse + reserialize per chunk)
        stream = self.channel.stream_stream("/fleetloop.v1.Learner/StreamExperience", request_serializer=lambda b: b,
                                            response_deserializer=pb.Ack.FromString)
        self.sender = Sender(lambda it: stream(it, metadata=self.metadata), spool, job_id, actor_id,
                             max_inflight=max_inflight, on_ack=on_ack, on_reject=on_reject)
        self.weights: WeightClient | None = None

    def handshake(self, req: pb.HandshakeRequest, connect_timeout_s: float | None,
                  on_retry: Callable[[float, grpc.RpcError], None],
                  deadline_error: Callable[[grpc.RpcError], Unavailable]) -> pb.HandshakeResponse:
        """Send ``req``, retrying while the learner is unreachable (UNAVAILABLE, DEADLINE_EXCEEDED;
        10 s per attempt, backoff 0.2 s doubling to 10 s). Before each pause ``on_retry(pause_s, err)``
        is called (the owner logs). A refusal raises :func:`error_from_rpc` of it. With
        ``connect_timeout_s`` (None: retry forever), a pause that would end past that many seconds
        from now raises ``deadline_error(err)`` instead (without calling ``on_retry``)."""
        deadline = None if connect_timeout_s is None else time.monotonic() + connect_timeout_s
        delay = 0.2
        while True:
            try:
                return self.stub.Handshake(req, metadata=self.metadata, timeout=10.0)
            except grpc.RpcError as err:
                if err.code() not in RETRYABLE:
                    raise error_from_rpc(err) from None
                if deadline is not None and time.monotonic() + delay > deadline:
                    raise deadline_error(err) from None
                on_retry(delay, err)
                time.sleep(delay)
                delay = min(10.0, delay * 2)

    def unary(self, method: str, req, timeout: float = 10.0):
        """One unary call of the Learner service (``method``: its name, e.g. ``"Admit"``) with this
        actor's metadata. A refusal raises :func:`error_from_rpc` of it; the grpc.RpcError of an
        unreachable learner (UNAVAILABLE, DEADLINE_EXCEEDED) passes through for the caller to retry."""
        try:
            return getattr(self.stub, method)(req, metadata=self.metadata, timeout=timeout)
        except grpc.RpcError as err:
            if err.code() not in RETRYABLE:
                raise error_from_rpc(err) from None
            raise

    def follow_weights(self, cls: type[WeightClient] = WeightClient, *, zero_copy: bool = True, **kw) -> WeightClient:
        """Make (not start) the weight follower: ``cls(stub, job_id, actor_id, metadata, **kw)``, kept
        as :attr:`weights`. ``zero_copy``: also hand it the channel, so weight chunks are read without
        copying their payload (:func:`fleetloop.client.weight_client.raw_fetch_callable`)."""
        if zero_copy:
            kw["channel"] = self.channel
        self.weights = cls(self.stub, self.job_id, self.actor_id, self.metadata, **kw)
        return self.weights

    def start(self, max_message_bytes: int | None, send: bool = True) -> None:
        """Start the background sender (unless ``send`` is False: chunks then only accumulate in the
        spool) within the learner's announced ``max_message_bytes`` (None: unknown), and the weight
        follower, if :meth:`follow_weights` made one."""
        self.sender.max_message_bytes = max_message_bytes  # settable only before the sender starts
        if send:
            self.sender.start()
        if self.weights is not None:
            self.weights.start()

    @property
    def job_stopping(self) -> bool:
        """True once the learner announced that the job is stopping (newest weight announcement)."""
        return self.weights is not None and self.weights.job_state == "stopping"

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every spooled chunk is acknowledged (or set aside); False on timeout."""
        return self.spool.wait_empty(timeout)

    def close(self, flush_timeout: float = 10.0, flush: bool = True) -> None:
        """Wait up to ``flush_timeout`` s for the spool to drain (with ``flush``; a timeout is not an
        error), stop the sender and the weight follower, close the channel. Acknowledged chunks are
        gone from the spool; every other one stays in the spool folder for the next process on it
        (close never deletes or rejects anything). Safe to call twice; the connection is not reusable."""
        if flush:
            self.flush(flush_timeout)
        self.sender.stop()
        if self.weights is not None:
            self.weights.stop()
        self.channel.close()
