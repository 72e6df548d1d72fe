"""Build valid robot EpisodeChunks (39-dim state, 4-dim action) for learner tests without an actor."""

from __future__ import annotations

import numpy as np

from fleetloop.codec import encode as encode_array
from fleetloop.v1 import fleetloop_pb2 as pb


def robot_chunk(job: str, actor: str, episode: str, seq: int, version: int, n: int = 10, end: int | None = None,
                task: str = "reach-v3", interventions: int = 3) -> pb.EpisodeChunk:
    """Chunk ``seq`` of ``episode``: ``n`` steps, the first ``interventions`` taken by the operator;
    ``end`` (an Outcome value) closes the episode."""
    rng = np.random.default_rng(seq)
    c = pb.EpisodeChunk(job_id=job, actor_id=actor, episode_id=episode, seq=seq, task_id=task, behavior_version=version,
                        first_step=seq * n)
    c.observations["state"].CopyFrom(encode_array(rng.normal(size=(n, 39)).astype(np.float32)))
    c.actions["action"].CopyFrom(encode_array(rng.uniform(-1, 1, size=(n, 4)).astype(np.float32)))
    c.rewards.CopyFrom(encode_array(np.zeros(n, np.float32)))
    c.interventions.CopyFrom(encode_array(np.arange(n) < interventions))
    if end is not None:
        c.end.outcome = end
    return c
