"""Pre-built robot experience for the load bench: realistic chunks without a simulator.

A :class:`EpisodeBank` holds a few synthetic Meta-World-shaped episodes, already cut into chunks
of ``chunk_steps`` steps whose tensors are encoded once (``fleetloop.codec.encode``), so a
lightweight actor only stamps ids, sequence number, version and time on each chunk and
serializes it (tens of microseconds), like a robot whose recording thread hands finished chunks
to its uplink.

What the episodes look like (per step; the same specs as ``fleetloop actor``):

- ``state`` float32[39], Meta-World's layout: hand xyz + gripper + object poses (18 values,
  drifting smoothly), the previous frame's 18 values, and a goal xyz constant per episode;
- ``action`` float32[4] in [-1, 1], smooth (tanh of a random walk);
- reward float32 in [0, 10], rising with progress;
- interventions: operator takeovers in contiguous runs of 8-20 steps, ~10 % of steps overall;
- outcome: ~55 % ``success`` (episode ends early, 60-200 steps), ~10 % ``failure`` (ends early),
  the rest ``timeout`` at ``max_episode_steps``. The last chunk always has steps and the end,
  as ``fleetloop.client.runtime.EpisodeRecorder`` sends it.

Deterministic for a given seed. Only numpy and the generated protobuf code are imported.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fleetloop.codec import encode, make_spec
from fleetloop.v1 import fleetloop_pb2 as pb

OBS_DIM, ACT_DIM = 39, 4
OUTCOMES = {"success": pb.SUCCESS, "failure": pb.FAILURE, "timeout": pb.TIMEOUT}


def load_specs() -> tuple[list, list]:
    """Observation and action specs of the built-in Meta-World robot (without importing Meta-World)."""
    return ([make_spec("state", "float32", [OBS_DIM])],
            [make_spec("action", "float32", [ACT_DIM], [-1.0] * ACT_DIM, [1.0] * ACT_DIM)])


@dataclass(frozen=True)
class ChunkBody:
    """The step tensors of one chunk, encoded once; ``end`` is set on an episode's last chunk."""

    steps: int
    first_step: int
    obs: pb.Tensor
    act: pb.Tensor
    rew: pb.Tensor
    inter: pb.Tensor
    interventions: int
    end: pb.EpisodeEnd | None


@dataclass(frozen=True)
class Episode:
    """One synthetic episode: its chunks, length and outcome name."""

    chunks: tuple[ChunkBody, ...]
    length: int
    outcome: str
    intervention_steps: int


def _episode_arrays(rng: np.random.Generator, length: int) -> tuple[np.ndarray, ...]:
    drift = np.cumsum(rng.normal(0.0, 0.01, (length + 1, 18)), axis=0).astype(np.float32)
    current = rng.uniform(-0.5, 0.5, 18).astype(np.float32) + drift
    goal = np.broadcast_to(rng.uniform(-0.3, 0.3, 3).astype(np.float32), (length, 3))
    obs = np.concatenate([current[1:], current[:-1], goal], axis=1).astype(np.float32)
    act = np.tanh(np.cumsum(rng.normal(0.0, 0.3, (length, ACT_DIM)), axis=0)).astype(np.float32)
    rew = np.clip(np.linspace(0.0, 10.0, length) + rng.normal(0.0, 0.5, length), 0.0, 10.0).astype(np.float32)
    inter = np.zeros(length, np.bool_)
    t = int(rng.integers(10, 90))
    while t < length:  # takeovers of 8-20 steps with 80-220-step gaps: ~10 % of steps
        run = int(rng.integers(8, 21))
        inter[t:t + run] = True
        t += run + int(rng.integers(80, 220))
    return obs, act, rew, inter


def build_episode(rng: np.random.Generator, chunk_steps: int, max_episode_steps: int) -> Episode:
    """One episode cut into chunks of ``chunk_steps`` (the last one carries the end)."""
    u = rng.random()
    if u < 0.55:
        outcome, length = "success", int(rng.integers(min(60, max_episode_steps), max_episode_steps + 1))
    elif u < 0.65:
        outcome, length = "failure", int(rng.integers(min(20, max_episode_steps), max_episode_steps + 1))
    else:
        outcome, length = "timeout", max_episode_steps
    obs, act, rew, inter = _episode_arrays(rng, length)
    chunks = []
    for a in range(0, length, chunk_steps):
        b = min(length, a + chunk_steps)
        end = pb.EpisodeEnd(outcome=OUTCOMES[outcome], total_reward=float(rew.sum()), length=length) if b == length else None
        chunks.append(ChunkBody(b - a, a, encode(obs[a:b]), encode(act[a:b]), encode(rew[a:b]), encode(inter[a:b]),
                                int(inter[a:b].sum()), end))
    return Episode(tuple(chunks), length, outcome, int(inter.sum()))


class EpisodeBank:
    """``n`` pre-built episodes; actors cycle through them from different starting points."""

    def __init__(self, seed: int, chunk_steps: int, max_episode_steps: int = 200, n: int = 24) -> None:
        rng = np.random.default_rng(seed)
        self.chunk_steps, self.max_episode_steps = chunk_steps, max_episode_steps
        self.episodes = [build_episode(rng, chunk_steps, max_episode_steps) for _ in range(n)]

    def episode(self, index: int) -> Episode:
        return self.episodes[index % len(self.episodes)]

    def intervention_share(self) -> float:
        """Share of steps taken by the operator over the bank."""
        return sum(e.intervention_steps for e in self.episodes) / sum(e.length for e in self.episodes)


def serialize_chunk(body: ChunkBody, job_id: str, actor_id: str, episode_id: str, seq: int, task_id: str,
                    behavior_version: int, produced_at: float) -> bytes:
    """The wire bytes of one ``EpisodeChunk`` (what ``EpisodeRecorder`` would spool)."""
    chunk = pb.EpisodeChunk(job_id=job_id, actor_id=actor_id, episode_id=episode_id, seq=seq, task_id=task_id,
                            behavior_version=behavior_version, first_step=body.first_step, produced_at=produced_at)
    chunk.observations["state"].CopyFrom(body.obs)
    chunk.actions["action"].CopyFrom(body.act)
    chunk.rewards.CopyFrom(body.rew)
    chunk.interventions.CopyFrom(body.inter)
    if body.end is not None:
        chunk.end.CopyFrom(body.end)
    return chunk.SerializeToString()
