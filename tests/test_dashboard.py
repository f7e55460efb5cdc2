"""The dashboard (GET /dashboard) in a real headless Chromium against a real uvicorn server.

Chromium is Debian's ``chromium`` package (``make install`` puts it there; this module installs it
with apt-get when it is missing and it can, and skips only when it can neither find nor install
it), driven by the PyPI ``playwright`` package without ``playwright install``. The server runs the
whole application on a free loopback port, over the session's Redis, seeded through the ``store``
fixture; the page is checked by what a person sees: drawn pixels of each line's colour, the hover
read-out of a known day, the stickiness view, the change against the previous period beside each
headline number, how the numbers were counted, a whole organization's view, the empty state and
each error's text.

The browser tests run once, in exact mode (the counts they assert are exact), not once per
sketch mode. Screenshots go to ``tests/artifacts/``; with ``UPDATE_DOCS_SCREENSHOT=1`` the whole
org's view, with its change against the previous period beside each number, also goes to
``docs/dashboard.png``, the README's picture.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Iterator
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from api.app import create_app
from api.auth import issue_token
from sketches.config import Settings
from sketches.keys import Scope, org_scope
from sketches.periods import ONE_DAY, Period, month_of, periods_holding, utc_today, week_of
from sketches.store import SketchStore
from tests.conftest import unique
from tests.support.servers import free_port

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "tests" / "artifacts"
DOCS_SCREENSHOT = ROOT / "docs" / "dashboard.png"
DOCS_SCREENSHOT_MAX_BYTES = 150_000

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]
SECRET = "dashboard-test-secret-at-least-32-bytes"
ORG = "acme"
WS = "engineering"
DAYS = 31  # period_length=30 asks for 31 rows
POOL = [f"member_{i:03d}" for i in range(420)]
COLORS = {"dau": (37, 99, 235), "wau": (13, 148, 136), "mau": (124, 58, 237),
          "stick": (217, 119, 6)}

pytestmark = [
    pytest.mark.xdist_group("browser"),  # one worker installs/launches Chromium
    pytest.mark.timeout(900),  # room for apt-get on a machine without Chromium
]


# ---------------------------------------------------------------- fixtures


@pytest.fixture
def settings(redis_url: str) -> Settings:
    """Exact sets, so that the page's numbers can be compared with Python's."""
    return Settings(
        redis_url=redis_url,
        redis_key_prefix=unique("dash"),
        sketch_mode="exact",
        jwt_secret=SECRET,
        _env_file=None,
    )


def _install_chromium() -> str | None:
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return "not root or no apt-get"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
        try:
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as err:
            return f"{' '.join(cmd)}: {err}"
        if done.returncode != 0:
            return f"{' '.join(cmd)} exited {done.returncode}: {done.stderr.strip()[-300:]}"
    return None


@pytest.fixture(scope="session")
def chromium() -> str:
    if not os.access(CHROMIUM, os.X_OK):
        problem = _install_chromium()
        if not os.access(CHROMIUM, os.X_OK):
            pytest.skip(f"{CHROMIUM} is missing and could not be installed ({problem}); "
                        "run `apt-get install -y chromium` (make install does)")
    return CHROMIUM


@pytest.fixture
def server(settings: Settings) -> Iterator[str]:
    """The whole application under uvicorn on a free loopback port, with its own Redis client
    (opened by its lifespan from the same settings, so it sees what the test seeds)."""
    port = free_port()
    config = uvicorn.Config(
        create_app(settings), host="127.0.0.1", port=port, log_level="warning",
        access_log=False, lifespan="on",
    )
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, name="dashboard-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not srv.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(15)


@pytest.fixture
async def page(chromium: str) -> AsyncIterator[Any]:
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            context = await browser.new_context(
                viewport={"width": 1200, "height": 860}, device_scale_factor=1,
                locale="en-US", timezone_id="America/Los_Angeles",
            )
            pg = await context.new_page()
            pg.set_default_timeout(15_000)
            problems: list[str] = []
            pg.on("pageerror", lambda err: problems.append(f"page error: {err}"))
            pg.on("console", lambda msg: problems.append(f"console: {msg.text}")
                  if msg.type == "error" and not msg.text.startswith("Failed to load resource")
                  else None)
            yield pg
            assert problems == [], problems  # no script error, no CSP violation
        finally:
            await browser.close()


# ---------------------------------------------------------------- seeded data


def day_users(day: date, factor: float = 1.0, salt: int = 0) -> set[str]:
    """A few hundred members with a weekly rhythm: busy weekdays, quiet weekends (``factor``
    scales the crowd, ``salt`` picks another crowd of the same size)."""
    rng = random.Random(day.toordinal() * 7 + salt)
    size = int(((28 if day.weekday() >= 5 else 110) + rng.randrange(0, 35)) * factor)
    return set(rng.sample(POOL[: 260 + day.day * 4], size))


class Seeded:
    """``days`` days of logins ending ``end``; the days before the last ``DAYS`` (the previous
    period of a 30-day view) get ``earlier`` times the crowd."""

    def __init__(self, end: date, days: int = DAYS, earlier: float = 1.0, salt: int = 0) -> None:
        self.end = end
        self.days = [end - timedelta(days=days - 1 - i) for i in range(days)]
        first_current = end - timedelta(days=DAYS - 1)
        self.users = {d: day_users(d, 1.0 if d >= first_current else earlier, salt)
                      for d in self.days}

    def batch(self, ws: Scope) -> dict[tuple[Scope, Period], set[str]]:
        out: dict[tuple[Scope, Period], set[str]] = {}
        for d, users in self.users.items():
            for p in periods_holding(d):
                out.setdefault((ws, p), set()).update(users)
        return out

    def dau(self, d: date) -> int:
        return len(self.users[d])

    def _union(self, first: date, last: date) -> int:
        out: set[str] = set()
        for d, users in self.users.items():
            if first <= d <= last:
                out |= users
        return len(out)

    def calendar_wau(self, d: date) -> int:
        w = week_of(d)
        return self._union(w.start, w.end)

    def calendar_mau(self, d: date) -> int:
        m = month_of(d)
        return self._union(m.start, m.end)

    def rolling_wau(self, d: date) -> int:
        return self._union(d - 6 * ONE_DAY, d)

    def merged(self, other: Seeded) -> Seeded:
        """The logins of both: what an org holding both workspaces counts (each member once)."""
        both = Seeded.__new__(Seeded)
        both.end = self.end
        both.days = sorted(set(self.days) | set(other.days))
        both.users = {d: self.users.get(d, set()) | other.users.get(d, set()) for d in both.days}
        return both

    def changes(self) -> dict[str, float | None]:
        """What the page should show beside each card for a 30-day calendar view: the mean of
        each count over these 31 days against the 31 before, in percent (stickiness: the mean
        of the days' DAU/MAU); None where a period holds no data."""
        current = [self.end - timedelta(days=DAYS - 1 - i) for i in range(DAYS)]
        previous = [d - timedelta(days=DAYS) for d in current]

        def means(days: list[date]) -> dict[str, float | None]:
            # Without a login in the period, no change (although its last calendar week or
            # month may reach into the next period's logins).
            seeded = [d for d in days if d in self.users]
            assert len(seeded) in (0, len(days)), "seed whole periods"
            if not seeded:
                return dict.fromkeys(("dau", "wau", "mau", "stick"))
            return {
                "dau": sum(self.dau(d) for d in days) / len(days),
                "wau": sum(self.calendar_wau(d) for d in days) / len(days),
                "mau": sum(self.calendar_mau(d) for d in days) / len(days),
                "stick": sum(100 * self.dau(d) / self.calendar_mau(d) for d in days) / len(days),
            }

        now, before = means(current), means(previous)
        out: dict[str, float | None] = {}
        for name, a in now.items():
            b = before[name]
            out[name] = None if a is None or not b else 100 * (a - b) / b
        return out


def token(role: str = "admin", org: str | None = ORG, settings: Settings | None = None) -> str:
    s = settings or Settings(jwt_secret=SECRET, _env_file=None)
    return issue_token(s, role=role, org_id=org, ttl_seconds=3600, now=time.time())


def number(n: int) -> str:
    return f"{n:,}"


CHANGE_RE = re.compile(r"^([+\u2212±])(\d+\.\d) %$")


async def assert_changes(page: Any, want: dict[str, float | None]) -> None:
    """Each card's change as shown: "n/a" where there is nothing to compare with, else a signed
    percentage with one decimal that matches ``want`` to its rounding."""
    for name, pct in want.items():
        shown = await page.inner_text(f"#card-{name}-delta")
        trend = await page.get_attribute(f"#card-{name}-delta", "data-trend")
        if pct is None:
            assert (shown, trend) == ("n/a", "na"), name
            continue
        match = CHANGE_RE.match(shown)
        assert match is not None, (name, shown)
        sign = {"+": 1, "\u2212": -1, "±": 0}[match.group(1)]
        value = sign * float(match.group(2))
        assert abs(value - pct) <= 0.05 + 1e-9, (name, shown, pct)
        assert trend == {1: "up", -1: "down", 0: "flat"}[sign], (name, trend)


# ---------------------------------------------------------------- page helpers


async def submit(page: Any, *, org: str = ORG, ws: str = WS, period: str = "30",
                 window: str = "calendar", token_value: str | None = None) -> str:
    if token_value is not None:
        await page.fill("#token", token_value)
    await page.fill("#org", org)
    await page.fill("#workspace", ws)
    await page.select_option("#period", period)
    await page.select_option("#window", window)
    await page.click("#load")
    # Functions, not expressions: the page's CSP forbids eval, which expressions would need.
    await page.wait_for_function(
        "() => ['ready', 'empty', 'error'].includes(document.body.dataset.state)")
    return str(await page.evaluate("() => document.body.dataset.state"))


async def colour_pixels(page: Any, chart_id: str, rgb: tuple[int, int, int]) -> int:
    """Opaque pixels of one colour on the chart's canvas: the drawn line, not a blank canvas."""
    return int(await page.evaluate(
        """([id, rgb]) => {
            const canvas = document.querySelector(`#${id} canvas`);
            const ctx = canvas.getContext('2d');
            const px = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
            let n = 0;
            for (let i = 0; i < px.length; i += 4) {
              if (px[i + 3] > 200 && Math.abs(px[i] - rgb[0]) < 40
                  && Math.abs(px[i + 1] - rgb[1]) < 40 && Math.abs(px[i + 2] - rgb[2]) < 40) n++;
            }
            return n;
        }""",
        [chart_id, list(rgb)],
    ))


async def hover_day(page: Any, view: str, day: date) -> dict[str, str]:
    """Moves the real mouse over ``day`` on a chart and reads the legend: label -> value."""
    point = await page.evaluate(
        """([view, iso]) => {
            const u = window.usageDashboard.charts[view];
            const [y, m, d] = iso.split('-').map(Number);
            const box = u.over.getBoundingClientRect();
            return {x: box.left + u.valToPos(Date.UTC(y, m - 1, d) / 1000, 'x'),
                    y: box.top + box.height / 2};
        }""",
        [view, day.isoformat()],
    )
    await page.mouse.move(point["x"], point["y"])
    chart = "#chart-active" if view == "active" else "#chart-stickiness"
    await page.wait_for_function(
        "([sel, iso]) => document.querySelector(sel + ' .u-legend .u-series .u-value')"
        ".textContent.includes(iso)",
        arg=[chart, day.isoformat()],
    )
    rows = page.locator(f"{chart} .u-legend tr.u-series")
    out: dict[str, str] = {}
    for i in range(await rows.count()):
        label = (await rows.nth(i).locator("th").inner_text()).strip()
        out[label] = (await rows.nth(i).locator("td.u-value").inner_text()).strip()
    return out


# ---------------------------------------------------------------- tests


async def test_page_and_assets_are_served_from_the_package(settings: Settings) -> None:
    transport = httpx.ASGITransport(app=create_app(settings))
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as c:
        page = await c.get("/dashboard")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        csp = page.headers["content-security-policy"]
        assert "script-src 'self'" in csp
        assert "connect-src 'self'" in csp
        html = page.text
        assert "http://" not in html  # no CDN
        assert "https://" not in html
        for asset in ("vendor/uplot/uPlot.iife.min.js", "vendor/uplot/uPlot.min.css",
                      "vendor/uplot/LICENSE", "dashboard.js", "dashboard.css"):
            r = await c.get(f"/dashboard/static/{asset}")
            assert r.status_code == 200, asset
            assert r.headers["x-content-type-options"] == "nosniff"
        assert (await c.get("/dashboard/static/dashboard.js")).headers[
            "content-type"].startswith("text/javascript")
        assert "MIT" in (await c.get("/dashboard/static/vendor/uplot/LICENSE")).text
        for bad in ("../app.py", "..%2Fapp.py", "%2e%2e/app.py", "nope.js", "", "vendor"):
            assert (await c.get(f"/dashboard/static/{bad}")).status_code == 404, bad


async def test_dashboard_draws_seeded_usage(
    store: SketchStore, server: str, page: Any, settings: Settings
) -> None:
    data = Seeded(utc_today())
    await store.add(data.batch(Scope(ORG, WS)))
    admin = token(settings=settings)
    known = data.end - timedelta(days=5)

    await page.goto(f"{server}/dashboard")
    assert await page.is_visible("#token")
    assert await page.evaluate("() => document.body.dataset.state") == "idle"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / "dashboard-start.png"), full_page=True)

    assert await submit(page, token_value=admin) == "ready"
    # The token is kept for this tab only, and the field is gone once it was entered.
    assert await page.evaluate("() => sessionStorage.getItem('usage-metrics.token')") == admin
    assert await page.evaluate("() => localStorage.length") == 0
    assert admin not in page.url
    assert await page.is_hidden("#token-field")
    assert await page.is_visible("#token-state")

    # Summary cards: the latest day's numbers.
    assert await page.inner_text("#card-dau") == number(data.dau(data.end))
    assert await page.inner_text("#card-wau") == number(data.calendar_wau(data.end))
    assert await page.inner_text("#card-mau") == number(data.calendar_mau(data.end))
    assert await page.inner_text("#tz") == "Dates in UTC"
    # Nothing was seeded before these 31 days: no change to show, and no "+100 %" either.
    await assert_changes(page, {"dau": None, "wau": None, "mau": None, "stick": None})

    # Three lines drawn, each in its own colour.
    for name in ("dau", "wau", "mau"):
        assert await colour_pixels(page, "chart-active", COLORS[name]) > 150, name

    # Hovering a known day shows its numbers in the legend.
    legend = await hover_day(page, "active", known)
    assert known.isoformat() in legend["Day"]
    assert legend["DAU"] == number(data.dau(known))
    assert legend["WAU"] == number(data.calendar_wau(known))
    assert legend["MAU"] == number(data.calendar_mau(known))

    await page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)

    # The stickiness view: DAU / MAU of the same day, in percent.
    await page.click("#tab-stickiness")
    assert await page.is_visible("#chart-stickiness")
    assert await page.is_hidden("#chart-active")
    assert await colour_pixels(page, "chart-stickiness", COLORS["stick"]) > 150
    legend = await hover_day(page, "stickiness", known)
    ratio = 100 * data.dau(known) / data.calendar_mau(known)
    assert legend["DAU / MAU"] == f"{ratio:.1f} %"
    ratios = [100 * data.dau(d) / data.calendar_mau(d) for d in data.days]
    assert await page.inner_text("#card-stick") == f"{sum(ratios) / len(ratios):.1f} %"
    await page.screenshot(path=str(ARTIFACTS / "dashboard-stickiness.png"), full_page=True)

    # Rolling windows: WAU is the 7 days ending on the day.
    await page.click("#tab-active")
    assert await submit(page, window="rolling") == "ready"
    legend = await hover_day(page, "active", known)
    assert legend["WAU"] == number(data.rolling_wau(known))

    # A reload keeps the token (entered once) and the view (in the URL) and loads by itself.
    await page.reload()
    await page.wait_for_function("() => document.body.dataset.state === 'ready'")
    assert await page.is_hidden("#token-field")
    assert await page.input_value("#window") == "rolling"
    assert await page.input_value("#workspace") == WS


async def test_dashboard_shows_errors_empty_state_and_timezone(
    store: SketchStore, server: str, page: Any, settings: Settings
) -> None:
    odd_ws = "team/ü 1"  # must travel as one percent-encoded path segment
    data = Seeded(utc_today())
    await store.add(data.batch(Scope(ORG, odd_ws)))
    requested: list[str] = []
    page.on("request", lambda r: requested.append(r.url) if "/metrics/usage" in r.url else None)
    await page.goto(f"{server}/dashboard")

    # A basic token is valid but lacks the permission: the API's 403 detail is shown.
    assert await submit(page, ws=odd_ws, token_value=token("basic", settings=settings)) == "error"
    assert await page.inner_text("#error-title") == "Not allowed (403)"
    assert await page.inner_text("#error-detail") == (
        "role 'basic' lacks the permission workspace_metrics:read")
    assert "/workspace/team%2F%C3%BC%201/metrics/usage?" in requested[-1]
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / "dashboard-403.png"), full_page=True)

    # Another org's token: 403 with the org message.
    await page.click("#change-token")
    state = await submit(page, ws=odd_ws, token_value=token("admin", "other", settings))
    assert state == "error"
    assert "another org" in await page.inner_text("#error-detail")

    # The right token for the same (odd) workspace draws it.
    await page.click("#change-token")
    assert await submit(page, ws=odd_ws, token_value=token(settings=settings)) == "ready"
    assert await page.inner_text("#card-dau") == number(data.dau(data.end))

    # A workspace without data: a clear empty state, no chart.
    assert await submit(page, ws="nobody-here") == "empty"
    assert await page.is_visible("#empty")
    assert await page.is_hidden("#results")
    assert "No logins in this period" in await page.inner_text("#empty")
    await page.screenshot(path=str(ARTIFACTS / "dashboard-empty.png"), full_page=True)

    # The dates' time zone comes from X-Timezone when the API sends one.
    async def add_timezone(route: Any) -> None:
        response = await route.fetch()
        await route.fulfill(response=response,
                            headers={**response.headers, "x-timezone": "Europe/Berlin"})

    await page.route("**/metrics/usage?*", add_timezone)
    assert await submit(page, ws=odd_ws) == "ready"
    assert await page.inner_text("#tz") == "Dates in Europe/Berlin"
    await page.unroute("**/metrics/usage?*")

    # A 422 from the real API (a period the form cannot send) shows FastAPI's message.
    async def too_long(route: Any) -> None:
        await route.continue_(url=route.request.url.replace("period_length=30",
                                                            "period_length=9999"))

    await page.route("**/metrics/usage?*", too_long)
    assert await submit(page, ws=odd_ws) == "error"
    assert await page.inner_text("#error-title") == "Invalid request (422)"
    assert "period_length: Input should be less than or equal to 730" in await page.inner_text(
        "#error-detail")
    await page.unroute("**/metrics/usage?*")

    # A 503 (Redis down) shows the detail and when to retry.
    async def unavailable(route: Any) -> None:
        await route.fulfill(status=503, headers={"Retry-After": "5"},
                            json={"detail": "store unavailable, try again shortly"})

    await page.route("**/metrics/usage?*", unavailable)
    assert await submit(page, ws=odd_ws) == "error"
    assert await page.inner_text("#error-title") == "Metrics store unavailable (503)"
    assert await page.inner_text("#error-detail") == "store unavailable, try again shortly"
    assert "5 s" in await page.inner_text("#error-hint")
    await page.unroute("**/metrics/usage?*")

    # A token that does not verify: 401, the token is dropped and the field comes back.
    await page.click("#forget-token")
    assert await submit(page, ws=odd_ws, token_value="not-a-jwt") == "error"
    assert await page.inner_text("#error-title") == "Not authenticated (401)"
    assert "invalid token" in await page.inner_text("#error-detail")
    assert await page.is_visible("#token")
    assert await page.evaluate("() => sessionStorage.getItem('usage-metrics.token')") is None


async def test_dashboard_compares_with_the_previous_period_and_says_how_it_counted(
    store: SketchStore, server: str, page: Any, settings: Settings
) -> None:
    end = utc_today()
    growing = Seeded(end, days=2 * DAYS, earlier=0.6)
    shrinking = Seeded(end, days=2 * DAYS, earlier=1.5, salt=1)
    await store.add(growing.batch(Scope(ORG, "growing")))
    await store.add(shrinking.batch(Scope(ORG, "shrinking")))
    requested: list[str] = []
    page.on("request", lambda r: requested.append(r.url) if "/metrics/usage" in r.url else None)
    await page.goto(f"{server}/dashboard")

    assert await submit(page, ws="growing", token_value=token(settings=settings)) == "ready"
    want = growing.changes()
    assert want["dau"] is not None
    assert want["dau"] > 0
    await assert_changes(page, want)
    # The second request: same length, ending the day before this period's first day.
    first = end - timedelta(days=DAYS - 1)
    assert len(requested) == 2, requested
    assert "end_date" not in requested[0]
    assert f"end_date={(first - ONE_DAY).isoformat()}" in requested[1]
    assert "period_length=30" in requested[1]
    assert "/workspace/growing/metrics/usage?" in requested[1]
    note = await page.inner_text("#compare-note")
    assert "against the 31 days before" in note
    assert f"{(first - DAYS * ONE_DAY).isoformat()} to {(first - ONE_DAY).isoformat()}" in note

    assert await submit(page, ws="shrinking") == "ready"
    want = shrinking.changes()
    assert want["dau"] is not None
    assert want["dau"] < 0
    await assert_changes(page, want)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / "dashboard-compare.png"), full_page=True)

    # The previous period failing costs only the comparison: the numbers are still shown.
    async def previous_fails(route: Any) -> None:
        if "end_date=" in route.request.url:
            await route.fulfill(status=503, json={"detail": "store unavailable"})
        else:
            await route.continue_()

    await page.route("**/metrics/usage?*", previous_fails)
    assert await submit(page, ws="shrinking") == "ready"
    await assert_changes(page, {"dau": None, "wau": None, "mau": None, "stick": None})
    assert "HTTP 503" in await page.inner_text("#compare-note")
    assert await page.inner_text("#card-dau") == number(shrinking.dau(end))
    await page.unroute("**/metrics/usage?*")

    # How the numbers were counted comes from the response headers, shown beside the chart.
    async def with_headers(extra: dict[str, str]) -> None:
        async def add(route: Any) -> None:
            response = await route.fetch()
            await route.fulfill(response=response, headers={**response.headers, **extra})

        await page.route("**/metrics/usage?*", add)

    await with_headers({"x-sketch-mode": "hll", "x-standard-error": "0.0081",
                        "x-week-start": "sunday"})
    assert await submit(page, ws="growing") == "ready"
    assert await page.inner_text("#counting") == "HyperLogLog, ±0.81 %"
    assert await page.inner_text("#week-start") == "weeks start Sunday"
    assert "(Sun–Sat)" in await page.inner_text("#explain")
    # Rolling weeks do not depend on the week start: the chip goes.
    assert await submit(page, ws="growing", window="rolling") == "ready"
    assert await page.is_hidden("#week-start")
    await page.unroute("**/metrics/usage?*")

    await with_headers({"x-sketch-mode": "exact", "x-standard-error": "0",
                        "x-week-start": "monday"})
    assert await submit(page, ws="growing") == "ready"
    assert await page.inner_text("#counting") == "exact counts"
    assert await page.inner_text("#week-start") == "weeks start Monday"
    assert "ISO week (Mon–Sun)" in await page.inner_text("#explain")
    await page.unroute("**/metrics/usage?*")


async def test_dashboard_shows_a_whole_org(
    store: SketchStore, server: str, page: Any, settings: Settings
) -> None:
    """An empty workspace asks the org endpoint, whose numbers count each member once across
    the org's workspaces. Needs the org endpoint (GET /api/v2/org/{org}/metrics/usage) and its
    X-Sketch-Mode / X-Week-Start headers."""
    end = utc_today()
    one = Seeded(end, days=2 * DAYS, earlier=0.7)
    two = Seeded(end, days=2 * DAYS, earlier=1.2, salt=2)
    org = one.merged(two)
    # Members active in both workspaces must count once: the sum would be visibly larger.
    assert org.dau(end) < one.dau(end) + two.dau(end)
    await store.add(one.batch(Scope(ORG, "one")))
    await store.add(two.batch(Scope(ORG, "two")))
    # The org's own sketches, as ingestion writes them beside the workspaces' (each member of
    # either workspace once); adding them again changes nothing if the write path already did.
    await store.add(org.batch(org_scope(ORG)))
    # Another org's logins never count.
    await store.add(Seeded(end, salt=3).batch(Scope("globex", "one")))
    requested: list[str] = []
    page.on("request", lambda r: requested.append(r.url) if "/metrics/usage" in r.url else None)
    await page.goto(f"{server}/dashboard")

    assert await submit(page, ws="", token_value=token(settings=settings)) == "ready", (
        await page.inner_text("body"))
    assert [u.split("?")[0].split("/api/")[1] for u in requested] == [
        f"v2/org/{ORG}/metrics/usage"] * 2
    assert "whole organization" in await page.inner_text("#status")
    assert await page.inner_text("#card-dau") == number(org.dau(end))
    assert await page.inner_text("#card-wau") == number(org.calendar_wau(end))
    assert await page.inner_text("#card-mau") == number(org.calendar_mau(end))
    known = end - timedelta(days=5)
    legend = await hover_day(page, "active", known)
    assert legend["DAU"] == number(org.dau(known))
    assert legend["MAU"] == number(org.calendar_mau(known))
    await assert_changes(page, org.changes())
    assert await page.inner_text("#counting") == "exact counts"  # the server's SKETCH_MODE
    assert await page.inner_text("#week-start") == "weeks start Monday"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = await page.screenshot(path=str(ARTIFACTS / "dashboard-org.png"), full_page=True)
    if os.environ.get("UPDATE_DOCS_SCREENSHOT") == "1":
        # The README's picture: the org view, each number beside its change (issue 16).
        assert len(shot) < DOCS_SCREENSHOT_MAX_BYTES, len(shot)
        DOCS_SCREENSHOT.parent.mkdir(exist_ok=True)
        DOCS_SCREENSHOT.write_bytes(shot)

    # The view is in the URL: a reload shows the org again by itself.
    await page.reload()
    await page.wait_for_function("() => document.body.dataset.state === 'ready'")
    assert await page.input_value("#workspace") == ""
    assert await page.inner_text("#card-dau") == number(org.dau(end))

    # Another org's token may not read this org.
    await page.click("#change-token")
    assert await submit(page, ws="", token_value=token("admin", "globex", settings)) == "error"
    assert "another org" in await page.inner_text("#error-detail")


# ---------------------------------------------------------------- /docs


async def test_docs_are_served_from_the_package_under_a_tight_csp(settings: Settings) -> None:
    """Issue 11: FastAPI's /docs and /redoc loaded Swagger UI from a CDN, on the origin where
    the dashboard keeps its token."""
    transport = httpx.ASGITransport(app=create_app(settings))
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as c:
        docs = await c.get("/docs")
        assert docs.status_code == 200
        csp = docs.headers["content-security-policy"]
        assert "script-src 'self';" in csp
        assert "connect-src 'self';" in csp
        assert "unsafe-inline" not in csp
        assert "http" not in docs.text  # no absolute URL: nothing from another origin
        assert "<script>" not in docs.text  # no inline script
        for asset in ("swagger-ui-bundle.js", "swagger-ui.css", "init.js"):
            r = await c.get(f"/docs/static/{asset}")
            assert r.status_code == 200, asset
        for bad in ("../app.py", "redoc.standalone.js", "core.py"):
            assert (await c.get(f"/docs/static/{bad}")).status_code == 404, bad
        assert (await c.get("/redoc")).status_code == 404
    off = create_app(settings.model_copy(update={"api_docs": False}))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=off),
                                 base_url="http://api") as c:
        assert (await c.get("/docs")).status_code == 404
        assert (await c.get("/openapi.json")).status_code == 200


async def test_docs_render_in_a_browser_from_this_origin_only(server: str, page: Any) -> None:
    requested: list[str] = []
    page.on("request", lambda r: requested.append(r.url))
    await page.goto(server + "/docs")
    await page.wait_for_selector(".swagger-ui .info .title")
    assert "usage-metrics" in await page.inner_text(".swagger-ui .info .title")
    paths = page.locator(".opblock-summary-path")
    await paths.first.wait_for()
    assert "/api/v2/org/{org_id}/workspace/{workspace_id}/metrics/usage" in [
        (await paths.nth(i).inner_text()).replace("\u200b", "") for i in range(await paths.count())
    ]
    assert requested
    foreign = [u for u in requested if not (u.startswith(server) or u.startswith("data:"))]
    assert foreign == []  # and the page fixture asserts no CSP violation was reported
