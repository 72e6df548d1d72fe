"""Payloads of ``fleetloop bench ingest``: what one actor step (or LLM group) carries, built the way a
real actor builds it, plus the identical serialized chunks the raw-gRPC baseline resends.

- ``state``: Meta-World robot steps: obs ``state`` f32[39], action f32[4] (the default job's specs);
- ``images``: the same plus obs ``images`` uint8[3, 224, 224, 3] (three RGB cameras), raw bytes;
- ``images-compressed``: the same images, each frame JPEG (quality 90) or PNG encoded
  (``Tensor.encoding``, :mod:`fleetloop.image_codec`); the learner checks every frame's header and
  stores the frames compressed (``images.storage``; ``decoded``: it decodes every frame at ingest);
- ``pixels``: what the simulated robot sends in pixel mode (:func:`fleetloop.presets.metaworld_specs`
  ``("pixels")``): obs ``proprio`` f32[8] plus two 84x84 RGB cameras (``corner3``, ``gripperPOV``),
  each frame JPEG q90, 50 steps per chunk, action f32[4];
- ``llm``: GRPO groups (``EpisodeChunk.group``, protocol 2): one prompt, G completions with token ids,
  behaviour log-probs, reward, policy version and text, each under a real admission ticket.

Images are synthetic but camera-like (smooth shading, a few soft objects, Gaussian sensor noise
sigma 3, from a fixed seed), never all zeros: they compress like real frames (JPEG q90 ~15x, PNG
~1.6x). Each actor cycles a pool of :data:`FRAME_POOL` steps of frames (memory stays bounded with 32
actors). Compressed frames are encoded once per actor, as a camera that delivers JPEG/PNG (or a
hardware encoder) would hand them over; :func:`encode_cost_ms` measures what encoding on the actor's
CPU would cost instead.

Everything here imports numpy/protobuf lazily (``fleetloop bench --help`` imports bench modules).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

PAYLOADS = ("state", "images", "images-compressed", "pixels", "llm")
OBS_DIM, ACT_DIM = 39, 4
CAMERAS, IMAGE_HW = 3, 224
FRAME_POOL = 16              # distinct steps of camera frames per actor, cycled
IMAGE_CHUNK_STEPS = 8        # 8 steps x 3 raw RGB frames = 3.6 MB per chunk (< the 8 MiB message limit)
LLM_GROUP_SIZE = 8           # G completions per group
LLM_PROMPT_TOKENS = 64
LLM_COMPLETION_TOKENS = 128
LLM_VOCAB = 512              # the 'tiny' model's vocabulary (the learner checks every id against it)


@dataclass(frozen=True)
class PayloadSpec:
    """One payload kind: its name, the chunk size actors use, and the image encoding (None: no images)."""

    name: str
    chunk_steps: int
    images: str | None = None          # None, "raw", "jpeg" or "png"
    quality: int = 90                  # JPEG quality
    unit: str = "steps"                # what one measured item is: robot steps or LLM groups
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def robot(self) -> bool:
        return self.name != "llm"

    @property
    def max_episode_steps(self) -> int | None:
        """Longest episode actors record (None: as configured): raw 224 px images are 450 KB a step."""
        return 64 if self.images and self.name != "pixels" else None

    @property
    def observations(self) -> list[dict[str, Any]]:
        """The observation specs (plain dicts, vector first): what the learner and the actors declare."""
        if self.name == "pixels":
            from fleetloop.presets import metaworld_specs

            return metaworld_specs("pixels")[0]
        obs = [{"name": "state", "dtype": "float32", "shape": [OBS_DIM]}]
        if self.images:
            obs.append({"name": "images", "dtype": "uint8", "shape": [CAMERAS, IMAGE_HW, IMAGE_HW, 3]})
        return obs


def payload_spec(name: str, state_chunk_steps: int = 50, image_codec: str = "jpeg") -> PayloadSpec:
    """The :class:`PayloadSpec` of ``name`` (ValueError naming it when unknown)."""
    if name == "state":
        return PayloadSpec("state", state_chunk_steps)
    if name == "images":
        return PayloadSpec("images", IMAGE_CHUNK_STEPS, images="raw")
    if name == "images-compressed":
        return PayloadSpec("images-compressed", IMAGE_CHUNK_STEPS, images=image_codec)
    if name == "pixels":
        return PayloadSpec("pixels", 50, images="jpeg")
    if name == "llm":
        return PayloadSpec("llm", 1, unit="groups")
    raise ValueError(f"--payload {name!r} is not one of {', '.join(PAYLOADS)}")


# -- robot payloads ---------------------------------------------------------------------------
def learner_specs(spec: PayloadSpec) -> dict[str, Any]:
    """``observation_specs`` for the learner config (the vector first: the policy's input)."""
    return {"observation_specs": spec.observations}


def robot_specs(spec: PayloadSpec) -> tuple[list, list]:
    """Wire observation/action specs an actor declares in its handshake."""
    from fleetloop.codec import make_spec

    obs = [make_spec(**s) for s in spec.observations]
    return obs, [make_spec("action", "float32", [ACT_DIM], [-1.0] * ACT_DIM, [1.0] * ACT_DIM)]


def camera_frames(seed: int, steps: int = FRAME_POOL, cameras: int = CAMERAS, hw: int = IMAGE_HW):
    """uint8 [steps, cameras, hw, hw, 3]: smooth shading + soft objects + sensor noise (fixed seed)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:hw, 0:hw].astype(np.float32) * (IMAGE_HW / hw)  # the same scene at any resolution
    out = np.empty((steps, cameras, hw, hw, 3), dtype=np.uint8)
    for cam in range(cameras):
        scene = [(rng.uniform(0, IMAGE_HW), rng.uniform(0, IMAGE_HW), rng.uniform(15, 40), rng.uniform(0, 255, 3),
                  rng.uniform(-2, 2, 2)) for _ in range(4)]
        for t in range(steps):
            img = np.stack([128 + 90 * np.sin(x / 37 + cam + c) * np.cos(y / 53 - c) for c in range(3)], -1)
            for cx, cy, r, colour, (vx, vy) in scene:  # objects drift a little per step
                m = np.exp(-((x - cx - vx * t) ** 2 + (y - cy - vy * t) ** 2) / (2 * r * r))[..., None]
                img = img * (1 - m) + m * colour
            img += rng.normal(0, 3, img.shape)
            out[t, cam] = np.clip(img, 0, 255).astype(np.uint8)
    return out


@dataclass
class RobotSource:
    """One actor's synthetic experience: per step obs / action / reward, frames cycled from a pool."""

    spec: PayloadSpec
    seed: int
    steps: int

    def __post_init__(self) -> None:
        import numpy as np

        rng = np.random.default_rng(self.seed)
        vector, *images = self.spec.observations
        self.vector, self.image_specs = vector["name"], images
        self.state = rng.standard_normal((self.steps, vector["shape"][0]), dtype=np.float32)
        self.actions = rng.uniform(-1.0, 1.0, (self.steps, ACT_DIM)).astype(np.float32)
        self.rewards = [float(r) for r in rng.standard_normal(self.steps, dtype=np.float32)]
        self.frames: dict[str, Any] = {}  # image tensor -> [FRAME_POOL, *shape] uint8
        for i, img in enumerate(images):
            shape = img["shape"]
            pool = camera_frames(self.seed + 7 * i, cameras=shape[0] if len(shape) == 4 else 1, hw=shape[-2])
            self.frames[img["name"]] = pool if len(shape) == 4 else pool[:, 0]
        self.encoded: dict[str, list[list[bytes]]] | None = None  # per image tensor, per pool step: its encoded frames
        if self.spec.images in ("jpeg", "png"):
            from fleetloop.image_codec import encode_frames

            self.encoded = {name: [encode_frames(pool[t].reshape(-1, *pool.shape[-3:]), self.spec.images,
                                                 quality=self.spec.quality) for t in range(len(pool))]
                            for name, pool in self.frames.items()}

    def obs(self, t: int):
        if not self.frames and self.vector == "state":
            return self.state[t]
        return {self.vector: self.state[t], **{n: pool[t % len(pool)] for n, pool in self.frames.items()}}


def record_episode(client, task: str, src: RobotSource) -> int:
    """Record one episode of ``src`` on a connected ``FleetClient``; returns its steps.

    ``state`` / ``images``: the real ``EpisodeRecorder`` (``client.begin_episode``). ``images-compressed``:
    :func:`_record_encoded`, the same chunks with the frames in ``Tensor.frames`` (the runtime's recorder
    has no per-tensor encoding option yet)."""
    if src.encoded is not None:
        return _record_encoded(client, task, src)
    ep = client.begin_episode(task)
    for t in range(src.steps):
        ep.record(src.obs(t), src.actions[t], src.rewards[t], False)
    ep.end("timeout")
    return src.steps


def _record_encoded(client, task: str, src: RobotSource) -> int:
    """What ``EpisodeRecorder`` does (chunks of ``chunk_steps``, spooled with open-episode markers),
    with the camera frames already encoded: the image tensor carries ``encoding`` + ``frames``."""
    import numpy as np

    from fleetloop.codec import encode
    from fleetloop.image_codec import encoding_code
    from fleetloop.v1 import fleetloop_pb2 as pb

    enc = encoding_code(src.spec.images)
    n = client.run_config.chunk_steps
    episode = f"{client.actor_id}-{uuid.uuid4().hex[:16]}"
    version = max(client.version, 0)
    seq, spooled_reward = 0, 0.0
    for first in range(0, src.steps, n):
        t1 = min(src.steps, first + n)
        last = t1 == src.steps
        chunk = pb.EpisodeChunk(job_id=client.job_id, actor_id=client.actor_id, episode_id=episode, seq=seq,
                                task_id=task, behavior_version=version, first_step=first, produced_at=time.time())
        encode(src.state[first:t1], chunk.observations[src.vector])
        for spec in src.image_specs:
            img, pool = chunk.observations[spec["name"]], src.encoded[spec["name"]]
            img.dtype = pb.UINT8
            img.shape.extend([t1 - first, *spec["shape"]])
            img.encoding = enc
            for t in range(first, t1):
                img.frames.extend(pool[t % len(pool)])
        encode(src.actions[first:t1], chunk.actions["action"])
        encode(np.asarray(src.rewards[first:t1], np.float32), chunk.rewards)
        encode(np.zeros(t1 - first, np.bool_), chunk.interventions)
        if last:
            chunk.end.CopyFrom(pb.EpisodeEnd(outcome=pb.TIMEOUT, length=src.steps, total_reward=float(sum(src.rewards))))
        client.spool.put(episode, seq, chunk.SerializeToString())
        spooled_reward += float(sum(src.rewards[first:t1]))
        if last:
            client.spool.clear_open(episode)
        else:
            client.spool.mark_open(episode, {"job_id": client.job_id, "actor_id": client.actor_id, "task_id": task,
                                             "behavior_version": version, "next_seq": seq + 1, "first_step": t1,
                                             "total_reward": spooled_reward})
        seq += 1
    return src.steps


def robot_messages(spec: PayloadSpec, actor_id: str, seed: int, steps: int, job: str, task: str) -> list[bytes]:
    """The serialized chunks of one episode of ``spec`` as an actor would send them (the raw baseline's
    bytes): recorded through the same code path as :func:`record_episode` into a capturing client."""
    from types import SimpleNamespace

    from fleetloop.v1 import fleetloop_pb2 as pb

    obs_specs, act_specs = robot_specs(spec)
    captured: list[bytes] = []
    spool = SimpleNamespace(put=lambda episode_id, seq, raw: captured.append(raw), mark_open=lambda *a: None,
                            clear_open=lambda *a: None)
    fake = SimpleNamespace(job_id=job, actor_id=actor_id, observation_specs=obs_specs, action_specs=act_specs,
                           run_config=pb.RunConfig(chunk_steps=spec.chunk_steps, task_ids=[task]), spool=spool,
                           version=0, _episode_closed=lambda rec, outcome: None, _open=None)
    src = RobotSource(spec, seed, steps)
    if src.encoded is not None:
        _record_encoded(fake, task, src)
    else:
        from fleetloop.client.runtime import EpisodeRecorder

        rec = EpisodeRecorder(fake, task, f"{actor_id}-{uuid.uuid4().hex[:16]}", 0)
        for t in range(steps):
            rec.record(src.obs(t), src.actions[t], src.rewards[t], False)
        rec.end("timeout")
    return captured


def encode_cost_ms(codec: str, quality: int = 90, frames: int = 12) -> dict[str, float]:
    """Mean ms to encode / decode one 224x224 RGB frame with ``codec`` here, and the compression ratio."""
    from fleetloop.image_codec import ENCODINGS, decode_frames, encode_frames

    imgs = camera_frames(7, steps=max(1, frames // CAMERAS))
    t0 = time.perf_counter()
    enc = encode_frames(imgs, codec, quality=quality)
    t1 = time.perf_counter()
    decode_frames(enc, imgs.shape, ENCODINGS[codec], "frames")
    t2 = time.perf_counter()
    n = len(enc)
    return {"encode_ms_per_frame": (t1 - t0) / n * 1e3, "decode_ms_per_frame": (t2 - t1) / n * 1e3,
            "compression_ratio": imgs.nbytes / sum(len(b) for b in enc)}


# -- LLM groups -------------------------------------------------------------------------------
def llm_group_template(actor_id: str, seed: int, job: str, task: str):
    """One GRPO group chunk (``EpisodeChunk.group``) shaped like an LLM rollout server's: a
    :data:`LLM_PROMPT_TOKENS`-token prompt, :data:`LLM_GROUP_SIZE` completions of
    :data:`LLM_COMPLETION_TOKENS` tokens with behaviour log-probs, rewards, version 0 and their text."""
    import numpy as np

    from fleetloop.v1 import fleetloop_pb2 as pb

    rng = np.random.default_rng(seed)
    prompt = rng.integers(3, LLM_VOCAB, LLM_PROMPT_TOKENS).tolist()
    comps = []
    for _ in range(LLM_GROUP_SIZE):
        ids = rng.integers(3, LLM_VOCAB, LLM_COMPLETION_TOKENS).tolist()
        logprobs = (-rng.exponential(1.5, LLM_COMPLETION_TOKENS)).astype(np.float32).tolist()
        text = "".join(chr(97 + int(i) % 26) for i in rng.integers(0, 26, 4 * LLM_COMPLETION_TOKENS))
        comps.append(pb.Completion(token_ids=ids, logprobs=logprobs, reward=float(rng.integers(0, 2)), policy_version=0,
                                   text=text, finish_reason="length"))
    prompt_text = "".join(chr(97 + int(i) % 26) for i in rng.integers(0, 26, 4 * LLM_PROMPT_TOKENS))
    return pb.EpisodeChunk(job_id=job, actor_id=actor_id, episode_id=f"{actor_id}-template", seq=0, task_id=task,
                           behavior_version=0, produced_at=time.time(),
                           end=pb.EpisodeEnd(outcome=pb.SUCCESS, total_reward=0.5, length=LLM_GROUP_SIZE),
                           group=pb.CompletionGroup(prompt_id="p-0", prompt_text=prompt_text, prompt_token_ids=prompt,
                                                    completions=comps, ticket_id="t" * 32, admitted_version=0,
                                                    task_id=task))


def llm_group_bytes(template, ticket_id: str) -> tuple[str, bytes]:
    """(episode id, serialized chunk) of one group: the template under a fresh episode id and ``ticket_id``."""
    from fleetloop.v1 import fleetloop_pb2 as pb

    chunk = pb.EpisodeChunk()
    chunk.CopyFrom(template)
    chunk.episode_id = f"{template.actor_id}-{uuid.uuid4().hex[:16]}"
    chunk.group.ticket_id = ticket_id
    chunk.group.prompt_id = chunk.episode_id[-16:]
    chunk.produced_at = time.time()
    return chunk.episode_id, chunk.SerializeToString()


def llm_learner_config(state_dir: str, job: str, task: str) -> dict[str, Any]:
    """An LLM learner config whose limits fit the groups above; admission capacity large enough that
    tickets never run out in a bench window without training (eta 64 x 4096 groups)."""
    return {"kind": "llm", "job_id": job, "host": "127.0.0.1", "port": 0, "metrics_port": None,
            "state_dir": state_dir, "model": "tiny", "tasks": [{"name": "arith", "id": task}],
            "group_size": LLM_GROUP_SIZE, "batch_groups": 4096, "eta": 64, "max_new_tokens": LLM_COMPLETION_TOKENS,
            "max_prompt_tokens": 512, "device": "cpu", "ticket_ttl_s": 600.0}
