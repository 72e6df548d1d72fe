"""Tasks with verifiable rewards for LLM rollouts: built-in exact checkers and JSONL datasets.

A :class:`Task` samples a :class:`Prompt` and scores a completion's text: 1.0 correct, 0.0 wrong
(``failure_score``, 0.0, is also what a verifier that raises earns, see :func:`safe_score`). Built-ins
(:func:`make_task` names, parameters in their pydantic configs):

- ``arith``: ``a op b`` with ``digits``-digit non-negative operands and ``ops`` from ``+-*``; the answer
  is the (possibly negative) integer result.
- ``reverse``: reverse a short lowercase string.
- ``sort``: sort a few integers ascending; the answer is the numbers in order, separated by commas.
- ``count``: how many times a letter occurs in a lowercase word.
- ``jsonl``: prompts and answers from a JSONL file (:class:`JsonlTask`), with an optional custom reward.

**Answer format.** Every built-in prompt ends with the instruction to finish with a line
``Answer: <answer>``. Parsing (:func:`extract_answer`): the text after the *last* ``Answer:``
(case-insensitive, spaces before the colon allowed) up to the end of its line, or the next non-empty
line if the marker ends its line; surrounding whitespace, markdown emphasis (``*``, ``_``), backticks,
quotes and trailing ``.``, ``!`` are stripped. When the marker is missing, the fallback (unless
``strict_format``) is: numeric tasks take the last number in the whole text; ``reverse`` the last word
of the last non-empty line; ``sort`` the numbers of the last non-empty line that has any; ``jsonl``
the last non-empty line. Numbers: an optional minus sign, digits, optional decimals; a decimal number
counts as an integer only if it is integral (``7.0`` == 7). For ``arith``/``count`` the *last* number of
the answer segment is the answer (so ``Answer: 3 + 4 = 7`` is 7); for ``sort`` *all* numbers of the
segment must equal the sorted list.

**Partial credit.** Off by default. ``format_credit`` (in [0, 1)) is awarded to a *wrong* answer given
with the ``Answer:`` marker, to reward the format early in training; a correct answer always earns 1.0.

**JSONL datasets.** One JSON object per line with ``prompt_field`` (a string, or a list of chat
messages ``{"role", "content"}``) and ``answer_field`` (string or number); optional ``id`` and ``meta``.
Blank lines are skipped. The default reward is exact match after normalisation (:func:`normalise`:
lowercase, collapsed whitespace, stripped quotes/emphasis/trailing period; numerically equal numbers
match). A custom reward ``"module:function"`` is called as ``f(prompt_text, completion_text, answer)
-> float``.

Errors: bad task names, parameters and JSONL lines raise :class:`~fleetloop.errors.InvalidArgument`
naming the field (``task_params.<name>``, ``line N: <field>``) and value.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping, Protocol, runtime_checkable

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from fleetloop.errors import InvalidArgument
from fleetloop.logs import event, get_logger
from fleetloop.plugins import import_callable

log = get_logger("llm_tasks")

FAILURE_SCORE = 0.0
ANSWER_INSTRUCTION = "Finish your reply with a final line of the form 'Answer: {what}'."


@dataclass
class Prompt:
    """One sampled problem. ``text`` is the instruction as plain text; ``messages`` the same as chat
    messages (``[{"role": "user", "content": text}]`` for built-ins); ``answer`` the reference answer
    as a string; ``meta`` task-specific details (e.g. operands)."""

    id: str
    task: str
    text: str
    answer: str
    messages: list[dict[str, str]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.messages:
            self.messages = [{"role": "user", "content": self.text}]


@runtime_checkable
class Task(Protocol):
    """What the LLM actor needs from a task."""

    name: str
    failure_score: float

    def sample(self, rng: np.random.Generator) -> Prompt:
        """A new prompt drawn with ``rng``."""
        ...

    def score(self, prompt: Prompt, completion_text: str) -> float:
        """Reward of ``completion_text`` for ``prompt`` (1.0 correct, 0.0 wrong)."""
        ...


# ---------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------

_MARKER = re.compile(r"answer\s*:", re.IGNORECASE)
_NUM = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?")
_STRIP = " \t\r\n*_`\"'"


def _clean(segment: str) -> str:
    s = segment.strip(_STRIP)
    while s and s[-1] in ".!":
        s = s[:-1].strip(_STRIP)
    return s


def extract_answer(text: str) -> str | None:
    """The cleaned segment after the last ``Answer:`` marker (module docstring), or None without one."""
    matches = list(_MARKER.finditer(text))
    if not matches:
        return None
    rest = text[matches[-1].end():]
    lines = [ln for ln in rest.splitlines() if ln.strip()]
    first = rest.split("\n", 1)[0]
    return _clean(first if first.strip() else (lines[0] if lines else ""))


def _last_nonempty_line(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def parse_numbers(segment: str) -> list[float]:
    """All numbers in ``segment`` in order (optional sign, optional decimals)."""
    return [float(m) for m in _NUM.findall(segment)]


def _as_int(x: float) -> int | None:
    return int(x) if math.isfinite(x) and x == int(x) else None


def normalise(s: str) -> str:
    """Lowercase, collapse whitespace, strip quotes / emphasis / trailing ``.`` and ``!``."""
    return _clean(" ".join(str(s).split()).lower())


# ---------------------------------------------------------------------------------------------
# Built-in tasks
# ---------------------------------------------------------------------------------------------

class TaskConfig(BaseModel):
    """Settings every built-in task has."""

    model_config = ConfigDict(extra="forbid")

    strict_format: bool = Field(False, description="Require the 'Answer:' marker; without it the completion scores 0 (no fallback parsing).")
    format_credit: float = Field(0.0, ge=0.0, lt=1.0, description="Reward for a wrong answer given with the 'Answer:' marker (0 = no partial credit).")


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
        return bool(nums) and _as_int(nums[-1]) == int(prompt.answer)


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
        words = _last_nonempty_line(text).split()
        return words[-1] if words else ""

    def _correct(self, prompt: Prompt, segment: str) -> bool:
        return "".join(_clean(segment).lower().split()) == prompt.answer


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
        got = [_as_int(x) for x in parse_numbers(segment)]
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


# ---------------------------------------------------------------------------------------------
# JSONL datasets
# ---------------------------------------------------------------------------------------------

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
        seg = _last_nonempty_line(completion_text)
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
    """Prompts and answers from a JSONL file (see the module docstring)."""

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


# ---------------------------------------------------------------------------------------------
# Registry and safe scoring
# ---------------------------------------------------------------------------------------------

TASKS: dict[str, type] = {"arith": ArithTask, "reverse": ReverseTask, "sort": SortTask, "count": CountTask, "jsonl": JsonlTask}


def make_task(name: str, params: Mapping[str, Any] | None = None) -> Task:
    """Build the task ``name`` with ``params``. InvalidArgument naming the value for an unknown name
    (listing the known ones), and ``task_params.<field>`` for a bad or unknown parameter."""
    cls = TASKS.get(name)
    if cls is None:
        raise InvalidArgument(f"unknown task {name!r}; known: {sorted(TASKS)}", field="task", value=name)
    config_cls = JsonlConfig if cls is JsonlTask else cls.Config
    try:
        cfg = config_cls.model_validate(dict(params or {}))
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"]) or "(root)"
        raise InvalidArgument(f"task_params.{loc} for task {name!r}: {err['msg']} (got {err.get('input')!r})",
                              field=f"task_params.{loc}", value=err.get("input")) from None
    if cls is JsonlTask:
        return JsonlTask(cfg.path, cfg.reward, cfg.prompt_field, cfg.answer_field, name=cfg.name,
                         strict_format=cfg.strict_format, format_credit=cfg.format_credit)
    return cls(cfg)


_RESERVED = {"log", "name", "level"}


def safe_score(task: Task, prompt: Prompt, text: str, log_ctx: Mapping[str, Any] | None = None) -> tuple[float, bool]:
    """Score ``text``; never raises (except BaseExceptions such as KeyboardInterrupt).

    Returns ``(score, ok)``. A verifier that raises, or returns something that is not a finite number,
    yields ``(task.failure_score, False)`` and logs a ``verifier_error`` event with ``log_ctx`` (e.g.
    job, actor, version) plus the task, prompt id and error."""
    failure = float(getattr(task, "failure_score", FAILURE_SCORE))
    try:
        value = task.score(prompt, text)
        score = float(value)
        if not math.isfinite(score):
            raise ValueError(f"verifier returned a non-finite score {value!r}")
        return score, True
    except Exception as exc:  # noqa: BLE001 - a broken verifier must not kill the actor
        try:
            fields = {("ctx_" + k if k in _RESERVED else k): v for k, v in dict(log_ctx or {}).items()}
            fields.setdefault("task", getattr(task, "name", "?"))
            fields["prompt_id"] = getattr(prompt, "id", "?")
            fields["error"] = f"{type(exc).__name__}: {exc}"
            event(log, "verifier_error", level=logging.WARNING, **fields)
        except Exception:  # noqa: BLE001 - logging must not raise either
            pass
        return failure, False
