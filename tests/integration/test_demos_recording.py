"""record_demos writes only successful expert episodes in the shared dataset format."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from actor.demos import SEED_STRIDE, record_demos
from fleetloop.dataset import iter_episodes, read_manifest, task_counts
from fleetloop.errors import InvalidArgument

pytestmark = pytest.mark.filterwarnings("ignore:Constant")


def test_record_demos_roundtrip(tmp_path: Path) -> None:
    counts = record_demos(["reach-v3", "push-v3"], 2, tmp_path, seed=3, action_noise=0.1, progress=False)
    assert counts == {"reach-v3": 2, "push-v3": 2}
    assert task_counts(tmp_path) == counts
    episodes = list(iter_episodes(tmp_path))
    assert len(episodes) == 4
    for ep in episodes:
        t = len(ep)
        assert 0 < t <= 200
        assert ep.obs.shape == (t, 39) and ep.obs.dtype == np.float32
        assert ep.actions.shape == (t, 4) and ep.actions.dtype == np.float32
        assert ep.rewards.shape == (t,) and ep.interventions.shape == (t,)
        assert ep.interventions.all() and ep.outcome == "success"
        assert np.all(np.abs(ep.actions) <= 1.0)
        assert 3 * SEED_STRIDE <= ep.seed < 4 * SEED_STRIDE
    # Different seeds give different layouts (goal positions differ between a task's episodes).
    reach = [ep for ep in episodes if ep.task_id == "reach-v3"]
    assert not np.allclose(reach[0].obs[0, -3:], reach[1].obs[0, -3:])
    # Appending extends the same dataset.
    record_demos(["reach-v3"], 1, tmp_path, seed=4, progress=False)
    assert task_counts(tmp_path)["reach-v3"] == 3


def test_record_demos_empty_and_unknown(tmp_path: Path) -> None:
    assert record_demos(["reach-v3"], 0, tmp_path / "empty", progress=False) == {"reach-v3": 0}
    assert read_manifest(tmp_path / "empty")["episodes"] == []
    with pytest.raises(InvalidArgument, match="bogus-v3"):
        record_demos(["reach-v3", "bogus-v3"], 1, tmp_path / "bad", progress=False)
    assert not (tmp_path / "bad").exists()
