"""The built-in tasks with exact checkers: ``arith``, ``reverse``, ``sort`` and ``count``.

Each is a class with a ``name``, a pydantic ``Config`` (a :class:`~fleetloop.llm_tasks.base.TaskConfig`
with the task's parameters) and ``sample``/``score`` (the :class:`~fleetloop.llm_tasks.base.Task`
protocol); :func:`~fleetloop.llm_tasks.base.make_task` builds them by name.

- ``arith``: ``a op b`` with ``digits``-digit non-negative operands and ``ops`` from ``+-*``; the answer
  is the (possibly negative) integer result.
- ``reverse``: reverse a short lowercase string.
- ``sort``: sort a few integers ascending; the answer is the numbers in order, separated by commas.
- ``count``: how many times a letter occurs in a lowercase word.

Every prompt ends with :data:`~fleetloop.llm_tasks.base.ANSWER_INSTRUCTION`; answers are parsed as
:mod:`fleetloop.llm_tasks.base` states (marker, fallback without it, partial credit). A prompt's id
is ``<task>-<first 12 hex digits of the SHA-1 of its text>``.
"""

from __future__ import annotations

import hashlib
import string
from typing import Any, ClassVar

import numpy as np
from pydantic import Field, ValidationInfo, field_validator

from fleetloop.llm_tasks.base import (ANSWER_INSTRUCTION, FAILURE_SCORE, Prompt, TaskConfig, as_int, clean_segment,
                                      extract_answer, last_nonempty_line, parse_numbers)


def _not_below(value: int, info: ValidationInfo, other: str) -> int:
    """Field validator: ``value`` must be >= the already validated field ``other``."""
    if other in info.data and value < info.data[other]:
        raise ValueError(f"must be >= {other} ({info.data[other]}), got {value}")
    return value


class _Builtin:
    """Shared scoring: ``candidate`` parses the answer segment, ``correct`` compares it."""

    name: ClassVar[str] = ""
    Config: ClassVar[type[TaskConfig]] = TaskConfig
    failure_score: float = FAILURE_SCORE

    def __init__(self, config: TaskConfig | None = None) -> None:
        self.config = config or self.Config()

    def _prompt(self, body: str, answer: str, what: str, meta: dict[str, Any]) -> Prompt:
        text = f"{body} {ANSWER_INSTRUCTION.format(what=what)}"
        pid = f"{self.name}-{hashlib.sha1(text.encode()).hexdigest()[:12]}"
        return Prompt(id=pid, task=self.name, text=text, answer=answer, meta=meta)

    def _fallback_segment(self, text: str) -> str:
        return text

    def _correct(self, prompt: Prompt, segment: str) -> bool:
        raise NotImplementedError

    def score(self, prompt: Prompt, completion_text: str) -> float:
        segment = extract_answer(completion_text)
        if segment is None:
            if self.config.strict_format:
                return 0.0
            return 1.0 if self._correct(prompt, self._fallback_segment(completion_text)) else 0.0
        return 1.0 if self._correct(prompt, segment) else float(self.config.format_credit)


class _IntAnswer(_Builtin):
    """Answer = the last number of the segment, integral."""

    def _correct(self, prompt: Prompt, segment: str) -> bool:
        nums = parse_numbers(segment)
        return bool(nums) and as_int(nums[-1]) == int(prompt.answer)


class ArithConfig(TaskConfig):
    """``arith`` settings."""

    digits: int = Field(2, ge=1, le=9, description="Operands are uniform in [0, 10**digits - 1].")
    ops: str = Field("+-", min_length=1, description="Operators to draw from, any of '+', '-', '*'.")

    @field_validator("ops")
    @classmethod
    def _check_ops(cls, v: str) -> str:
        bad = sorted(set(v) - set("+-*"))
        if bad:
            raise ValueError(f"unsupported operators {bad}; allowed: '+', '-', '*'")
        return v


class ArithTask(_IntAnswer):
    """``a op b`` with small non-negative integers."""

    name = "arith"
    Config = ArithConfig
    config: ArithConfig

    def sample(self, rng: np.random.Generator) -> Prompt:
        hi = 10 ** self.config.digits
        a, b = int(rng.integers(0, hi)), int(rng.integers(0, hi))
        op = self.config.ops[int(rng.integers(0, len(self.config.ops)))]
        result = a + b if op == "+" else a - b if op == "-" else a * b
        return self._prompt(f"What is {a} {op} {b}?", str(result), "<integer>", {"a": a, "b": b, "op": op})


class ReverseConfig(TaskConfig):
    """``reverse`` settings."""

    min_len: int = Field(3, ge=1, le=64, description="Shortest string.")
    max_len: int = Field(6, ge=1, le=64, description="Longest string.")

    @field_validator("max_len")
    @classmethod
    def _check_len(cls, v: int, info: ValidationInfo) -> int:
        return _not_below(v, info, "min_len")


class ReverseTask(_Builtin):
    """Reverse a short lowercase string; compared case-insensitively, spaces inside ignored."""

    name = "reverse"
    Config = ReverseConfig
    config: ReverseConfig

    def sample(self, rng: np.random.Generator) -> Prompt:
        n = int(rng.integers(self.config.min_len, self.config.max_len + 1))
        word = "".join(string.ascii_lowercase[int(i)] for i in rng.integers(0, 26, n))
        return self._prompt(f'Reverse the string "{word}" (write its letters in reverse order).', word[::-1],
                            "<reversed string>", {"word": word})

    def _fallback_segment(self, text: str) -> str:
        words = last_nonempty_line(text).split()
        return words[-1] if words else ""

    def _correct(self, prompt: Prompt, segment: str) -> bool:
        return "".join(clean_segment(segment).lower().split()) == prompt.answer


class SortConfig(TaskConfig):
    """``sort`` settings."""

    min_n: int = Field(3, ge=1, le=64, description="Fewest numbers to sort.")
    max_n: int = Field(5, ge=1, le=64, description="Most numbers to sort.")
    lo: int = Field(0, description="Smallest value.")
    hi: int = Field(99, description="Largest value.")

    @field_validator("max_n")
    @classmethod
    def _check_n(cls, v: int, info: ValidationInfo) -> int:
        return _not_below(v, info, "min_n")

    @field_validator("hi")
    @classmethod
    def _check_hi(cls, v: int, info: ValidationInfo) -> int:
        return _not_below(v, info, "lo")


class SortTask(_Builtin):
    """Sort integers ascending; every number of the answer segment must match the sorted list, in order."""

    name = "sort"
    Config = SortConfig
    config: SortConfig

    def sample(self, rng: np.random.Generator) -> Prompt:
        n = int(rng.integers(self.config.min_n, self.config.max_n + 1))
        nums = [int(x) for x in rng.integers(self.config.lo, self.config.hi + 1, n)]
        answer = ", ".join(str(x) for x in sorted(nums))
        return self._prompt(f"Sort these numbers in ascending order: {', '.join(map(str, nums))}.", answer,
                            "<numbers in ascending order, separated by commas>", {"numbers": nums})

    def _fallback_segment(self, text: str) -> str:
        lines = [ln for ln in text.splitlines() if parse_numbers(ln)]
        return lines[-1] if lines else ""

    def _correct(self, prompt: Prompt, segment: str) -> bool:
        got = [as_int(x) for x in parse_numbers(segment)]
        return got == [int(x) for x in prompt.answer.split(",")]


class CountConfig(TaskConfig):
    """``count`` settings."""

    min_len: int = Field(4, ge=1, le=64, description="Shortest word.")
    max_len: int = Field(10, ge=1, le=64, description="Longest word.")
    absent_prob: float = Field(0.1, ge=0.0, le=1.0, description="Probability of asking for a letter drawn from the whole alphabet (it may be absent).")

    @field_validator("max_len")
    @classmethod
    def _check_len(cls, v: int, info: ValidationInfo) -> int:
        return _not_below(v, info, "min_len")


class CountTask(_IntAnswer):
    """Count a letter in a random lowercase word (letters drawn from a small alphabet so repeats occur)."""

    name = "count"
    Config = CountConfig
    config: CountConfig
    ALPHABET: ClassVar[str] = "abcdeilmnorst"

    def sample(self, rng: np.random.Generator) -> Prompt:
        n = int(rng.integers(self.config.min_len, self.config.max_len + 1))
        word = "".join(self.ALPHABET[int(i)] for i in rng.integers(0, len(self.ALPHABET), n))
        if rng.random() < self.config.absent_prob:
            letter = string.ascii_lowercase[int(rng.integers(0, 26))]
        else:
            letter = word[int(rng.integers(0, n))]
        return self._prompt(f"How many times does the letter '{letter}' appear in the word \"{word}\"?",
                            str(word.count(letter)), "<integer>", {"word": word, "letter": letter})


#: The built-in task classes by name.
BUILTIN_TASKS: dict[str, type] = {"arith": ArithTask, "reverse": ReverseTask, "sort": SortTask, "count": CountTask}
