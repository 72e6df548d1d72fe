"""The demo's progress header: the staleness bound is shown beside the staleness it applies to."""

from __future__ import annotations

from services.harness.live_view import staleness_text


def test_staleness_text_shows_autonomous_staleness_against_the_bound_and_corrections_apart():
    text = staleness_text({"staleness_max": 369, "staleness_max_autonomous": 6, "staleness_bound": 8})
    assert text.startswith("staleness max 6 (bound 8;") and "corrections, admitted at any age: max 369" in text


def test_staleness_text_without_the_autonomous_figure_falls_back_to_the_overall_max():
    assert staleness_text({"staleness_max": 3, "staleness_bound": 8}).startswith("staleness max 3 (bound 8;")
