"""Fetching a version's weights from a running learner over its gRPC weight service (``FetchWeights``),
for launchers whose API process does not share the learner's volume (Kubernetes).

:func:`fetch_weights` opens one ``FetchWeights`` stream and reads its first chunk before returning,
so an unknown or pruned version (the learner's NOT_FOUND), a bad credential or an unreachable learner
is raised as the matching :class:`~fleetloop.errors.FleetloopError` before any byte is handed on (the
API can still answer 404 / 503). The returned :class:`~services.control.launchers.base.WeightStream`
yields each chunk's bytes as they arrive (one chunk, at most the learner's ``weight_chunk_bytes``, in
memory at a time) and checks that every chunk belongs to the version, continues at the previous
chunk's end and that the total is the announced size (IntegrityError otherwise; the HTTP response
is then cut short, which a client sees as a short, failing body). The channel is closed when the
stream ends or is closed.
"""

from __future__ import annotations

from typing import Iterator

import grpc

from fleetloop import errors
from fleetloop.channels import channel_options
from fleetloop.errors import FleetloopError, IntegrityError
from fleetloop.v1 import fleetloop_pb2 as pb
from fleetloop.v1 import fleetloop_pb2_grpc as pb_grpc
from services.control.launchers.base import WEIGHT_CHUNK_BYTES, WeightStream

#: actor id the control plane fetches weights as (its enrollment may act as exactly this one)
EXPORT_ACTOR = "control-plane-export"


def error_from_rpc(err: grpc.RpcError, what: str) -> FleetloopError:
    """The FleetloopError subclass of ``err``'s status code (FleetloopError for any other), naming ``what``."""
    code = err.code().name if callable(getattr(err, "code", None)) and err.code() is not None else "UNKNOWN"
    details = err.details() if callable(getattr(err, "details", None)) else str(err)
    for cls in errors.FleetloopError.__subclasses__():
        if cls.code == code:
            return cls(f"{what}: {details or code}", field="version")
    return FleetloopError(f"{what}: {code}: {details}", field="version")


def fetch_weights(target: str, job_id: str, version: int, token: str | None,
                  credentials: grpc.ChannelCredentials | None = None, timeout_s: float = 600.0) -> WeightStream:
    """Open ``FetchWeights`` of ``version`` on the learner at ``target`` (``host:port``; TLS with
    ``credentials``) as :data:`EXPORT_ACTOR` with bearer ``token``. See the module docstring."""
    opts = channel_options(max_message_bytes=64 << 20)
    channel = grpc.secure_channel(target, credentials, options=opts) if credentials else grpc.insecure_channel(target, options=opts)
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    what = f"fetching version {version} of job {job_id!r} from its learner at {target}"
    try:
        stream = pb_grpc.LearnerStub(channel).FetchWeights(
            pb.FetchRequest(job_id=job_id, actor_id=EXPORT_ACTOR, version=int(version), chunk_bytes=WEIGHT_CHUNK_BYTES),
            metadata=metadata, timeout=timeout_s)
        first = next(stream)
    except grpc.RpcError as err:
        channel.close()
        raise error_from_rpc(err, what) from None
    except StopIteration:
        channel.close()
        raise IntegrityError(f"{what}: the learner sent no chunk", field="version", value=version) from None
    except BaseException:
        channel.close()
        raise
    return WeightStream(int(version), int(first.total_size), _chunks(channel, stream, first, int(version), what))


def _chunks(channel: grpc.Channel, stream, first: pb.WeightChunk, version: int, what: str) -> Iterator[bytes]:
    total, at = int(first.total_size), 0
    try:
        chunk = first
        while True:
            if chunk.version != version or chunk.offset != at or chunk.total_size != total:
                raise IntegrityError(f"{what}: chunk (version {chunk.version}, offset {chunk.offset}, total "
                                     f"{chunk.total_size}) does not follow (version {version}, offset {at}, total {total})",
                                     field="chunk", value=int(chunk.offset))
            if chunk.data:
                at += len(chunk.data)
                yield chunk.data
            try:
                chunk = next(stream)
            except StopIteration:
                break
        if at != total:
            raise IntegrityError(f"{what}: stream ended at byte {at} of {total}", field="chunk", value=at)
    except grpc.RpcError as err:
        raise error_from_rpc(err, what) from None
    finally:
        stream.cancel()
        channel.close()
