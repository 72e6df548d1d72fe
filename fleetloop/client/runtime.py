"""The actor runtime: a small library that robot integrators embed in their own control loop.

    client = FleetClient("learner.example:50051", job_id="demo", actor_id="robot-7",
                         credential=token, observation_specs=[...], action_specs=[...], tasks=["reach-v3"])
    run = client.connect()                      # handshake, first verified policy
    client.on_new_policy(lambda w: print("v", w.version, "ready"))
    while True:
        client.swap_if_ready()                  # only between episodes
        ep = client.begin_episode("reach-v3")
        ...  ep.record(obs, action, reward, intervened=operator_has_control)
        ep.end("success")

Contract:
- stateless: everything not yet acknowledged lives in the spool folder; restart with the same
  folder and the runtime resends it (exactly-once on the learner by (episode_id, seq));
- an episode cut by a crash (chunks spooled, no end chunk) is *left open* by default: its
  spooled chunks are resent and stored (trainable), it just never gets an outcome; the next
  process on the spool logs ``episode_left_open`` for it. With ``abort_interrupted=True`` that
  process closes it as ``aborted`` instead: one end chunk with no steps, the next sequence number
  and ``length`` = the steps that reached the spool (steps still in memory at the crash were never
  sent and are not counted). Off by default: learners before this release failed on zero-step end
  chunks (this one stores them: ``tests/fuzz/test_fuzz_server.py``); an interrupted episode left
  open still has every spooled step stored and trainable, it only lacks an outcome;
- every step recorded carries the version of the policy that ran the episode (fixed at
  ``begin_episode``); the runtime never swaps weights inside an episode;
- weights are used only after their sha256 was verified;
- no call blocks on the network: recording writes to the spool, a background sender ships it;
- no chunk sent is larger than the ``max_message_bytes`` the learner announced at the handshake:
  the recorder (:mod:`fleetloop.client.recorder`) splits chunks by steps and sets aside a step that alone is
  larger; the sender (:mod:`fleetloop.client.sender`) sets aside a spooled chunk over the limit, or one refused
  for size, instead of retrying it (logged, counted; README "Oversized messages").
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Callable, Mapping, Protocol, Sequence

import grpc
import numpy as np

from fleetloop.client.connection import ConnectionParts, LearnerConnection
from fleetloop.client.limits import announced_limit
from fleetloop.client.recorder import EpisodeRecorder, _empty_tensors
from fleetloop.client.spool import Spool, SpoolEntry
from fleetloop.client.weight_client import VerifiedWeights
from fleetloop.channels import channel_options
from fleetloop import wire_settings
from fleetloop.codec import PROTOCOL_VERSION, encode
from fleetloop.errors import InvalidArgument, Unavailable
from fleetloop.logs import event, get_logger
from fleetloop.v1 import fleetloop_pb2 as pb
from fleetloop.weights import resolve_format


class ClientMetrics(Protocol):
    """Where a :class:`FleetClient` counts what it sets aside (``actor.metrics.ActorMetrics`` of the
    simulated robots is one; any object with these two labelled counters, e.g. prometheus_client
    ``Counter``s, will do): ``oversized_steps.labels(actor_id, task).inc()`` and
    ``set_aside_chunks.labels(actor_id, reason).inc()``."""

    oversized_steps: Any
    set_aside_chunks: Any

log = get_logger("actor")
# channel_options: re-exported (``bench/ingest_workers.py`` imports it from here)
__all__ = ["ClientMetrics", "EpisodeRecorder", "FleetClient", "channel_options", "close_interrupted_episodes"]


def _check_image_encoding(encodings: Mapping[str, str], obs_specs: Sequence, quality: int) -> dict[str, str]:
    """The validated ``image_encoding`` of :class:`FleetClient` (see there)."""
    from fleetloop import image_codec

    by_name = {s.name: s for s in obs_specs}
    out = {}
    for name, enc in encodings.items():
        field = f"image_encoding[{name}]"
        if name not in by_name:
            raise InvalidArgument(f"{field}: no observation tensor {name!r} (this actor declares {sorted(by_name)})",
                                  field=field, value=name)
        code = image_codec.encoding_code(enc)
        if code == image_codec.RAW:
            continue
        spec = by_name[name]
        if int(spec.dtype) != image_codec.UINT8:
            raise InvalidArgument(f"{field}: {enc} needs a uint8 tensor; {name!r} is not", field=field, value=int(spec.dtype))
        image_codec.check_image_layout([int(d) for d in spec.shape], code, field)
        out[name] = str(enc).lower()
    if out and not 1 <= int(quality) <= 95:
        raise InvalidArgument(f"jpeg_quality {quality} must be in 1..95", field="jpeg_quality", value=quality)
    return out


def close_interrupted_episodes(spool: Spool, observation_specs: Sequence, action_specs: Sequence,
                               abort: bool = True) -> list[str]:
    """Handle every episode a previous process on ``spool`` left open (it died mid-episode).

    With ``abort``: spool one end chunk with outcome ABORTED, no steps, the episode's next sequence
    number and ``length`` = the steps that reached the spool, then drop the marker. The next sequence
    number and step come from the marker or, if higher, the episode's chunks still in the spool (a
    crash between a chunk's put and its marker update). Without ``abort``: log it and drop the
    marker (the episode stays open on the learner). An episode whose end chunk is already spooled
    only loses its marker. Returns the episode ids closed (or left open)."""
    closed = []
    for info in spool.open_episodes():
        episode_id = info["episode_id"]
        chunks = [pb.EpisodeChunk.FromString(e.raw) for e in spool.entries_of(episode_id)]
        if any(c.HasField("end") for c in chunks):
            spool.clear_open(episode_id)
            continue
        if not abort:
            spool.clear_open(episode_id)
            event(log, "episode_left_open", level=30, job=info.get("job_id"), actor=info.get("actor_id"),
                  version=info.get("behavior_version"), episode=episode_id, task=info.get("task_id"),
                  steps=info.get("first_step"))
            closed.append(episode_id)
            continue
        next_seq = max([int(info.get("next_seq", 0))] + [int(c.seq) + 1 for c in chunks])
        first_step = max([int(info.get("first_step", 0))] +
                         [int(c.first_step) + (int(c.rewards.shape[0]) if c.rewards.shape else 0) for c in chunks])
        chunk = pb.EpisodeChunk(job_id=str(info.get("job_id", "")), actor_id=str(info.get("actor_id", "")),
                                episode_id=episode_id, seq=next_seq, task_id=str(info.get("task_id", "")),
                                behavior_version=int(info.get("behavior_version", 0)), first_step=first_step,
                                produced_at=time.time())
        _empty_tensors(observation_specs, chunk.observations)
        _empty_tensors(action_specs, chunk.actions)
        encode(np.zeros(0, np.float32), chunk.rewards)
        encode(np.zeros(0, np.bool_), chunk.interventions)
        chunk.end.CopyFrom(pb.EpisodeEnd(outcome=pb.ABORTED, length=first_step,
                                         total_reward=float(info.get("total_reward", 0.0))))
        spool.put(episode_id, next_seq, chunk.SerializeToString())
        spool.clear_open(episode_id)
        event(log, "episode_aborted", job=chunk.job_id, actor=chunk.actor_id, version=chunk.behavior_version,
              episode=episode_id, task=chunk.task_id, seq=next_seq, steps=first_step)
        closed.append(episode_id)
    return closed


class FleetClient(ConnectionParts):
    """Connection to one learner for one actor. Thread-safe for one control loop."""

    def __init__(self, learner: str, job_id: str, actor_id: str, observation_specs: Sequence, action_specs: Sequence,
                 tasks: Sequence[str], credential: str | None = None, spool_dir: str | None = None,
                 capabilities: Mapping[str, str] | None = None, max_inflight: int = 32, connect_timeout_s: float | None = 120.0,
                 send_experience: bool = True, tls_ca_file: str | None = None, tls_cert_file: str | None = None,
                 tls_key_file: str | None = None, abort_interrupted: bool = False,
                 image_encoding: Mapping[str, str] | None = None, jpeg_quality: int = 90,
                 metrics: ClientMetrics | None = None, weights_format: str = "auto") -> None:
        """``image_encoding``: observation name -> 'jpeg' (lossy, ``jpeg_quality`` 1..95) or 'png'
        (lossless) for uint8 [..., H, W, C] camera tensors, compressed per frame on this actor before
        they are spooled and sent (``Tensor.encoding``; the learner decodes and checks every frame).
        InvalidArgument naming ``image_encoding[name]`` for an unknown name, a non-uint8 or non-image
        spec, or an unknown encoding. ``metrics``: where the runtime counts what it sets aside
        (``fleetloop_actor_oversized_steps_total``, ``fleetloop_actor_set_aside_chunks_total``);
        None = counted only on the recorder / sender objects. ``weights_format``: what
        :attr:`VerifiedWeights.state_dict` holds, "torch" (tensors), "numpy" (arrays; no torch needed)
        or "auto" (torch when it is installed, else numpy); InvalidArgument for anything else.

        Message size: after :meth:`connect` every chunk is kept within the ``max_message_bytes`` the
        learner announced (the recorder splits chunks, a step alone over it is set aside; the
        sender sets aside a spooled chunk over it instead of sending it, and one the learner or the
        transport refuses for size instead of retrying it): see :mod:`fleetloop.client.recorder`,
        :mod:`fleetloop.client.sender`."""
        self.learner, self.job_id, self.actor_id = learner, job_id, actor_id
        self.observation_specs, self.action_specs = list(observation_specs), list(action_specs)
        self.image_encoding = _check_image_encoding(image_encoding or {}, self.observation_specs, jpeg_quality)
        self.jpeg_quality = int(jpeg_quality)
        self.tasks, self.credential = list(tasks), credential
        self.capabilities = dict(capabilities or {})
        self.connect_timeout_s, self.send_experience = connect_timeout_s, send_experience
        self.metrics = metrics
        self.weights_format = resolve_format(weights_format)
        spool = Spool(spool_dir or f"/tmp/fleetloop-spool-{actor_id}")
        # episodes a killed predecessor on this spool left open: closed as aborted, or left open (module docstring)
        self.interrupted_episodes = close_interrupted_episodes(spool, self.observation_specs, self.action_specs,
                                                               abort=abort_interrupted)
        # acks and set-aside chunks reach _on_ack / _on_reject through the instance, so a wrapper
        # installed on the client (or its class) after construction sees them
        self.connection = LearnerConnection(learner, job_id, actor_id, spool=spool, credential=credential,
                                            tls_ca_file=tls_ca_file, tls_cert_file=tls_cert_file,
                                            tls_key_file=tls_key_file, max_inflight=max_inflight,
                                            on_ack=lambda ack: self._on_ack(ack),
                                            on_reject=lambda entry, label, reason: self._on_reject(entry, label, reason))
        self.run_config: pb.RunConfig | None = None
        self.current: VerifiedWeights | None = None
        self.learner_version = -1
        self._callbacks: list[Callable[[VerifiedWeights], None]] = []
        self._open: EpisodeRecorder | None = None
        self.episodes: dict[str, int] = {}

    # -- connection --------------------------------------------------------------------------
    def connect(self) -> pb.RunConfig:
        """Handshake (retrying while the learner is unavailable), fetch and verify the fleet's
        policy, start the background sender and weight follower. Raises a FleetloopError for a
        refusal (protocol/spec mismatch, bad credential, unknown job). Idempotent."""
        if self.run_config is not None:
            return self.run_config
        req = pb.HandshakeRequest(protocol_version=PROTOCOL_VERSION, job_id=self.job_id, actor_id=self.actor_id, kind=pb.ROBOT,
                                  observation_specs=self.observation_specs, action_specs=self.action_specs, tasks=self.tasks,
                                  capabilities=self.capabilities)
        resp = self.connection.handshake(req, self.connect_timeout_s, self._handshake_retry, self._unreachable)
        self.run_config = resp.run_config
        self.connection.follow_weights(on_verified=self._on_verified, tensor_format=self.weights_format)
        if resp.HasField("current_policy"):
            self.weights.job_state = wire_settings.job_state(resp.current_policy)
        if resp.HasField("current_policy") and resp.current_policy.size_bytes:
            self.current = self.weights.fetch_now(resp.current_policy)
            self.weights.current_version = self.current.version
        event(log, "connected", job=self.job_id, actor=self.actor_id, version=self.version, learner=self.learner,
              spooled=len(self.spool))
        self.connection.start(announced_limit(self.run_config), send=self.send_experience)
        return self.run_config

    def _handshake_retry(self, delay: float, err: grpc.RpcError) -> None:
        if self.connect_timeout_s is None:  # with a deadline, retries are silent until it passes
            event(log, "learner_unreachable", level=30, job=self.job_id, actor=self.actor_id, learner=self.learner,
                  retry_in=delay, spooled=len(self.spool))

    def _unreachable(self, err: grpc.RpcError) -> Unavailable:
        return Unavailable(f"learner {self.learner} unreachable for {self.connect_timeout_s:.0f} s: {err.details()}",
                           field="learner", value=self.learner)

    def _on_ack(self, ack: pb.Ack) -> None:
        self.learner_version = ack.learner_version

    def _on_reject(self, entry: SpoolEntry, label: str, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.set_aside_chunks.labels(self.actor_id, label).inc()

    def _on_verified(self, weights: VerifiedWeights) -> None:
        for cb in list(self._callbacks):
            cb(weights)

    def on_new_policy(self, callback: Callable[[VerifiedWeights], None]) -> None:
        """Call ``callback`` (from a background thread) when a new verified version is ready to swap in."""
        self._callbacks.append(callback)

    @property
    def job_stopping(self) -> bool:
        """True once the learner announced that the job is stopping: finish the episode, flush, exit."""
        return self.connection.job_stopping

    @property
    def version(self) -> int:
        """Version of the policy this actor runs (-1 before the first)."""
        return -1 if self.current is None else self.current.version

    def swap_if_ready(self) -> VerifiedWeights | None:
        """Between episodes only: adopt the newest verified version, if one is pending. Returns it."""
        if self._open is not None:
            raise InvalidArgument(f"cannot swap weights inside episode {self._open.episode_id}", field="episode_id",
                                  value=self._open.episode_id)
        new = self.weights.pending() if self.weights else None
        if new is None:
            return None
        self.current = new
        self.weights.current_version = new.version
        event(log, "swapped", job=self.job_id, actor=self.actor_id, version=new.version)
        return new

    # -- episodes ----------------------------------------------------------------------------
    def begin_episode(self, task_id: str, episode_id: str | None = None) -> EpisodeRecorder:
        """Open an episode on ``task_id`` run by the current policy version."""
        if self.run_config is None:
            raise InvalidArgument("connect() first", field="state", value="disconnected")
        if self._open is not None:
            raise InvalidArgument(f"episode {self._open.episode_id} is still open", field="episode_id", value=self._open.episode_id)
        if task_id not in self.run_config.task_ids:
            raise InvalidArgument(f"task {task_id!r} is not a task of job {self.job_id!r}", field="task_id", value=task_id)
        rec = EpisodeRecorder(self, task_id, episode_id or f"{self.actor_id}-{uuid.uuid4().hex[:16]}", max(self.version, 0))
        self._open = rec
        return rec

    def _episode_closed(self, rec: EpisodeRecorder, outcome: str) -> None:
        self._open = None
        self.episodes[outcome] = self.episodes.get(outcome, 0) + 1

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every spooled chunk is acknowledged; False on timeout."""
        return self.connection.flush(timeout)

    def close(self, flush_timeout: float = 10.0) -> None:
        """Flush (bounded), stop background threads, close the channel. The spool keeps the rest."""
        self.connection.close(flush_timeout, flush=self.send_experience)
