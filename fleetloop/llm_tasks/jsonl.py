"""Tasks from JSONL datasets: :class:`JsonlTask` (task name ``jsonl``), with an optional custom reward.

One JSON object per line with ``prompt_field`` (a string, or a list of chat messages
``{"role", "content"}``) and ``answer_field`` (string or number); optional ``id`` and ``meta``.
Blank lines are skipped. The default reward is exact match after normalisation
(:func:`~fleetloop.llm_tasks.base.normalise`: lowercase, collapsed whitespace, stripped
quotes/emphasis/trailing period; numerically equal numbers match); without the ``Answer:`` marker
(and not ``strict_format``) the last non-empty line is the answer. A custom reward
``"module:function"`` is called as ``f(prompt_text, completion_text, answer) -> float``.

Errors: an unreadable file, a bad line or an empty file raise
:class:`~fleetloop.errors.InvalidArgument` naming the field (``path``, ``line N: <field>``) and
value; a reward that cannot be imported names ``reward``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
from pydantic import Field

from fleetloop.errors import InvalidArgument
from fleetloop.llm_tasks.base import FAILURE_SCORE, Prompt, TaskConfig, extract_answer, last_nonempty_line, normalise
from fleetloop.plugins import import_callable

RewardFn = Callable[[str, str, str], float]


def resolve_reward(spec: str) -> RewardFn:
    """Import a ``"module:function"`` reward; InvalidArgument naming ``reward`` if it cannot be found."""
    return import_callable(spec, field="reward", what="reward")


def exact_match(completion_text: str, answer: str, strict_format: bool = False) -> float:
    """1.0 if the extracted answer (or, without a marker and not strict, the last non-empty line)
    equals ``answer`` after :func:`normalise` (or both are the same number), else 0.0."""
    seg = extract_answer(completion_text)
    if seg is None:
        if strict_format:
            return 0.0
        seg = last_nonempty_line(completion_text)
    got, want = normalise(seg), normalise(answer)
    if got == want:
        return 1.0
    try:
        return 1.0 if float(got) == float(want) else 0.0
    except ValueError:
        return 0.0


class JsonlConfig(TaskConfig):
    """``jsonl`` settings."""

    path: str = Field(..., min_length=1, description="JSONL file: one object per line with the prompt and answer fields.")
    reward: str | None = Field(None, description="'module:function' called as f(prompt_text, completion_text, answer) -> float; None = exact match.")
    prompt_field: str = Field("prompt", min_length=1, description="Key of the prompt (string or list of chat messages).")
    answer_field: str = Field("answer", min_length=1, description="Key of the reference answer (string or number).")
    name: str = Field("jsonl", min_length=1, description="Task name reported in prompts and metrics.")


class JsonlTask:
    """Prompts and answers from a JSONL file (see :mod:`fleetloop.llm_tasks.jsonl`)."""

    failure_score: float = FAILURE_SCORE

    def __init__(self, path: str | Path, reward: str | None = None, prompt_field: str = "prompt",
                 answer_field: str = "answer", *, name: str = "jsonl", strict_format: bool = False,
                 format_credit: float = 0.0) -> None:
        self.name = name
        self.path = Path(path)
        self.prompt_field, self.answer_field = prompt_field, answer_field
        self.strict_format, self.format_credit = strict_format, float(format_credit)
        self.reward_fn: RewardFn | None = resolve_reward(reward) if reward else None
        self.prompts = self._load()

    def _load(self) -> list[Prompt]:
        try:
            raw = self.path.read_text(encoding="utf-8")
        except OSError as exc:
            raise InvalidArgument(f"cannot read JSONL file: {exc}", field="path", value=str(self.path)) from exc
        prompts = []
        for lineno, line in enumerate(raw.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InvalidArgument(f"{self.path.name} line {lineno}: invalid JSON ({exc.msg})",
                                      field=f"line {lineno}", value=line[:80]) from None
            if not isinstance(obj, dict):
                raise InvalidArgument(f"{self.path.name} line {lineno}: expected a JSON object",
                                      field=f"line {lineno}", value=type(obj).__name__)
            prompts.append(self._prompt(obj, lineno))
        if not prompts:
            raise InvalidArgument(f"{self.path.name} holds no prompts", field="path", value=str(self.path))
        return prompts

    def _prompt(self, obj: Mapping[str, Any], lineno: int) -> Prompt:
        where = f"line {lineno}: {self.prompt_field}"
        p = obj.get(self.prompt_field)
        if isinstance(p, str) and p.strip():
            text, messages = p, [{"role": "user", "content": p}]
        elif isinstance(p, list) and p and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                               and isinstance(m.get("content"), str) for m in p):
            messages = [{"role": m["role"], "content": m["content"]} for m in p]
            text = next((m["content"] for m in reversed(messages) if m["role"] == "user"), messages[-1]["content"])
        else:
            raise InvalidArgument(f"{self.path.name} {where}: must be a non-empty string or a list of "
                                  "{role, content} messages", field=where, value=repr(p)[:80])
        a = obj.get(self.answer_field)
        if isinstance(a, bool) or not isinstance(a, (str, int, float)) or (isinstance(a, str) and not a.strip()):
            w = f"line {lineno}: {self.answer_field}"
            raise InvalidArgument(f"{self.path.name} {w}: must be a non-empty string or a number", field=w, value=repr(a)[:80])
        pid = str(obj["id"]) if "id" in obj else f"{self.name}-{lineno}"
        meta = obj.get("meta") if isinstance(obj.get("meta"), dict) else {}
        return Prompt(id=pid, task=self.name, text=text, answer=str(a), messages=messages, meta=dict(meta, line=lineno))

    def __len__(self) -> int:
        return len(self.prompts)

    def sample(self, rng: np.random.Generator) -> Prompt:
        return self.prompts[int(rng.integers(0, len(self.prompts)))]

    def score(self, prompt: Prompt, completion_text: str) -> float:
        if self.reward_fn is not None:
            return float(self.reward_fn(prompt.text, completion_text, prompt.answer))
        s = exact_match(completion_text, prompt.answer, self.strict_format)
        if s == 0.0 and self.format_credit and extract_answer(completion_text) is not None:
            return self.format_credit
        return s
