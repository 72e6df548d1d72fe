"""The control plane's side of safe releases without servers: the REST view built from the learner's
release snapshot (services.control.release_routes.releases_view), and the ``fleetloop job`` release
commands' parsing, rollout flags and text output (services.cli.releases)."""

from __future__ import annotations

import json

import pytest

from fleetloop import redis_keys as keys
from fleetloop.errors import InvalidArgument
from services.cli import build_parser
from services.cli.releases import format_releases, rollout_body
from services.control.jobspec import JobSpec
from services.control.release_routes import ReleasesView, releases_view
from services.control.state import JobRecord
from tests.helpers.releases import CANARY, POLICY, ROLLBACK_REASON, STABLE, snapshot


class _Store:
    """What releases_view reads of a StateStore: the snapshot and the learner's status."""

    def __init__(self, values: dict[str, str], status: dict | None = None) -> None:
        self.values, self.status = values, status

    def release_snapshot(self, job_id: str) -> str | None:
        return self.values.get(keys.releases(job_id))

    def learner_status(self, job_id: str):
        return self.status


def _record(pinned: int | None = None, **spec) -> JobRecord:
    return JobRecord(id="rel-abc123", spec=JobSpec(name="rel", tasks=["reach-v3", "push-v3"], **spec), state="running",
                     created_at=1.0, updated_at=2.0, created_by="k", pinned=pinned)


def test_view_of_a_job_whose_learner_wrote_nothing_is_the_empty_strategy_all_snapshot():
    view = releases_view(_Store({}), _record())
    assert view.reported is False and view.strategy == "all" and view.policy.strategy == "all"
    assert (view.stable, view.candidate, view.history, view.problem) == (None, None, [], None)
    assert view.cohorts.canary == [] and view.cohort_sizes.canary == view.cohort_sizes.stable == 0
    assert view.evidence.candidate is None and view.evidence.stable is None


def test_view_carries_the_learner_snapshot_with_cohort_sizes_and_history_oldest_first():
    snap = snapshot(now=1000.0)
    snap["history"].reverse()  # whatever order the learner keeps, the view is oldest first
    view = releases_view(_Store({keys.releases("rel-abc123"): json.dumps(snap)}), _record())
    assert view.reported and view.strategy == "canary" and view.policy.canary_fraction == 0.25
    assert (view.stable, view.candidate, view.time) == (12, 14, 1000.0)
    assert view.cohorts.canary == CANARY and view.cohorts.stable == STABLE
    assert (view.cohort_sizes.canary, view.cohort_sizes.stable) == (2, 6)
    assert view.evidence.candidate.episodes == 7 and view.evidence.candidate.autonomous_success == pytest.approx(0.714)
    assert view.evidence.stable.per_task["push-v3"].intervention_rate == pytest.approx(0.104)
    assert [d.id for d in view.history] == [1, 2]
    rollback = view.history[1]
    assert (rollback.decision, rollback.by, rollback.candidate, rollback.stable) == ("rolled_back", "auto", 13, 12)
    assert rollback.reason == ROLLBACK_REASON and rollback.p_not_worse == pytest.approx(0.02)
    assert (rollback.episodes.canary, rollback.episodes.stable) == (12, 40) and rollback.cohort_sizes is None
    assert rollback.metrics.candidate.autonomous_success == pytest.approx(0.41)
    # a learner that reports the cohorts of a decision: their sizes
    snap["history"][0]["cohorts"] = {"canary": ["a", "b", "c"], "stable": ["d"]}
    view = releases_view(_Store({keys.releases("rel-abc123"): json.dumps(snap)}), _record())
    assert (view.history[1].cohort_sizes.canary, view.history[1].cohort_sizes.stable) == (3, 1)
    ReleasesView.model_validate(view.model_dump(mode="json"))  # what GET /releases answers round-trips


def test_a_pin_newer_than_the_record_comes_from_the_learner_status():
    view = releases_view(_Store({}, status={"time": 5.0, "pinned": 9}), _record(pinned=None))
    assert view.pinned == 9
    assert releases_view(_Store({}, status={"time": 1.0, "pinned": 9}), _record(pinned=3)).pinned == 3


def test_an_unreadable_snapshot_is_reported_not_a_server_error():
    for raw in ("{not json", json.dumps({**snapshot(), "strategy": "sometimes"}), json.dumps([1, 2])):
        view = releases_view(_Store({keys.releases("rel-abc123"): raw}), _record())
        assert view.reported is True and view.problem.startswith("the learner's release snapshot could not be read")
        assert view.strategy == "all" and view.history == []


# -- CLI ------------------------------------------------------------------------------------------
def _args(*argv: str):
    return build_parser().parse_args(["job", *argv])


def test_release_commands_parse_with_json_output_anywhere():
    a = _args("releases", "rel-abc123", "--watch", "2", "-o", "json")
    assert (a.job_cmd, a.job_id, a.watch, a.output) == ("releases", "rel-abc123", 2.0, "json")
    assert _args("promote", "rel-abc123").job_cmd == "promote"
    assert _args("-o", "json", "abort-release", "rel-abc123").output == "json"


def test_rollout_flags_change_the_policy_in_force_and_keep_the_rest():
    current = dict(POLICY, strategy="all")
    body = rollout_body(_args("rollout", "j", "--strategy", "canary", "--canary-fraction", "0.5", "--min-episodes", "20",
                              "--metrics", "autonomous_success, reward", "--no-retrain-from-stable"), current)
    assert body == {**current, "strategy": "canary", "canary_fraction": 0.5, "min_episodes": 20,
                    "metrics": ["autonomous_success", "reward"], "retrain_from_stable_on_rollback": False}
    assert rollout_body(_args("rollout", "j", "--canary-actors", "arm-01,arm-04"), current)["canary_actors"] == ["arm-01", "arm-04"]
    assert rollout_body(_args("rollout", "j", "--canary-actors", ""), dict(POLICY, canary_actors=["x"]))["canary_actors"] == []
    with pytest.raises(InvalidArgument, match="nothing to set"):
        rollout_body(_args("rollout", "j"), current)


def test_rollout_file_is_a_policy_or_a_job_spec_and_flags_apply_on_top(tmp_path):
    (tmp_path / "rollout.yaml").write_text("strategy: canary\ncanary_actors: [arm-02]\nmin_episodes: 5\n")
    (tmp_path / "job.yaml").write_text("name: x\ntasks: [reach-v3]\nrollout:\n  strategy: canary\n  max_episodes: 90\n")
    body = rollout_body(_args("rollout", "j", "--file", str(tmp_path / "rollout.yaml"), "--confidence", "0.9"), {"ignored": 1})
    assert body == {"strategy": "canary", "canary_actors": ["arm-02"], "min_episodes": 5, "confidence": 0.9}
    assert rollout_body(_args("rollout", "j", "--file", str(tmp_path / "job.yaml")), {}) == {"strategy": "canary",
                                                                                             "max_episodes": 90}


def test_text_output_shows_versions_cohorts_evidence_and_decisions_newest_first():
    view = releases_view(_Store({keys.releases("rel-abc123"): json.dumps(snapshot(now=1000.0))}), _record(pinned=None))
    text = format_releases(view.model_dump(mode="json"))
    lines = text.splitlines()
    assert lines[0].startswith("job rel-abc123  strategy canary (canary_fraction 0.25, min_episodes 10")
    assert lines[1] == "stable v12  candidate v14"
    canary = next(ln for ln in lines if ln.startswith("canary "))
    assert "v14" in canary and "2: arm-02, arm-07" in canary and "71.4%" in canary and "6.1%" in canary
    stable = next(ln for ln in lines[2:] if ln.startswith("stable "))
    assert "v12" in stable and "6: arm-01, arm-03" in stable and "65.2%" in stable
    assert "  canary push-v3: episodes 3" in text
    assert text.index("#2 ") < text.index("#1 ")  # newest first
    assert "v13 vs stable v12: rolled_back by auto" in text and f"reason: {ROLLBACK_REASON}" in text
    assert "p_not_worse 0.020" in text
    empty = format_releases(releases_view(_Store({}), _record(pinned=4)).model_dump(mode="json"))
    assert "strategy all (every robot runs the newest version)" in empty
    assert "the learner has reported no release yet" in empty and "pinned v4: every robot runs the pin" in empty
