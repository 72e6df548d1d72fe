"""Prompts in, group chunks out: the LLM actor's rollout data (see :mod:`actor.llm.runtime`).

:class:`Rollouts` samples a prompt from the job's tasks (weighted), renders it with the model's chat
template, and turns a prompt's G completions into one scored ``EpisodeChunk`` with ``group`` set.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import numpy as np

from actor.llm.metrics import LlmActorMetrics, LlmActorStats
from fleetloop import wire_settings
from fleetloop.logs import event, get_logger
from fleetloop.v1 import fleetloop_pb2 as pb

log = get_logger("actor.llm")


class Rollouts:
    """Prompt sampling and group chunks for one actor.

    ``tasks``: task id -> (task, sampling weight); ``settings``: the job's rollout settings (read on
    every call: ``max_prompt_tokens``, ``max_model_len``, ``max_new_tokens``); ``rng``: the actor's
    generator (shared: prompts and generate seeds come from one stream). Counts go to ``stats`` and
    ``metrics``. Not thread-safe: the actor's control loop only."""

    def __init__(self, job: str, actor_id: str, tasks: dict[str, Any], tokenizer, settings: dict[str, Any],
                 rng: np.random.Generator, stats: LlmActorStats, metrics: LlmActorMetrics) -> None:
        self.job, self.actor_id, self.tasks, self.tokenizer, self.settings = job, actor_id, tasks, tokenizer, settings
        self.rng, self.stats, self.metrics = rng, stats, metrics

    def sample_prompt(self) -> tuple[str, Any, Any, list[int]] | None:
        """(task id, task, prompt, prompt token ids), or None (counted, logged) for a prompt whose
        tokens are empty or over the prompt limit."""
        ids = list(self.tasks)
        weights = np.array([self.tasks[i][1] for i in ids], dtype=np.float64)
        task_id = ids[int(self.rng.choice(len(ids), p=weights / weights.sum()))]
        task = self.tasks[task_id][0]
        prompt = task.sample(self.rng)
        text = self.tokenizer.apply_chat_template(prompt.messages, add_generation_prompt=True, tokenize=False)
        token_ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        limit = min(int(self.settings.get("max_prompt_tokens", 512)),
                    int(self.settings["max_model_len"]) - int(self.settings["max_new_tokens"]))
        if not token_ids or len(token_ids) > limit:
            self.stats.skipped_prompts += 1
            event(log, "prompt_skipped", level=30, job=self.job, actor=self.actor_id, task=task_id, tokens=len(token_ids),
                  limit=limit)
            return None
        return task_id, task, prompt, token_ids

    def group_chunk(self, ticket: str, admitted: int, task_id: str, task, prompt, prompt_ids: list[int],
                    samples) -> pb.EpisodeChunk | None:
        """Score ``samples`` (the prompt's completions) and build their group chunk (seq 0, end SUCCESS,
        a new episode id, ``behavior_version`` the oldest completion's). None (logged) when a completion
        is empty: the learner refuses those."""
        from fleetloop.llm_tasks import safe_score
        comps = []
        for smp in samples:
            if not len(smp.token_ids):  # the learner refuses empty completions: drop the group, say so
                event(log, "empty_completion", level=30, job=self.job, actor=self.actor_id, version=smp.policy_version,
                      task=task_id)
                return None
            reward, ok = safe_score(task, prompt, smp.text, {"job": self.job, "actor": self.actor_id,
                                                            "version": smp.policy_version})
            comps.append(pb.Completion(token_ids=list(smp.token_ids), logprobs=[min(0.0, float(x)) for x in smp.logprobs],
                                       reward=reward, policy_version=int(smp.policy_version), text=smp.text[:4096],
                                       **wire_settings.finish_fields(str(smp.finish_reason or "")), verifier_error=not ok))
            self.stats.verifier_errors += int(not ok)
            self.stats.tokens += len(smp.token_ids)
        errors = sum(c.verifier_error for c in comps)
        if errors:
            self.metrics.verifier_errors.labels(self.actor_id).inc(errors)
        version = min(c.policy_version for c in comps)
        self.stats.versions[version] = self.stats.versions.get(version, 0) + 1
        self.stats.groups += 1
        self.stats.completions += len(comps)
        self.stats.reward_sum += float(sum(c.reward for c in comps))
        self.metrics.tokens.labels(self.actor_id).inc(sum(len(c.token_ids) for c in comps))
        episode = f"{self.actor_id}-{uuid.uuid4().hex[:16]}"
        return pb.EpisodeChunk(
            job_id=self.job, actor_id=self.actor_id, episode_id=episode, seq=0, task_id=task_id, behavior_version=version,
            produced_at=time.time(),
            end=pb.EpisodeEnd(outcome=pb.SUCCESS, total_reward=float(np.mean([c.reward for c in comps])), length=len(comps)),
            group=pb.CompletionGroup(prompt_id=str(prompt.id)[:128], prompt_text=self.prompt_text(prompt_ids),
                                     prompt_token_ids=prompt_ids, completions=comps, ticket_id=ticket,
                                     admitted_version=admitted, task_id=task_id))

    def prompt_text(self, ids: list[int]) -> str:
        """The prompt's text as the tokenizer decodes it (at most 4096 characters)."""
        return self.tokenizer.decode(ids)[:4096]
