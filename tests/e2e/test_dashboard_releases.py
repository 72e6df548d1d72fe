"""The dashboard's Releases panel in a real browser: a real redis-server, the REST API over HTTP (hold
launcher: no learner is started) and headless Chromium (the system's /usr/bin/chromium, driven by
Playwright; nothing is downloaded).

Redis holds what a learner of an 8-robot canary rollout reports (the release snapshot in the
contract's JSON, docs/notes/issue21-plan.md, plus heartbeat, status and fleet rows). An operator sees
the stable and candidate versions, which robots are canary (in the panel and in the fleet table), the
live evidence per cohort and each decision with its reason; clicks Promote and the command is queued
for the learner; when the learner's next snapshot records the promotion, the panel shows it without a
reload. A viewer sees the same panel without the Promote / Abort buttons, and a job whose learner
reported no release shows the strategy-all snapshot. Screenshots go to the test's tmp dir and to
runs/test-artifacts/dashboard/ (gitignored; FLEETLOOP_TEST_ARTIFACTS overrides).
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from fleetloop import redis_keys as keys
from services.control.api import create_app
from services.control.launchers.hold import HoldLauncher
from services.control.state import StateStore
from tests.helpers.browser import launch_browser, new_page
from tests.helpers.control_plane import ApiServer, client, start_redis
from tests.helpers.releases import CANARY, PROMOTE_REASON, ROLLBACK_REASON, STABLE, snapshot, write_snapshot

pytestmark = pytest.mark.timeout(300)

REPO = Path(__file__).resolve().parents[2]
TASKS = ["reach-v3", "push-v3"]


@pytest.fixture(scope="module")
def artifacts() -> Path:
    out = Path(os.environ.get("FLEETLOOP_TEST_ARTIFACTS", REPO / "runs" / "test-artifacts")) / "dashboard"
    out.mkdir(parents=True, exist_ok=True)
    return out


def _report(store: StateStore, job_id: str, now: float) -> None:
    """What a running learner of an 8-robot fleet writes besides the releases: heartbeat, status, fleet rows."""
    status = {"time": now, "job_state": "running", "version": 15, "step": 412, "loss": 0.084, "paused": False, "pinned": None,
              "fleet_version": 12, "staleness_bound": 8, "staleness_max_autonomous": 3, "episodes_total": 213,
              "tasks": {t: {"episodes": {"success": 60, "failure": 30, "timeout": 10}, "steps": 15000,
                            "intervention_steps": 1200, "online_buffer": 15000, "offline_buffer": 400} for t in TASKS}}
    rows = {}
    for i, actor in enumerate(sorted(CANARY + STABLE)):
        version = 14 if actor in CANARY else 12
        rows[actor] = json.dumps({
            "actor_id": actor, "kind": "robot", "tasks": TASKS, "task": TASKS[i % 2], "status": "active",
            "last_seen": now - 1, "connected_at": now - 1800, "version": version, "staleness": 15 - version,
            "steps": 4000 + 100 * i, "episodes": 25 + i, "successes": 16 + i, "success_rate": (16 + i) / (25 + i),
            "intervention_steps": 300, "intervention_ratio": 300 / (4000 + 100 * i), "dropped": {}})
    store.r.set(keys.heartbeat(job_id), json.dumps(now), ex=keys.HEARTBEAT_TTL_S)
    store.r.set(keys.status(job_id), json.dumps(status))
    store.r.hset(keys.actors(job_id), mapping=rows)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """Redis, the API (hold launcher; commands queue after 1 s) and a running canary job reported in Redis."""
    tmp = tmp_path_factory.mktemp("dashboard-releases")
    redis_server = start_redis(tmp)
    api = None
    try:
        store = StateStore(redis_server.url)
        admin_key, _ = store.create_api_key("admin", "test-admin")
        op_key, op = store.create_api_key("operator", "release-op")
        viewer_key, _ = store.create_api_key("viewer", "release-viewer")
        api = ApiServer(create_app(store, HoldLauncher(store), command_timeout_s=1.0, reconcile=False)).start()
        admin = client(api.url, admin_key)
        spec = {"name": "canary", "tasks": TASKS}
        jobs = []
        for _ in range(2):
            r = client(api.url, op_key).post("/v1/jobs", json=spec)
            assert r.status_code == 201, r.text
            jobs.append(r.json()["id"])
            store.update_job(jobs[-1], state="running")  # what the launcher does once the learner runs
        job_id, plain_job = jobs
        now = time.time()
        _report(store, job_id, now)
        write_snapshot(store.r, job_id, snapshot(now))
        yield SimpleNamespace(url=api.url, admin=admin, op_key=op_key, op_id=op.id, viewer_key=viewer_key, job_id=job_id,
                              plain_job=plain_job, store=store)
    finally:
        if api is not None:
            api.stop()
        redis_server.stop()


@pytest.fixture(scope="module")
def browser():
    yield from launch_browser()


_page = new_page


NO_OVERFLOW = """() => [...document.querySelectorAll('#releases-card .scroll')]
    .filter(el => !el.hidden && el.scrollWidth > el.clientWidth + 1).map(el => el.id)"""


def _open_job(page, url: str, key: str, role: str, job_id: str) -> None:
    from playwright.sync_api import expect

    page.goto(url + "/")
    page.get_by_test_id("key-input").fill(key)
    page.get_by_test_id("key-save").click()
    expect(page.get_by_test_id("whoami-role")).to_have_text(role)
    page.goto(f"{url}/#/jobs/{job_id}")
    expect(page.get_by_test_id("job-name")).to_have_text(job_id)
    expect(page.get_by_test_id("live-status")).to_have_attribute("data-state", "live")


def test_operator_sees_the_release_and_promotes_the_candidate(stack, browser, artifacts, tmp_path):
    from playwright.sync_api import expect

    errors: list[str] = []
    context, page = _page(browser, errors)
    try:
        _open_job(page, stack.url, stack.op_key, "operator", stack.job_id)
        panel = page.get_by_test_id("releases-panel")
        expect(panel).to_be_visible()
        expect(page.get_by_test_id("releases-policy")).to_contain_text("strategy canary · canary 25% of the robots")
        expect(page.get_by_test_id("release-stable")).to_have_text("v12")
        expect(page.get_by_test_id("release-candidate")).to_have_text("v14")
        expect(page.get_by_test_id("release-canary-size")).to_have_text("2 of 8")
        expect(page.get_by_test_id("release-state")).to_have_text("collecting evidence: 7 canary / 23 stable episodes of 10 each")

        # live evidence per cohort: which robots, episodes, autonomous success, intervention rate
        canary = page.locator('[data-testid=release-cohort][data-cohort="canary"]')
        stable = page.locator('[data-testid=release-cohort][data-cohort="stable"]')
        expect(canary.locator("[data-col=robots]")).to_have_text("arm-02arm-07")
        expect(stable.locator("[data-col=robots]")).to_contain_text("arm-01")
        expect(canary.locator("[data-col=episodes]")).to_have_text("7")
        expect(canary.locator("[data-col=autonomous_success]")).to_have_text("71.4%")
        expect(canary.locator("[data-col=intervention_rate]")).to_have_text("6.1%")
        expect(stable.locator("[data-col=episodes]")).to_have_text("23")
        expect(stable.locator("[data-col=autonomous_success]")).to_have_text("65.2%")
        expect(page.locator('#release-evidence tr.subrow[data-cohort="canary"][data-task="push-v3"]')).to_contain_text("66.7%")

        # each decision with its reason, newest first
        decisions = page.get_by_test_id("release-decision")
        expect(decisions).to_have_count(2)
        assert decisions.evaluate_all("rs => rs.map(r => r.dataset.decision)") == ["rolled_back", "promoted"]
        expect(decisions.nth(0).get_by_test_id("release-reason")).to_have_text(ROLLBACK_REASON)
        expect(decisions.nth(0)).to_contain_text("41.0% / 63.0%")
        expect(decisions.nth(1).get_by_test_id("release-reason")).to_have_text(PROMOTE_REASON)

        # the fleet table marks the canary robots
        expect(page.get_by_test_id("actor-row")).to_have_count(8)
        for actor in CANARY:
            expect(page.locator(f'[data-testid=actor-row][data-actor-id="{actor}"] [data-testid=canary-pill]')).to_have_text("canary")
        expect(page.locator('[data-testid=actor-row][data-actor-id="arm-01"] [data-testid=canary-pill]')).to_have_count(0)

        expect(page.get_by_test_id("release-controls")).to_be_visible()
        expect(page.get_by_test_id("btn-promote")).to_be_enabled()
        assert page.evaluate(NO_OVERFLOW) == [], "the Releases panel's tables fit the page (no horizontal scrolling)"
        panel.screenshot(path=str(tmp_path / "releases-panel.png"))
        page.screenshot(path=str(tmp_path / "releases-operator.png"), full_page=True)
        page.screenshot(path=str(artifacts / "7-releases-operator.png"), full_page=True)

        # Promote: confirmed, then queued for the learner (nobody answers within the API's 1 s)
        page.once("dialog", lambda d: d.accept() if "Promote v14 to stable now" in d.message else d.dismiss())
        page.get_by_test_id("btn-promote").click()
        status = page.get_by_test_id("release-control-status")
        expect(status).to_have_attribute("data-status", "queued", timeout=15_000)
        expect(status).to_have_text(re.compile(r"^Promote v14: queued"))
        cmds = [json.loads(c) for c in stack.store.r.lrange(keys.commands(stack.job_id), 0, -1)]
        assert [(c["op"], c["args"], c["by"]) for c in cmds] == [("release_promote", {}, stack.op_id)]
        assert cmds[0]["id"] == status.get_attribute("data-command-id")

        # the learner runs it and reports: the panel follows without a reload
        page.evaluate("window.__noReload = true")
        stack.store.r.lpop(keys.commands(stack.job_id))
        snap = snapshot()
        snap["history"].append({"id": 3, "candidate": 14, "stable": 12, "opened_at": time.time() - 300,
                                "decided_at": time.time(), "decision": "promoted", "by": "operator",
                                "reason": "promoted by release-op", "episodes": {"canary": 7, "stable": 23},
                                "metrics": {"candidate": snap["evidence"]["candidate"], "stable": snap["evidence"]["stable"]},
                                "p_not_worse": 0.81})
        snap.update(stable=14, candidate=None, evidence={"candidate": None, "stable": None})
        write_snapshot(stack.store.r, stack.job_id, snap)
        expect(page.get_by_test_id("release-stable")).to_have_text("v14", timeout=15_000)
        expect(page.get_by_test_id("release-candidate")).to_have_text("none")
        expect(page.get_by_test_id("release-state")).to_have_text("no candidate open: the next published version becomes one")
        expect(decisions).to_have_count(3)
        expect(decisions.nth(0)).to_have_attribute("data-decision", "promoted")
        expect(decisions.nth(0)).to_contain_text("operator")
        expect(decisions.nth(0).get_by_test_id("release-reason")).to_have_text("promoted by release-op")
        expect(page.get_by_test_id("btn-promote")).to_be_disabled()
        expect(page.get_by_test_id("btn-abort-release")).to_be_disabled()
        expect(page.get_by_test_id("canary-pill")).to_have_count(0)  # no candidate: nobody runs one
        assert page.evaluate("window.__noReload") is True
        assert page.evaluate(NO_OVERFLOW) == []
        page.screenshot(path=str(tmp_path / "releases-promoted.png"), full_page=True)
        page.screenshot(path=str(artifacts / "8-releases-promoted.png"), full_page=True)
        assert not errors, errors
    finally:
        context.close()
        write_snapshot(stack.store.r, stack.job_id, snapshot())  # the next test sees the open release again


def test_viewer_sees_the_release_without_controls_and_a_job_without_releases(stack, browser, tmp_path):
    from playwright.sync_api import expect

    errors: list[str] = []
    context, page = _page(browser, errors)
    try:
        _open_job(page, stack.url, stack.viewer_key, "viewer", stack.job_id)
        expect(page.get_by_test_id("release-candidate")).to_have_text("v14")
        expect(page.get_by_test_id("release-decision").first.get_by_test_id("release-reason")).to_have_text(ROLLBACK_REASON)
        page.wait_for_timeout(2500)  # still no controls after a few live updates
        expect(page.get_by_test_id("release-controls")).to_have_count(0)
        expect(page.get_by_test_id("btn-promote")).to_have_count(0)
        expect(page.get_by_test_id("btn-abort-release")).to_have_count(0)
        page.screenshot(path=str(tmp_path / "releases-viewer.png"), full_page=True)

        # a job whose learner reported no release: the strategy-all snapshot
        page.goto(f"{stack.url}/#/jobs/{stack.plain_job}")
        expect(page.get_by_test_id("job-name")).to_have_text(stack.plain_job)
        expect(page.get_by_test_id("releases-policy")).to_have_text("strategy all: every robot runs the newest version")
        expect(page.get_by_test_id("release-note")).to_have_text("The learner has reported no release yet.")
        expect(page.get_by_test_id("release-candidate")).to_have_text("none")
        expect(page.get_by_test_id("release-evidence")).to_be_hidden()
        expect(page.get_by_test_id("release-history")).to_be_hidden()
        assert not errors, errors
    finally:
        context.close()
    assert stack.store.r.llen(keys.commands(stack.job_id)) == 0  # a viewer queued nothing


def test_a_strategy_all_job_shows_a_compact_panel_without_release_controls(stack, browser):
    from playwright.sync_api import expect

    from learner.releases_config import RolloutPolicy
    empty = {"episodes": 0, "autonomous_success": None, "intervention_rate": None, "episode_length": None, "reward": None,
             "per_task": {}}
    write_snapshot(stack.store.r, stack.plain_job, {  # what a learner with the default rollout reports
        "strategy": "all", "policy": RolloutPolicy().model_dump(), "stable": 11, "candidate": None,
        "cohorts": {"canary": [], "stable": ["sim-0", "sim-1"]}, "evidence": {"candidate": empty, "stable": empty},
        "history": [], "time": time.time()})
    errors: list[str] = []
    context, page = _page(browser, errors)
    try:
        _open_job(page, stack.url, stack.op_key, "operator", stack.plain_job)
        expect(page.get_by_test_id("release-stable")).to_have_text("v11")
        expect(page.get_by_test_id("release-state")).to_have_text("every robot runs the newest version")
        expect(page.get_by_test_id("release-note")).to_have_text(
            f"New versions reach every robot at once. To try them on a canary cohort first: fleetloop job rollout "
            f"{stack.plain_job} --strategy canary")
        expect(page.get_by_test_id("release-evidence")).to_be_hidden()
        expect(page.get_by_test_id("operator-controls")).to_be_visible()  # the job's own controls stay
        expect(page.get_by_test_id("release-controls")).to_have_count(0)
        assert not errors, errors
    finally:
        context.close()
        stack.store.r.delete(keys.releases(stack.plain_job))
