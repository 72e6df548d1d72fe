"""Headless system Chromium for the dashboard tests (Playwright drives /usr/bin/chromium; never
``playwright install``): the launch flags, the viewport, a module-scoped browser and a page that
collects page errors and console errors (refused requests the tests provoke are logged by the
browser itself and are not page errors)."""

from __future__ import annotations

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]
VIEWPORT = {"width": 1400, "height": 900}


def launch_browser():
    """A generator for a module fixture: yields a launched Chromium, closes it afterwards."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


def new_page(browser, errors: list[str]):
    """(context, page) with a 30 s default timeout; page errors and console errors go to ``errors``."""
    context = browser.new_context(viewport=VIEWPORT)
    page = context.new_page()
    page.set_default_timeout(30_000)
    page.on("pageerror", lambda exc: errors.append(f"page error: {exc}"))
    page.on("console", lambda m: errors.append(f"console {m.type}: {m.text}")
            if m.type == "error" and "Failed to load resource" not in m.text else None)
    return context, page
