"""Structured log lines stay one line per event whatever a value holds (values come from the wire)."""

from __future__ import annotations

import logging

from fleetloop.logs import MAX_VALUE_CHARS, event, get_logger


def test_values_cannot_forge_lines_and_are_bounded(caplog):
    log = get_logger("test.logs")
    logging.getLogger("fleetloop").propagate = True
    try:
        with caplog.at_level(logging.INFO, logger="fleetloop"):
            event(log, "refused", actor="evil\nts=1 level=error event=forged", error='say "hi"', long="x" * 5000)
    finally:
        logging.getLogger("fleetloop").propagate = False
    (record,) = [r for r in caplog.records if "event=refused" in r.getMessage()]
    line = record.getMessage()
    assert "\n" not in line and line.count("event=") == 2  # the forged text stays inside the quoted value
    assert 'actor="evil\\nts=1 level=error event=forged"' in line
    assert 'error="say \\"hi\\""' in line
    assert f"...(+{5000 - MAX_VALUE_CHARS} chars)" in line and len(line) < 1000
