"""Structured logging: one line per event, ``key=value`` pairs, job/actor/version ids first.

Usage::

    log = get_logger("learner")
    event(log, "published", job="j1", version=7, bytes=1234)

Secrets never go through here: callers pass token *ids* or hashes, never tokens.

Values come partly from the wire (actor ids, error messages naming bad input), so every value is
made log-safe: control characters (newlines included) are escaped, so no value can forge a second
log line, quotes inside quoted values are escaped, and a value longer than ``MAX_VALUE_CHARS`` is
cut with a marker saying how long it was.
"""

from __future__ import annotations

import logging
import os
import sys
import time

_FIRST = ("job", "actor", "version", "episode", "task")
MAX_VALUE_CHARS = 300


def get_logger(component: str) -> logging.Logger:
    """A logger named ``fleetloop.<component>``, configured once to stderr at $FLEETLOOP_LOG_LEVEL."""
    root = logging.getLogger("fleetloop")
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(handler)
        root.setLevel(os.environ.get("FLEETLOOP_LOG_LEVEL", "INFO").upper())
        root.propagate = False
    return logging.getLogger(f"fleetloop.{component}")


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    text = str(value)
    if len(text) > MAX_VALUE_CHARS:
        text = f"{text[:MAX_VALUE_CHARS]}...(+{len(text) - MAX_VALUE_CHARS} chars)"
    # backslashes and control characters escaped exactly once (unicode_escape also doubles backslashes)
    text = text.encode("unicode_escape").decode("ascii") if not text.isprintable() else text.replace("\\", "\\\\")
    if " " in text or '"' in text or "=" in text or not text:
        return '"' + text.replace('"', '\\"') + '"'
    return text


def event(log: logging.Logger, name: str, level: int = logging.INFO, **fields: object) -> None:
    """Log one event as ``ts=... level=... component=... event=name job=... actor=... k=v``."""
    if not log.isEnabledFor(level):
        return
    keys = [k for k in _FIRST if k in fields] + sorted(k for k in fields if k not in _FIRST)
    parts = [
        f"ts={time.time():.3f}",
        f"level={logging.getLevelName(level).lower()}",
        f"component={log.name.removeprefix('fleetloop.')}",
        f"event={name}",
    ]
    parts += [f"{k}={_fmt(fields[k])}" for k in keys]
    log.log(level, " ".join(parts))
