"""docs/render_performance.py: every goal of every bench JSON lands in one table (met and not met,
with what limits it), rows keep their baseline beside them, plots are written, bad files are named."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location("render_performance",
                                               Path(__file__).resolve().parents[2] / "docs" / "render_performance.py")
rp = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(rp)


def _doc(bench: str, **extra) -> dict:
    return {"bench": bench, "machine": {"cpu_count": 2, "platform": "Linux", "python": "3.11", "packages": {"grpcio": "1"}},
            "config": {}, "command": f"fleetloop bench {bench} --out x.json", "wall_s": 90.0,
            "rows": [{"metric": "steps/s", "unit": "steps/s", "actors": 4, "fleetloop": 51000.0, "raw_grpc": 60000.0,
                      "ratio": 0.85, "better": "higher", "note": ""}], **extra}


def test_goals_rows_plots_and_order(tmp_path):
    res = tmp_path / "docs" / "results" / "perf"
    res.mkdir(parents=True)
    (res / "weights.json").write_text(json.dumps(_doc("weights", goals=[
        {"goal": "8 actors <= 2x 1 actor", "target": 2.0, "measured": 3.1, "unit": "ratio", "met": False,
         "limit": "FetchWeights serialises on the learner's send loop"}],
        plots={"latency_cdf": {"series": {"780 MB": [1.0, 2.0, 3.0]}, "xlabel": "s"}})))
    (res / "ingest.json").write_text(json.dumps(_doc("ingest", goals=[
        {"goal": "ingest >= 85% of raw", "target": 0.85, "measured": 0.86, "unit": "ratio", "met": True}],
        plots={"throughput_vs_actors": {"x": [1, 4, 16, 32], "series": {"state": [1, 2, 3, None]}}},
        profile={"what": "learner thread", "top": [["codec.decode", 1.5, 0.4]]}, notes=["two cores"])))
    out = tmp_path / "docs" / "PERFORMANCE.md"
    text = rp.render(res, out)
    assert out.read_text() == text
    assert text.index("## Ingest") < text.index("## Weight delivery")
    assert "| ingest | ingest >= 85% of raw | 0.85 | 0.86 | **yes** |" in text
    assert "**no** | FetchWeights serialises on the learner's send loop |" in text
    assert "| steps/s | steps/s | 4 | 51,000 | 60,000 | 0.85 | higher |" in text
    assert "`codec.decode`" in text and "- two cores" in text
    assert (res / "ingest_throughput_vs_actors.png").stat().st_size > 1000
    assert (res / "weights_latency_cdf.png").stat().st_size > 1000
    assert "](results/perf/weights_latency_cdf.png)" in text


def test_a_file_that_is_not_a_result_is_named(tmp_path):
    (tmp_path / "ingest.json").write_text("{not json")
    with pytest.raises(SystemExit, match="ingest.json"):
        rp.load_results(tmp_path)
    (tmp_path / "ingest.json").write_text('{"bench": "ingest"}')
    with pytest.raises(SystemExit, match="no 'rows'"):
        rp.load_results(tmp_path)
