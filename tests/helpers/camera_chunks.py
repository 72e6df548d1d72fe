"""Robot EpisodeChunks with camera tensors (JPEG, PNG or raw) for learner tests without an actor.

The job: ``proprio`` float32[4] plus one uint8 ``[size, size, 3]`` tensor per camera, ``action``
float32[2] in [-1, 1]. Frames are smooth and textured (they compress like camera frames) and carry
their step in their brightness, so a test can tell rows apart after a lossy round trip."""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from fleetloop.codec import encode
from fleetloop.v1 import fleetloop_pb2 as pb

ACT_DIM = 2


def camera_specs(size: int = 16, cameras: Sequence[str] = ("cam",)) -> dict[str, list[dict]]:
    """``observation_specs`` / ``action_specs`` for a LearnerConfig (plain dicts)."""
    obs = [{"name": "proprio", "dtype": "float32", "shape": [4]}]
    obs += [{"name": c, "dtype": "uint8", "shape": [size, size, 3]} for c in cameras]
    return {"observation_specs": obs,
            "action_specs": [{"name": "action", "dtype": "float32", "shape": [ACT_DIM], "low": [-1.0] * ACT_DIM,
                              "high": [1.0] * ACT_DIM}]}


def frames(n: int, size: int, seed: int, first: int = 0) -> np.ndarray:
    """uint8 [n, size, size, 3]: a smooth pattern plus noise, brightness rising with the step."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    base = np.stack([60 * np.sin(x / 3 + k) * np.cos(y / 5 - k) for k in range(3)], -1)
    steps = (first + np.arange(n, dtype=np.float32))[:, None, None, None]
    out = 100 + base[None] + (steps % 20) * 5 + rng.normal(0, 2, (n, size, size, 3))
    return np.clip(out, 0, 255).astype(np.uint8)


def camera_chunk(job: str, actor: str, episode: str, seq: int, n: int = 8, size: int = 16,
                 cameras: Sequence[str] = ("cam",), encoding: str | None = "jpeg", task: str = "pick",
                 version: int = 0, corrupt: Iterable[tuple[str, int]] = (), end: int | None = None) -> pb.EpisodeChunk:
    """Chunk ``seq`` of ``episode`` (``n`` steps from step ``seq * n``); ``encoding`` None sends raw
    frames. ``corrupt``: (camera, step in chunk) frames whose JPEG body is overwritten after the
    header (the header and end marker stay sound, so only a full decode finds it)."""
    rng = np.random.default_rng(seq * 7919 + sum(episode.encode()))
    c = pb.EpisodeChunk(job_id=job, actor_id=actor, episode_id=episode, seq=seq, task_id=task, behavior_version=version,
                        first_step=seq * n)
    encode(rng.normal(size=(n, 4)).astype(np.float32), c.observations["proprio"])
    for i, cam in enumerate(cameras):
        encode(frames(n, size, seq * 31 + i, seq * n), c.observations[cam], encoding=encoding or "raw")
    for cam, step in corrupt:
        c.observations[cam].frames[step] = corrupt_body(c.observations[cam].frames[step])
    encode(rng.uniform(-1, 1, size=(n, ACT_DIM)).astype(np.float32), c.actions["action"])
    encode(np.zeros(n, np.float32), c.rewards)
    encode(np.ones(n, np.bool_), c.interventions)
    if end is not None:
        c.end.outcome = end
    return c


def corrupt_body(jpeg: bytes) -> bytes:
    """``jpeg`` with its entropy-coded data replaced by markers no decoder accepts (simplejpeg and
    Pillow both raise), its header, the start of its scan and the FF D9 end marker kept."""
    head = jpeg[: jpeg.index(b"\xff\xda") + 20]
    return head + b"\xff\xaf" * max(8, (len(jpeg) - len(head) - 2) // 2) + b"\xff\xd9"
