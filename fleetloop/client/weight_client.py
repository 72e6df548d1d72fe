"""WeightClient: follows the learner's weight announcements, fetches and verifies new versions.

Contract:
- keeps at most one verified *pending* version (the newest announced; older pending ones are
  replaced: a parameter queue of depth one);
- a version is only offered after its sha256 matched the announcement and the blob parsed as
  safetensors (:func:`fleetloop.weights.verified_views`: the digest is computed while the chunks
  arrive, the tensors are views of the one received buffer); anything else is refused
  (IntegrityError naming the field), counted in ``refused`` / ``refusals`` and retried (3
  attempts, then on the next announcement);
- one copy of the weights per fetch: given the ``channel``, chunks are parsed without copying their
  payload (:mod:`fleetloop.weight_wire`), appended to one buffer, and the offered tensors are views
  of it; the client keeps no reference to a version once it was handed over;
- reassembly trusts nothing the server sends (:func:`fetch_into`): the announced size is capped
  before any allocation, every chunk must carry the announced version, digest and size and follow
  the previous one exactly; memory grows only with the bytes actually received;
- every fetch has a deadline (``fetch_timeout_s`` + size at ``min_rate_mb_s``); a stalled transfer
  fails instead of hanging; subscribe reconnects with capped backoff.
- tensors come as ``torch.Tensor`` s or ``numpy.ndarray`` s (``tensor_format``; ``"auto"``: torch when
  it is installed, else numpy; see :mod:`fleetloop.weights`): the client itself never needs torch.
The *swap* is the caller's decision (robots swap only between episodes, see ``FleetClient``).
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import grpc

from fleetloop import wire_settings
from fleetloop.errors import FleetloopError, IntegrityError
from fleetloop.logs import event, get_logger
from fleetloop.v1 import fleetloop_pb2 as pb
from fleetloop.weight_wire import Chunk, parse_chunk
from fleetloop.weights import BlobAssembler, load_verified, resolve_format, verified_views

log = get_logger("actor.weights")
SERVICE = "fleetloop.v1.Learner"


@dataclass
class VerifiedWeights:
    """A fetched, digest-verified policy version. ``state_dict``: tensor name -> ``torch.Tensor``
    (``tensor_format`` "torch") or ``numpy.ndarray`` ("numpy"), views of the one received buffer."""

    version: int
    sha256: str
    state_dict: dict[str, Any]
    size_bytes: int
    announced_at: float
    verified_at: float
    #: monotonic times of this fetch: ``fetch_start``, ``downloaded`` (last byte in, digest computed
    #: on the way), ``verified`` (digest compared, tensors parsed); empty when built elsewhere.
    timings: dict[str, float] = field(default_factory=dict)
    #: "torch" or "numpy": what ``state_dict`` holds.
    tensor_format: str = "torch"

    def arrays(self) -> dict[str, Any]:
        """The tensors as numpy arrays (the same objects in format "numpy"; from torch: CPU copies
        or views, bfloat16 / float8 widened to float32, as numpy has no such dtypes)."""
        if self.tensor_format == "numpy":
            return dict(self.state_dict)
        out = {}
        for name, t in self.state_dict.items():
            t = t.detach().cpu()
            no_numpy_dtype = t.dtype.is_floating_point and (t.element_size() == 1 or str(t.dtype) == "torch.bfloat16")
            out[name] = (t.float() if no_numpy_dtype else t).numpy()
        return out


#: Largest weight blob an actor accepts by default (a VLA's safetensors are a few GiB); a larger
#: announcement is refused before anything is allocated or downloaded.
MAX_WEIGHT_BYTES = 32 << 30
#: Chunk size an actor asks for (the learner clamps it to its ``weight_chunk_bytes``).
FETCH_CHUNK_BYTES = 1 << 20


def _chunks(stub, raw_fetch, req: pb.FetchRequest, metadata, timeout: float) -> Iterator[Chunk]:
    """The FetchWeights stream as :class:`fleetloop.weight_wire.Chunk` tuples: read by the generated
    code from ``stub``, or, with ``raw_fetch`` (the same RPC with identity (de)serializers), by
    :func:`fleetloop.weight_wire.parse_chunk`, whose ``data`` is a view (no copy)."""
    if raw_fetch is None:
        for part in stub.FetchWeights(req, metadata=metadata, timeout=timeout):
            yield Chunk(part.version, part.offset, part.data, part.total_size, part.sha256)
    else:
        for wire in raw_fetch(req.SerializeToString(), metadata=metadata, timeout=timeout):
            yield parse_chunk(wire)


def raw_fetch_callable(channel: grpc.Channel):
    """FetchWeights on ``channel`` with bytes in and out (for :func:`fetch_into`'s ``raw_fetch``)."""
    return channel.unary_stream(f"/{SERVICE}/FetchWeights", request_serializer=lambda b: b,
                                response_deserializer=lambda b: b)


def fetch_into(stub, job: str, actor: str, ann: pb.WeightAnnouncement, metadata, timeout: float,
               sink: BlobAssembler | None = None, chunk_bytes: int = FETCH_CHUNK_BYTES,
               max_bytes: int = MAX_WEIGHT_BYTES, raw_fetch=None) -> BlobAssembler:
    """Download the blob of ``ann.version`` (one FetchWeights stream) into ``sink`` (a new
    :class:`BlobAssembler` by default), which hashes each chunk as it arrives; returns the sink.
    With ``raw_fetch`` (:func:`raw_fetch_callable`) chunks are parsed without copying their bytes.

    Refuses with IntegrityError naming the field (and keeps nothing): ``ann.size_bytes`` over
    ``max_bytes``; a chunk whose version, sha256 or total_size differ from the announcement; a chunk
    not starting exactly where the previous one ended (gap, overlap, reorder, repeat); bytes past
    ``size_bytes``; an empty chunk anywhere but once at the end; fewer than ``size_bytes`` in all.
    Memory grows only with the bytes received. The digest itself is checked by the caller
    (:func:`fleetloop.weights.verified_views`).
    """
    size = int(ann.size_bytes)
    if size > max_bytes:
        raise IntegrityError(f"announced size_bytes {size} exceeds this actor's limit of {max_bytes}", field="size_bytes",
                             value=size)
    sink = BlobAssembler() if sink is None else sink
    received = 0
    ended = False
    req = pb.FetchRequest(job_id=job, actor_id=actor, version=ann.version, offset=0, chunk_bytes=chunk_bytes)
    for part in _chunks(stub, raw_fetch, req, metadata, timeout):
        if part.version != ann.version:
            raise IntegrityError(f"weight chunk of version {part.version} in the fetch of version {ann.version}",
                                 field="version", value=part.version)
        if part.sha256 != ann.sha256:
            raise IntegrityError(f"weight chunk names sha256 {part.sha256[:16]!r}, the announcement {ann.sha256[:16]!r}",
                                 field="sha256", value=part.sha256[:16])
        if part.total_size != size:
            raise IntegrityError(f"weight chunk names total_size {part.total_size}, the announcement {size}",
                                 field="total_size", value=part.total_size)
        if part.offset != received or ended:
            raise IntegrityError(f"weight chunk at offset {part.offset} does not follow {received}"
                                 + (" (after the end marker)" if ended else ""), field="offset", value=part.offset)
        data = part.data
        if received + len(data) > size:
            raise IntegrityError(f"weight chunk at offset {part.offset} of {len(data)} bytes runs past size_bytes {size}",
                                 field="data", value=len(data))
        if not data:
            if received != size:
                raise IntegrityError(f"weight chunk of 0 bytes at offset {part.offset} before the end ({size})", field="data",
                                     value=0)
            ended = True
        sink.append(data)
        received += len(data)
    if received != size:
        raise IntegrityError(f"received {received} of {size} weight bytes", field="size_bytes", value=received)
    return sink


def _refused_unless_loadable(load: Callable[[], dict[str, Any]], size: int, sha256: str) -> dict[str, Any]:
    """``load()``, with anything but an IntegrityError refused as one (field ``blob``): the digest only
    proves the bytes are the ones announced, not that they are weights (garbage published under a
    valid digest)."""
    try:
        return load()
    except IntegrityError:
        raise
    except Exception as exc:  # noqa: BLE001 - a parser surprise must not escape as anything but a refusal
        raise IntegrityError(f"{size}-byte blob {sha256[:16]}... is not loadable safetensors: {type(exc).__name__}: "
                             f"{str(exc)[:200]}", field="blob", value=size) from None


def views_checked(sink: BlobAssembler, sha256: str, fmt: str = "torch") -> dict[str, Any]:
    """:func:`fleetloop.weights.verified_views` (digest first, then zero-copy views in ``fmt``), refused
    as IntegrityError when the bytes are not loadable weights."""
    return _refused_unless_loadable(lambda: verified_views(sink, sha256, fmt), len(sink), sha256)


def load_checked(blob: bytes, sha256: str, fmt: str = "torch") -> dict[str, Any]:
    """:func:`load_verified` (digest first, whole blob in memory, tensors in ``fmt``), refused as
    IntegrityError when the bytes are not loadable weights."""
    return _refused_unless_loadable(lambda: load_verified(blob, sha256, fmt), len(blob), sha256)


class WeightClient:
    """Background subscriber + fetcher. ``pending()`` returns the newest verified version not yet taken."""

    def __init__(self, stub, job: str, actor: str, metadata, current_version: int = -1,
                 on_verified: Callable[[VerifiedWeights], None] | None = None,
                 fetch_timeout_s: float = 30.0, min_rate_mb_s: float = 5.0, max_weight_bytes: int = MAX_WEIGHT_BYTES,
                 channel: grpc.Channel | None = None, tensor_format: str = "auto") -> None:
        """``channel``: the channel ``stub`` was made from; given, weight chunks are read without
        copying their payload (:func:`raw_fetch_callable`), else through the generated code.
        ``tensor_format``: "torch", "numpy" or "auto" (torch when installed; resolved here, once:
        :func:`fleetloop.weights.resolve_format`); InvalidArgument for anything else."""
        self.tensor_format = resolve_format(tensor_format)
        self.stub, self.job, self.actor, self.metadata = stub, job, actor, metadata
        self._raw_fetch = raw_fetch_callable(channel) if channel is not None else None
        self.on_verified = on_verified
        self.fetch_timeout_s, self.min_rate_mb_s = fetch_timeout_s, min_rate_mb_s
        self.max_weight_bytes = max_weight_bytes
        self._lock = threading.Lock()
        self._pending: VerifiedWeights | None = None
        self._target: pb.WeightAnnouncement | None = None
        self.current_version = current_version
        self.job_state = "running"  # from the newest announcement ("stopping" asks the actor to finish)
        self.fetched = 0
        self.refused = 0                         # transfers or blobs refused (never offered)
        self.refusals: dict[str, int] = {}       # the same, by the field the refusal named
        self.fetch_seconds: list[float] = []
        self._stop = threading.Event()
        self._call = None
        self._wake = threading.Condition(self._lock)
        self._thread = threading.Thread(target=self._run, name=f"fleetloop-weights-{actor}", daemon=True)
        self._fetcher = threading.Thread(target=self._fetch_loop, name=f"fleetloop-fetch-{actor}", daemon=True)

    def start(self) -> None:
        self._thread.start()
        self._fetcher.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        call = self._call
        if call is not None:
            call.cancel()
        with self._wake:
            self._wake.notify_all()
        for thread in (self._thread, self._fetcher):
            if thread.ident is not None:
                thread.join(timeout)

    def pending(self) -> VerifiedWeights | None:
        """Take the pending verified version (None if there is none)."""
        with self._lock:
            weights, self._pending = self._pending, None
            return weights

    def peek_pending_version(self) -> int | None:
        with self._lock:
            return None if self._pending is None else self._pending.version

    def fetch_now(self, ann: pb.WeightAnnouncement) -> VerifiedWeights:
        """Fetch and verify ``ann`` synchronously (used at connect time). A refused transfer or blob
        raises IntegrityError and is counted; grpc.RpcError passes through (transport, not integrity).

        The blob is hashed while it arrives and its tensors are views of the received buffer
        (:func:`fetch_into`, :func:`views_checked`): one copy of the weights in this process, and no
        pass over them after the last byte but the header parse."""
        t0 = time.monotonic()
        timeout = self.fetch_timeout_s + min(ann.size_bytes, self.max_weight_bytes) / (self.min_rate_mb_s * 1e6)
        try:
            sink = fetch_into(self.stub, self.job, self.actor, ann, self.metadata, timeout, max_bytes=self.max_weight_bytes,
                              raw_fetch=self._raw_fetch)
            t1 = time.monotonic()
            state = views_checked(sink, ann.sha256, self.tensor_format)
        except IntegrityError as exc:
            with self._lock:
                self.refused += 1
                self.refusals[exc.field or "blob"] = self.refusals.get(exc.field or "blob", 0) + 1
            raise
        t2 = time.monotonic()
        dt = t2 - t0
        self.fetch_seconds.append(dt)
        self.fetched += 1
        event(log, "weights_verified", job=self.job, actor=self.actor, version=ann.version, bytes=ann.size_bytes, seconds=dt)
        return VerifiedWeights(ann.version, ann.sha256, state, ann.size_bytes, ann.published_at, time.time(),
                               {"fetch_start": t0, "downloaded": t1, "verified": t2}, self.tensor_format)

    def _run(self) -> None:
        delay = 0.2
        while not self._stop.is_set():
            try:
                call = self.stub.SubscribeWeights(
                    pb.SubscribeRequest(job_id=self.job, actor_id=self.actor, current_version=max(self.current_version, 0)),
                    metadata=self.metadata)
                self._call = call
                for ann in call:
                    delay = 0.2
                    if self._stop.is_set():
                        return
                    self._handle(ann)
            except ValueError:  # channel closed under us: the client is shutting down
                return
            except grpc.RpcError as err:
                if self._stop.is_set():
                    return
                event(log, "subscribe_lost", level=30, job=self.job, actor=self.actor, error=str(err.code()), retry_in=delay)
            finally:
                self._call = None
            self._stop.wait(delay * (0.5 + random.random()))
            delay = min(10.0, delay * 2)

    def _handle(self, ann: pb.WeightAnnouncement) -> None:
        """Subscriber side: remember only the newest announcement (depth-one queue) and wake the fetcher."""
        state = wire_settings.job_state(ann)  # the typed state, else the string ("" = running)
        if (ann.job_state or ann.state) and state != self.job_state:
            event(log, "job_state", job=self.job, actor=self.actor, version=ann.version, state=state)
        self.job_state = state
        with self._wake:
            self._target = ann
            self._wake.notify_all()

    def _fetch_loop(self) -> None:
        while not self._stop.is_set():
            with self._wake:
                self._wake.wait_for(lambda: self._target is not None or self._stop.is_set(), timeout=1.0)
                ann, self._target = self._target, None
                have = self._pending.version if self._pending is not None else self.current_version
            if ann is None or ann.version == have:
                continue
            for attempt in range(3):
                try:
                    weights = self.fetch_now(ann)
                except FleetloopError as exc:  # IntegrityError: counted by fetch_now
                    event(log, "weights_refused", level=40, job=self.job, actor=self.actor, version=ann.version, error=str(exc))
                    continue
                except grpc.RpcError as err:
                    event(log, "fetch_failed", level=30, job=self.job, actor=self.actor, version=ann.version,
                          error=str(err.code()), attempt=attempt)
                    self._stop.wait(0.5 * (attempt + 1))
                    continue
                except Exception as exc:  # noqa: BLE001 - a bug must not end the only thread that brings new weights
                    with self._lock:
                        self.refused += 1
                        self.refusals["internal"] = self.refusals.get("internal", 0) + 1
                    event(log, "weights_refused", level=40, job=self.job, actor=self.actor, version=ann.version,
                          error=f"{type(exc).__name__}: {exc}"[:300])
                    continue
                with self._wake:
                    self._pending = weights
                if self.on_verified is not None:
                    self.on_verified(weights)
                # drop this frame's reference: otherwise the version just handed over stays alive
                # (a whole extra copy of the weights) until the next fetch finishes
                del weights
                break
