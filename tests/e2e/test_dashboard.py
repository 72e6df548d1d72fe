"""The operator dashboard end to end in a real browser: a real redis-server, real Ray, the real
learner, two simulated Meta-World robots, the REST API over HTTP, and headless Chromium (the
system's /usr/bin/chromium, driven by Playwright; nothing is downloaded).

An operator pastes a key, opens the job, watches the fleet table and the charts update live
(without a reload), pauses and resumes the job from the page; a viewer sees the same page without
operator controls; a bad key and a failed command show the API's error in the banner; a robot
pinned far behind shows its drops per reason, the header tells trained staleness from how far
robots run behind, and the version chart's mark labels never overlap; a stopped job keeps its
final numbers. Screenshots go to runs/test-artifacts/dashboard/ (gitignored;
FLEETLOOP_TEST_ARTIFACTS overrides).
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from services.control.api import create_app
from services.control.launchers.local import LocalLauncher
from services.control.state import StateStore
from tests.helpers.browser import launch_browser, new_page
from tests.helpers.control_plane import ApiServer, client, start_redis, wait_for

pytestmark = pytest.mark.timeout(600)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def artifacts() -> Path:
    out = Path(os.environ.get("FLEETLOOP_TEST_ARTIFACTS", REPO / "runs" / "test-artifacts")) / "dashboard"
    out.mkdir(parents=True, exist_ok=True)
    return out


@pytest.fixture(scope="module")
def stack(tmp_path_factory, ray_cluster):
    """Redis, the API (with a local launcher) and one running job with two simulated robots."""
    tmp = tmp_path_factory.mktemp("dashboard")
    redis_server = start_redis(tmp)
    launcher = api = None
    try:
        store = StateStore(redis_server.url)
        admin_key, _ = store.create_api_key("admin", "test-admin")
        launcher = LocalLauncher(store, tmp / "data")
        api = ApiServer(create_app(store, launcher, command_timeout_s=20.0)).start()
        admin = client(api.url, admin_key)
        r = admin.post("/v1/apikeys", json={"role": "operator", "name": "dash-op"})
        assert r.status_code == 201, r.text
        op_key = r.json()["key"]
        spec = {"name": "dash-test", "tasks": ["reach-v3", "push-v3"], "publish_every": 5, "batch_size": 64,
                "max_updates_per_s": 20, "fleet": {"robots": 2, "operator": "scripted"}}
        r = client(api.url, op_key).post("/v1/jobs", json=spec)
        assert r.status_code == 201, r.text
        job_id = r.json()["id"]
        wait_for(lambda: admin.get(f"/v1/jobs/{job_id}").json()["state"] == "running", 240, what="job running")
        yield SimpleNamespace(url=api.url, admin=admin, admin_key=admin_key, op_key=op_key, job_id=job_id, store=store)
    finally:
        if api is not None:
            api.stop()
        if launcher is not None:
            launcher.shutdown()
        redis_server.stop()


@pytest.fixture(scope="module")
def browser():
    yield from launch_browser()


_page = new_page


def _sign_in(page, url: str, key: str, role: str) -> None:
    from playwright.sync_api import expect

    page.goto(url + "/")
    expect(page.get_by_test_id("welcome")).to_be_visible()
    page.get_by_test_id("key-input").fill(key)
    page.get_by_test_id("key-save").click()
    expect(page.get_by_test_id("whoami-role")).to_have_text(role)
    expect(page.get_by_test_id("key-form")).to_be_hidden()


def _episodes(page) -> dict[str, int]:
    return page.evaluate("""() => Object.fromEntries([...document.querySelectorAll('[data-testid=actor-row]')].map(
        r => [r.dataset.actorId, parseInt(r.querySelector('[data-col=episodes]').textContent.replace(/[^0-9]/g, '') || '0', 10)]))""")


CHART_LINES = """([id, min]) => {
    const paths = [...document.querySelectorAll('#' + id + ' svg path.line')];
    return paths.filter(p => Number(p.dataset.points) >= min && /^M[\\d.-]+,[\\d.-]+(L|H)/.test(p.getAttribute('d'))).length;
}"""


def test_operator_watches_and_steers_a_job(stack, browser, artifacts):
    from playwright.sync_api import expect

    t0 = time.monotonic()
    errors: list[str] = []
    context, page = _page(browser, errors)
    try:
        _sign_in(page, stack.url, stack.op_key, "operator")
        page.screenshot(path=str(artifacts / "1-jobs.png"))

        # the job list links to the job page (hash routing)
        row = page.locator(f'[data-testid=job-row][data-job-id="{stack.job_id}"]')
        expect(row).to_be_visible()
        expect(row).to_contain_text("reach-v3, push-v3")
        row.get_by_test_id("job-link").click()
        expect(page).to_have_url(re.compile(rf"#/jobs/{re.escape(stack.job_id)}$"))
        expect(page.get_by_test_id("job-name")).to_have_text(stack.job_id)
        expect(page.get_by_test_id("job-state")).to_have_text("running")
        expect(page.get_by_test_id("live-status")).to_have_attribute("data-state", "live")
        page.evaluate("window.__noReload = true")  # gone if the page reloads

        # the fleet table gets a row per robot, and its numbers grow without a reload
        rows = page.get_by_test_id("actor-row")
        expect(rows).to_have_count(2, timeout=180_000)
        assert sorted(rows.evaluate_all("rs => rs.map(r => r.dataset.actorId)")) == ["sim-0", "sim-1"]
        page.wait_for_function("() => [...document.querySelectorAll('[data-testid=actor-row] [data-col=episodes]')]"
                               ".every(td => parseInt(td.textContent.replace(/[^0-9]/g, '') || '0', 10) > 0)",
                               timeout=180_000)
        before = _episodes(page)
        page.wait_for_function("""(before) => [...document.querySelectorAll('[data-testid=actor-row]')].some(r =>
            parseInt(r.querySelector('[data-col=episodes]').textContent.replace(/[^0-9]/g, ''), 10) > before[r.dataset.actorId])""",
                               arg=before, timeout=120_000)
        after = _episodes(page)
        assert sum(after.values()) > sum(before.values()), (before, after)
        assert page.evaluate("window.__noReload") is True
        for actor in ("sim-0", "sim-1"):
            r = page.locator(f'[data-testid=actor-row][data-actor-id="{actor}"]')
            expect(r.locator("[data-col=status]")).to_have_text(re.compile("active|idle"))
            expect(r.locator("[data-col=version]")).to_have_text(re.compile(r"^v\d+$"))
            expect(r.locator("[data-col=success]")).to_have_text(re.compile(r"\d+(\.\d)?%"))

        # header stats are filled in
        expect(page.get_by_test_id("stat-version")).to_have_text(re.compile(r"^v\d+$"))
        expect(page.get_by_test_id("stat-loss")).to_have_text(re.compile(r"\d"))
        expect(page.get_by_test_id("stat-ingest")).to_have_text(re.compile(r"\d"))

        # every chart has drawn lines: one per task on the rate charts
        for chart, lines in (("chart-success", 2), ("chart-intervention", 2), ("chart-loss", 1), ("chart-ingest", 1),
                             ("chart-versions", 1)):
            page.wait_for_function(f"(a) => ({CHART_LINES})(a) >= {lines}", arg=[chart, 2], timeout=120_000)
        legend = page.locator("#chart-success .legend")
        expect(legend).to_contain_text("reach-v3")
        expect(legend).to_contain_text("push-v3")
        page.screenshot(path=str(artifacts / "2-job-operator.png"), full_page=True)

        # an API error shows in the banner: pin an unknown version
        controls = page.get_by_test_id("operator-controls")
        expect(controls).to_be_visible()
        page.get_by_test_id("version-input").fill("999999")
        page.get_by_test_id("btn-pin").click()
        banner = page.get_by_test_id("error-banner")
        expect(banner).to_be_visible()
        expect(banner).to_contain_text("404")
        expect(banner).to_contain_text("unknown policy version 999999")
        page.locator("#error-close").click()
        expect(banner).to_be_hidden()

        # pause from the page: the state becomes paused (on the page and over REST); resume
        expect(page.get_by_test_id("btn-resume")).to_be_disabled()
        page.get_by_test_id("btn-pause").click()
        expect(page.get_by_test_id("job-state")).to_have_text("paused", timeout=45_000)
        # 200 (done) when the learner ran it within command_timeout_s, 202 (queued) when it runs it at its next poll
        expect(page.get_by_test_id("control-status")).to_have_text(re.compile(r"^Pause: (done|queued)"))
        assert stack.admin.get(f"/v1/jobs/{stack.job_id}").json()["state"] == "paused"
        expect(page.get_by_test_id("btn-pause")).to_be_disabled()
        expect(page.locator("#events-list")).to_contain_text("running → paused", timeout=15_000)
        page.screenshot(path=str(artifacts / "3-job-paused.png"), full_page=True)
        page.get_by_test_id("btn-resume").click()
        expect(page.get_by_test_id("job-state")).to_have_text("running", timeout=45_000)
        assert stack.admin.get(f"/v1/jobs/{stack.job_id}").json()["state"] == "running"
        expect(page.get_by_test_id("btn-pause")).to_be_enabled()
        expect(banner).to_be_hidden()

        # evaluate v0 from the page: the evaluations table shows the held-out result when it is done
        page.get_by_test_id("version-input").fill("0")
        page.get_by_test_id("btn-evaluate").click()
        row = page.locator('[data-testid="evals-table"] tr[data-version="0"]')
        expect(row).to_contain_text("done", timeout=240_000)
        expect(row).to_contain_text("reach-v3")
        assert page.evaluate("window.__noReload") is True
        assert not errors, errors
        print(f"operator dashboard checks took {time.monotonic() - t0:.1f} s")
    finally:
        try:
            page.screenshot(path=str(artifacts / "9-operator-last.png"), full_page=True)
        finally:
            context.close()


def test_viewer_sees_no_operator_controls(stack, browser, artifacts):
    from playwright.sync_api import expect

    r = stack.admin.post("/v1/apikeys", json={"role": "viewer", "name": "dash-viewer"})
    assert r.status_code == 201, r.text
    viewer_key = r.json()["key"]
    errors: list[str] = []
    context, page = _page(browser, errors)
    try:
        # an unknown key is refused, visibly
        page.goto(stack.url + "/")
        page.get_by_test_id("key-input").fill("flk_not-a-real-key")
        page.get_by_test_id("key-save").click()
        banner = page.get_by_test_id("error-banner")
        expect(banner).to_be_visible()
        expect(banner).to_contain_text("401")
        expect(page.get_by_test_id("whoami")).to_be_hidden()
        page.get_by_test_id("key-clear").click()

        _sign_in(page, stack.url, viewer_key, "viewer")
        page.goto(f"{stack.url}/#/jobs/{stack.job_id}")
        expect(page.get_by_test_id("job-state")).to_have_text(re.compile("running|paused"))
        expect(page.get_by_test_id("actor-row")).to_have_count(2, timeout=60_000)
        page.wait_for_function(f"(a) => ({CHART_LINES})(a) >= 2", arg=["chart-success", 2], timeout=60_000)
        expect(page.get_by_test_id("operator-controls")).to_have_count(0)
        for button in ("btn-pause", "btn-resume", "btn-stop", "btn-pin", "btn-unpin", "btn-rollback"):
            expect(page.get_by_test_id(button)).to_have_count(0)
        # still none after a few live updates
        page.wait_for_timeout(2500)
        expect(page.get_by_test_id("operator-controls")).to_have_count(0)
        expect(banner).to_be_hidden()
        page.screenshot(path=str(artifacts / "4-job-viewer.png"), full_page=True)
        assert not errors, errors
    finally:
        context.close()


LABEL_OVERLAPS = """(id) => {
    const boxes = [...document.querySelectorAll('#' + id + ' text.vmark-label, #' + id + ' text.hmark-label')]
        .map(t => { const b = t.getBBox(); return {text: t.textContent, x0: b.x, y0: b.y, x1: b.x + b.width, y1: b.y + b.height}; });
    const hits = [];
    boxes.forEach((a, i) => boxes.slice(i + 1).forEach(b => {
        if (a.x0 < b.x1 && b.x0 < a.x1 && a.y0 < b.y1 && b.y0 < a.y1) hits.push([a.text, b.text]);
    }));
    return {labels: boxes.length, hits};
}"""


def test_robot_pinned_behind_shows_drops_per_reason(stack, browser, artifacts, tmp_path):
    """Issue 17 item 13: pin the fleet to v0 (always kept), far past the staleness bound (8): each robot's row shows
    the steps the learner dropped, per reason, as /actors reports them; the header tells the trained
    staleness (bounded) from how far robots run behind, and counts the drops; rates say whether they
    are recent or whole-run; the version chart's mark labels (many commands in a few seconds) never overlap."""
    from playwright.sync_api import expect

    admin, job = stack.admin, f"/v1/jobs/{stack.job_id}"
    wait_for(lambda: (admin.get(job).json().get("status") or {}).get("version", 0) >= 12, 180, what="version >= 12")
    for op in ("pin", "unpin", "pin", "unpin", "pin"):  # five marks within seconds on the version chart
        r = admin.post(f"{job}/policies/0/pin" if op == "pin" else f"{job}/policies/unpin")
        assert r.status_code in (200, 202), r.text
    errors: list[str] = []
    context, page = _page(browser, errors)
    try:
        _sign_in(page, stack.url, stack.op_key, "operator")
        page.goto(f"{stack.url}/#/jobs/{stack.job_id}")
        expect(page.get_by_test_id("live-status")).to_have_attribute("data-state", "live")
        page.wait_for_function("""() => [...document.querySelectorAll('[data-testid=actor-row]')].every(r =>
            r.querySelector('[data-col=version]').textContent === 'v0' && r.querySelector('[data-col=dropped] .drop'))""",
                               timeout=180_000)
        shown = page.evaluate("""() => Object.fromEntries([...document.querySelectorAll('[data-testid=actor-row]')].map(r =>
            [r.dataset.actorId, Object.fromEntries([...r.querySelectorAll('[data-col=dropped] .drop')].map(
                s => [s.dataset.reason, [Number(s.dataset.count), s.textContent]]))]))""")
        api_rows = {a["actor_id"]: a for a in admin.get(f"{job}/actors").json()}
        behind = [a for a, reasons in shown.items() if reasons]
        assert sorted(behind) == ["sim-0", "sim-1"], shown
        for actor in behind:
            for reason, (count, text) in shown[actor].items():
                assert reason in ("stale", "stale_expert_only") and 0 < count <= api_rows[actor]["dropped"][reason], (shown, api_rows)
                assert text.startswith(f"{count:,} stale"), text
            row = page.locator(f'[data-testid=actor-row][data-actor-id="{actor}"]')
            expect(row.locator("[data-col=dropped]")).to_have_text(
                re.compile(r"^[\d,]+ stale( autonomous)?( · [\d,]+ stale( autonomous)?)?$"))
            expect(row.locator("[data-col=staleness]")).to_have_class(re.compile(r"\bbad\b"))
            assert int(row.locator("[data-col=staleness]").text_content()) > 8

        # the header: trained staleness within the bound, robots far behind it, drops counted
        assert re.fullmatch(r"\d+ / 8", page.get_by_test_id("stat-staleness").text_content())
        expect(page.locator(".stat", has=page.get_by_test_id("stat-staleness"))).to_contain_text("Trained staleness")
        assert int(page.get_by_test_id("stat-fleet-staleness").text_content()) > 8
        expect(page.get_by_test_id("stat-fleet-staleness")).to_have_class("bad")
        assert int(page.get_by_test_id("stat-dropped").text_content().replace(",", "")) > 0
        head = page.locator("#fleet-table thead")
        for label in ("Versions behind", "Dropped steps", "Success whole run", "Intervention whole run"):
            expect(head).to_contain_text(label)
        expect(page.locator("#intervention-window")).to_contain_text("recent")
        expect(page.locator("#success-window")).to_contain_text("recent")

        # the version chart: every mark label that is drawn is clear of the others
        page.wait_for_function("() => document.querySelectorAll('#chart-versions text.vmark-label').length >= 3", timeout=30_000)
        marks = page.evaluate(LABEL_OVERLAPS, "chart-versions")
        assert marks["labels"] >= 3 and not marks["hits"], marks
        page.screenshot(path=str(tmp_path / "robot-behind.png"), full_page=True)
        page.screenshot(path=str(artifacts / "5-robot-behind.png"), full_page=True)
        assert not errors, errors
    finally:
        context.close()
        admin.post(f"{job}/policies/unpin")


def test_stopped_job_keeps_its_final_numbers(stack, browser, artifacts):
    """Issue 17 item 10: after stop, once the learner's heartbeat is gone, the page still shows the
    final version, step and loss, ingest 0, and every robot in a final state (not 'stopping')."""
    from playwright.sync_api import expect

    from fleetloop import redis_keys as keys

    admin, job = stack.admin, f"/v1/jobs/{stack.job_id}"
    assert admin.post(f"{job}/stop").status_code == 202
    wait_for(lambda: admin.get(job).json()["state"] == "stopped", 180, what="stopped")
    stack.store.r.delete(keys.heartbeat(stack.job_id))  # the heartbeat expires (its TTL, without waiting for it)
    final = admin.get(job).json()["status"]
    assert final is not None and final["final"] is True, final  # the final status outlives the heartbeat
    errors: list[str] = []
    context, page = _page(browser, errors)
    try:
        _sign_in(page, stack.url, stack.op_key, "operator")
        page.goto(f"{stack.url}/#/jobs/{stack.job_id}")
        expect(page.get_by_test_id("job-state")).to_have_text("stopped")
        expect(page.get_by_test_id("stat-version")).to_have_text(f"v{final['version']}")
        expect(page.locator("#stat-step")).to_have_text(f"{final['step']:,}")
        expect(page.get_by_test_id("stat-loss")).to_have_text(re.compile(r"\d"))
        expect(page.get_by_test_id("stat-ingest")).to_have_text("0")
        expect(page.locator("#job-learner")).to_contain_text("final numbers")
        rows = page.get_by_test_id("actor-row")
        expect(rows).to_have_count(2)
        assert set(rows.evaluate_all("rs => rs.map(r => r.dataset.status)")) <= {"stopped", "left"}
        expect(page.get_by_test_id("fleet-summary")).to_contain_text("stopped")
        page.screenshot(path=str(artifacts / "6-job-stopped.png"), full_page=True)
        assert not errors, errors
    finally:
        context.close()
