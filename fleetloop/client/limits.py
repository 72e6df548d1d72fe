"""The learner's message-size limit on the actor side: one place for the check, the refusal
patterns and the log line, shared by the robot recorder (:mod:`fleetloop.client.recorder`), the
:class:`~fleetloop.client.sender.Sender` and the LLM actor (:mod:`actor.llm.runtime`).

Contract:

- the limit is the ``max_message_bytes`` the learner announces in its handshake's ``RunConfig``
  (:func:`announced_limit`; 0 = an older learner that announced none: no limit known, nothing is
  split or set aside here, and the learner's own refusal still reaches the sender);
- a message of ``size`` bytes fits when ``size <= limit`` (the learner refuses ``size > limit``);
- anything the actor will never send because of its size is reported by :func:`report_oversized`:
  one structured line ``event=<what>_oversized`` (level error) naming job, actor, episode, seq, size
  and limit; the caller counts it in its metric;
- a refusal for size, whether the learner's own (``RESOURCE_EXHAUSTED`` naming
  ``max_message_bytes``, with the ``grpc-retry-pushback-ms: -1`` trailer) or the transport's
  (``Received message larger than max (N vs. M)`` / ``Sent message larger than max``, no trailer,
  no learner log line) is recognised by :func:`size_refusal`: such a message can never succeed.
"""

from __future__ import annotations

import re
from typing import Any

import grpc

from fleetloop.logs import event, get_logger

log = get_logger("actor")
#: gRPC core's wording when a message exceeds a channel's max_(send|receive)_message_length.
_TRANSPORT = re.compile(r"(?:Received|Sent) message larger than max \((\d+) vs\. (\d+)\)")
#: The learner's own size refusal ("chunk of N bytes exceeds max_message_bytes M"), and its words.
_LEARNER = re.compile(r"(\d+) bytes exceeds max_message_bytes (\d+)")
_LEARNER_WORDS = ("max_message_bytes", "message_size")


def announced_limit(run_config: Any) -> int | None:
    """The learner's ``max_message_bytes`` from a RunConfig (or anything with that attribute);
    None when it announced none (0) or there is no run config."""
    limit = int(getattr(run_config, "max_message_bytes", 0) or 0) if run_config is not None else 0
    return limit if limit > 0 else None


def over_limit(size: int, limit: int | None) -> bool:
    """True when a message of ``size`` bytes exceeds ``limit`` (None: no known limit, never)."""
    return limit is not None and int(size) > int(limit)


def size_refusal(code: grpc.StatusCode | None, details: str | None,
                 pushback: int | None = None) -> tuple[bool, int | None, int | None]:
    """(refused for size?, the refused message's size, the limit) of a stream error; size and
    limit when the error names them (the transport's ``(N vs. M)``, the learner's ``N bytes exceeds
    max_message_bytes M``), else None. Only RESOURCE_EXHAUSTED qualifies, and never one whose
    ``grpc-retry-pushback-ms`` (``pushback``) asks for a retry (>= 0): the other RESOURCE_EXHAUSTED
    refusals (stream caps, rate limits, memory budget) stay retryable."""
    if code != grpc.StatusCode.RESOURCE_EXHAUSTED or not details or (pushback is not None and pushback >= 0):
        return False, None, None
    match = _TRANSPORT.search(details) or _LEARNER.search(details)
    if match:
        return True, int(match.group(1)), int(match.group(2))
    return any(w in details for w in _LEARNER_WORDS), None, None


def report_oversized(what: str, *, job: str, actor: str, episode: str, seq: int, size: int, limit: int | None,
                     action: str, **fields: Any) -> None:
    """Log one ``<what>_oversized`` event (``what``: step, chunk, group) naming the episode, the
    chunk's seq, the size in bytes, the limit and what was done (``action``: e.g. ``dropped`` or
    ``set_aside``). Extra ``fields`` (version, task, step, reason) are appended."""
    event(log, f"{what}_oversized", level=40, job=job, actor=actor, episode=episode, seq=seq, size=size, limit=limit,
          action=action, **fields)
