"""The operator dashboard end to end in a real browser: a real redis-server, real Ray, the real
learner, two simulated Meta-World robots, the REST API over HTTP, and headless Chromium (the
system's /usr/bin/chromium, driven by Playwright; nothing is downloaded).

An operator pastes a key, opens the job, watches the fleet table and the charts update live
(without a reload), pauses and resumes the job from the page; a viewer sees the same page without
operator controls; a bad key and a failed command show the API's error in the banner. Screenshots
go to runs/test-artifacts/dashboard/ (gitignored; FLEETLOOP_TEST_ARTIFACTS overrides).
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from services.api import create_app
from services.launcher import LocalLauncher
from services.state import StateStore
from tests.helpers.control_plane import ApiServer, client, start_redis, wait_for

pytestmark = pytest.mark.timeout(600)

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]
REPO = Path(__file__).resolve().parents[2]
VIEWPORT = {"width": 1400, "height": 900}


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
        yield SimpleNamespace(url=api.url, admin=admin, admin_key=admin_key, op_key=op_key, job_id=job_id)
    finally:
        if api is not None:
            api.stop()
        if launcher is not None:
            launcher.shutdown()
        redis_server.stop()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


def _page(browser, errors: list[str]):
    context = browser.new_context(viewport=VIEWPORT)
    page = context.new_page()
    page.set_default_timeout(30_000)
    page.on("pageerror", lambda exc: errors.append(f"page error: {exc}"))
    # refused requests the test provokes (401, 404) are logged by the browser itself: not page errors
    page.on("console", lambda m: errors.append(f"console {m.type}: {m.text}")
            if m.type == "error" and "Failed to load resource" not in m.text else None)
    return context, page


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
