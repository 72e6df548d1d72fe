"""Fuzz-suite fixtures: the session-wide :data:`~tests.fuzz.record.RECORD`, written to fuzz.json at the end."""

from __future__ import annotations

import pytest

from tests.fuzz.record import RECORD


@pytest.fixture(scope="session", autouse=True)
def fuzz_record():
    """The shared tally; ``fuzz.json`` is written when the session ends (if any case ran)."""
    yield RECORD
    RECORD.write()
