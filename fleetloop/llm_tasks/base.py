"""The task contract and answer parsing: :class:`Prompt`, :class:`Task`, :func:`make_task`, :func:`safe_score`.

A :class:`Task` samples a :class:`Prompt` and scores a completion's text: 1.0 correct, 0.0 wrong
(``failure_score``, 0.0, is also what a verifier that raises earns, see :func:`safe_score`).
:func:`make_task` builds one by name from the registry :data:`fleetloop.llm_tasks.TASKS` (the
built-ins of :mod:`fleetloop.llm_tasks.builtin` and ``jsonl``, :mod:`fleetloop.llm_tasks.jsonl`).

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

Errors: bad task names and parameters raise :class:`~fleetloop.errors.InvalidArgument` naming the
field (``task_params.<name>``) and value.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol, runtime_checkable

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fleetloop.errors import InvalidArgument
from fleetloop.logs import event, get_logger

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


def clean_segment(segment: str) -> str:
    """Strip surrounding whitespace, emphasis, backticks, quotes and trailing ``.`` / ``!``."""
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
    return clean_segment(first if first.strip() else (lines[0] if lines else ""))


def last_nonempty_line(text: str) -> str:
    """The last line of ``text`` with something other than whitespace ("" if none)."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def parse_numbers(segment: str) -> list[float]:
    """All numbers in ``segment`` in order (optional sign, optional decimals)."""
    return [float(m) for m in _NUM.findall(segment)]


def as_int(x: float) -> int | None:
    """``x`` as an int if it is finite and integral, else None (``7.0`` -> 7, ``2.5`` -> None)."""
    return int(x) if math.isfinite(x) and x == int(x) else None


def normalise(s: str) -> str:
    """Lowercase, collapse whitespace, strip quotes / emphasis / trailing ``.`` and ``!``."""
    return clean_segment(" ".join(str(s).split()).lower())


# ---------------------------------------------------------------------------------------------
# Settings, the factory and safe scoring
# ---------------------------------------------------------------------------------------------

class TaskConfig(BaseModel):
    """Settings every built-in task has."""

    model_config = ConfigDict(extra="forbid")

    strict_format: bool = Field(False, description="Require the 'Answer:' marker; without it the completion scores 0 (no fallback parsing).")
    format_credit: float = Field(0.0, ge=0.0, lt=1.0, description="Reward for a wrong answer given with the 'Answer:' marker (0 = no partial credit).")


def make_task(name: str, params: Mapping[str, Any] | None = None) -> Task:
    """Build the task ``name`` with ``params``. InvalidArgument naming the value for an unknown name
    (listing the known ones), and ``task_params.<field>`` for a bad or unknown parameter."""
    # Imported here: the package imports this module first, and builtin and jsonl build on it.
    from fleetloop.llm_tasks import TASKS
    from fleetloop.llm_tasks.jsonl import JsonlConfig, JsonlTask

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
