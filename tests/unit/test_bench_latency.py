"""``fleetloop bench latency`` and ``bench utilisation`` without running them: bad flags exit 2, and
the staleness histogram's ``observe_many`` equals one-by-one observations. The runs are in
tests/integration/test_bench_latency_runs.py.
"""

import argparse

import numpy as np
import pytest

pytestmark = pytest.mark.timeout(240)


def test_latency_bad_flag(tmp_path, capsys):
    from bench.latency import main

    args = argparse.Namespace(actors="0", chunk_steps="5", hz=30.0, seconds=1.0, warmup=0.5, out=str(tmp_path / "x.json"))
    assert main(args) == 2
    assert "--actors" in capsys.readouterr().err


def test_utilisation_bad_flag(tmp_path, capsys):
    from bench.utilisation import UtilisationConfig, main

    fields = UtilisationConfig().model_dump() | {"fast_actors": 0}
    assert main(argparse.Namespace(out=str(tmp_path / "x.json"), **fields)) == 2
    assert "--fast-actors" in capsys.readouterr().err


def test_observe_many_matches_one_by_one():
    """The learner's bulk histogram update gives the same buckets, sum and count as observe() per value."""
    from prometheus_client import CollectorRegistry, Histogram

    from learner.core import observe_many
    from learner.metrics import STALENESS_BUCKETS

    values = np.array([0, 0, 1, 3, 5, 5, 8, 9, 200, -1, 12, 12, 12], dtype=np.int64)
    regs = [CollectorRegistry(), CollectorRegistry()]
    hists = [Histogram("h", "h", ["job"], buckets=STALENESS_BUCKETS, registry=r) for r in regs]
    for v in values:
        hists[0].labels("j").observe(float(v))
    observe_many(hists[1].labels("j"), values)
    observe_many(hists[1].labels("j"), values[:0])  # nothing: no change

    def samples(reg):
        return sorted((s.name, tuple(sorted(s.labels.items())), s.value) for m in reg.collect() for s in m.samples
                      if not s.name.endswith("_created"))

    assert samples(regs[0]) == samples(regs[1])
