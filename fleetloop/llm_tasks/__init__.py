"""Tasks with verifiable rewards for LLM rollouts: built-in exact checkers and JSONL datasets.

A :class:`Task` samples a :class:`Prompt` and scores a completion's text: 1.0 correct, 0.0 wrong
(``failure_score``, 0.0, is also what a verifier that raises earns, see :func:`safe_score`). Built-ins
(:func:`make_task` names, parameters in their pydantic configs): ``arith``, ``reverse``, ``sort``,
``count`` (:mod:`fleetloop.llm_tasks.builtin`) and ``jsonl``: prompts and answers from a JSONL file
(:class:`JsonlTask`, :mod:`fleetloop.llm_tasks.jsonl`), with an optional custom reward.

Modules, one job each:

- :mod:`fleetloop.llm_tasks.base`: the task contract (:class:`Prompt`, :class:`Task`,
  :class:`TaskConfig`), answer parsing (the answer format and partial credit are stated there),
  :func:`make_task` and :func:`safe_score`.
- :mod:`fleetloop.llm_tasks.builtin`: the built-in tasks and their configs.
- :mod:`fleetloop.llm_tasks.jsonl`: JSONL datasets and custom rewards.

This package re-exports their public names; :data:`TASKS` is the registry :func:`make_task` reads.
Errors: bad task names, parameters and JSONL lines raise :class:`~fleetloop.errors.InvalidArgument`
naming the field (``task_params.<name>``, ``line N: <field>``) and value.
"""

from __future__ import annotations

from fleetloop.llm_tasks.base import (ANSWER_INSTRUCTION, FAILURE_SCORE, Prompt, Task, TaskConfig, extract_answer,
                                      make_task, normalise, parse_numbers, safe_score)
from fleetloop.llm_tasks.builtin import (BUILTIN_TASKS, ArithConfig, ArithTask, CountConfig, CountTask, ReverseConfig,
                                         ReverseTask, SortConfig, SortTask)
from fleetloop.llm_tasks.jsonl import JsonlConfig, JsonlTask, RewardFn, exact_match, resolve_reward

#: Task name -> class: the built-ins and ``jsonl`` (what :func:`make_task` builds).
TASKS: dict[str, type] = {**BUILTIN_TASKS, "jsonl": JsonlTask}

__all__ = [
    "ANSWER_INSTRUCTION", "BUILTIN_TASKS", "FAILURE_SCORE", "TASKS", "ArithConfig", "ArithTask", "CountConfig",
    "CountTask", "JsonlConfig", "JsonlTask", "Prompt", "ReverseConfig", "ReverseTask", "RewardFn", "SortConfig",
    "SortTask", "Task", "TaskConfig", "exact_match", "extract_answer", "make_task", "normalise", "parse_numbers",
    "resolve_reward", "safe_score",
]
