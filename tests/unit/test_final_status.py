"""The final report of a stopped learner (fleetloop.redis_keys): pure helpers shared by the learner's
control agent and the launcher."""

from fleetloop import redis_keys as keys


def test_final_report_keeps_every_number_and_stops_the_rates():
    status = {"version": 12, "step": 340, "loss": 0.25, "episodes_total": 9, "job_state": "stopping", "time": 100.0}
    final = keys.final_report(status, 130.0)
    assert final["final"] is True and final["stopped_at"] == 130.0 and final["job_state"] == "stopped"
    assert final["ingest_steps_per_s"] == 0.0 and final["updates_per_s"] == 0.0
    assert {k: final[k] for k in ("version", "step", "loss", "episodes_total", "time")} == \
        {"version": 12, "step": 340, "loss": 0.25, "episodes_total": 9, "time": 100.0}
    assert status["job_state"] == "stopping" and "final" not in status  # not changed


def test_final_actor_rows_are_stopped_or_left():
    row = {"actor_id": "a", "status": "stopping", "last_seen": 100.0, "dropped": {"stale": 3}}
    assert keys.final_actor_row(row, 120.0) == {**row, "status": "stopped"}
    assert keys.final_actor_row({**row, "status": "gone"}, 100.0 + keys.ACTOR_GONE_S)["status"] == "left"
    assert keys.final_actor_row({**row, "status": "left"}, 120.0)["status"] == "left"  # final rows stay as they are
    assert keys.final_status("j-1") == "fl:job:j-1:final" and keys.final_status("j-1") in keys.all_job_keys("j-1")
