"""Structured log lines stay one line per event whatever a value holds (values come from the wire)."""

from __future__ import annotations

import logging

from fleetloop.logs import MAX_VALUE_CHARS, event, get_logger


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


def test_values_cannot_forge_lines_and_are_bounded():
    log = get_logger("test.logs")
    sink = _Collect()
    log.addHandler(sink)
    try:
        event(log, "refused", actor="evil\nts=1 level=error event=forged", error='say "hi"', long="x" * 5000)
    finally:
        log.removeHandler(sink)
    (line,) = sink.lines
    assert "\n" not in line and line.count("event=") == 2  # the forged text stays inside the quoted value
    assert 'actor="evil\\nts=1 level=error event=forged"' in line
    assert 'error="say \\"hi\\""' in line
    assert f"...(+{5000 - MAX_VALUE_CHARS} chars)" in line and len(line) < 1000
