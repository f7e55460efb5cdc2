/* Usage metrics dashboard: asks the usage endpoint with the caller's token and charts the rows.
 *
 * - The token lives in sessionStorage only (this tab, until it closes), never in the URL or a
 *   cookie; org, workspace, period and window live in the URL so that a view can be bookmarked.
 * - An empty workspace means the whole organization: the org endpoint counts each member once
 *   across its workspaces, which no sum of workspace numbers can.
 * - Each headline number gets its change against the previous period of the same length, from a
 *   second request ending the day before this period's first row (the rows' dates are the
 *   scope's local dates, which only the first answer tells).
 * - Ids are percent-encoded with encodeURIComponent, so any character (`/`, `:`, spaces,
 *   unicode) reaches the API as one path segment.
 * - Server text is only ever put in the page with textContent, never as HTML.
 */
(function () {
  "use strict";

  const TOKEN_KEY = "usage-metrics.token";
  const PERIODS = ["30", "90", "365", "730"];
  const WINDOWS = ["calendar", "rolling"];
  const COLORS = { dau: "#2563eb", wau: "#0d9488", mau: "#7c3aed", stick: "#d97706" };
  const FILLS = { dau: "rgba(37, 99, 235, 0.07)", stick: "rgba(217, 119, 6, 0.10)" };
  const MAX_ID = 128;
  const CHART_HEIGHT = 340;
  const WEEKDAYS = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"];
  const integer = new Intl.NumberFormat("en-US", { maximumFractionDigits: 0 });

  const $ = (id) => document.getElementById(id);

  // Everything the page knows; also a read-only handle for tests and debugging.
  const state = {
    rows: null,
    previousRows: null,
    comparison: null,
    timezone: "UTC",
    weekStart: null,
    view: "active",
    charts: { active: null, stickiness: null },
    data: null,
    request: null,
  };
  window.usageDashboard = state;

  /* ---------- token (sessionStorage only) ---------- */

  function storedToken() {
    try {
      return window.sessionStorage.getItem(TOKEN_KEY) || "";
    } catch (_err) {
      return "";
    }
  }

  function storeToken(token) {
    window.sessionStorage.setItem(TOKEN_KEY, token);
  }

  function forgetToken() {
    window.sessionStorage.removeItem(TOKEN_KEY);
  }

  function showTokenField(show) {
    $("token-field").hidden = !show;
    $("token-state").hidden = show || !storedToken();
    if (show) {
      $("token").value = "";
    }
  }

  /* ---------- form <-> URL ---------- */

  function readUrl() {
    const params = new URLSearchParams(window.location.search);
    if (params.has("org")) $("org").value = params.get("org");
    if (params.has("workspace")) $("workspace").value = params.get("workspace");
    if (PERIODS.includes(params.get("period"))) $("period").value = params.get("period");
    if (WINDOWS.includes(params.get("window"))) $("window").value = params.get("window");
  }

  function writeUrl(q) {
    const params = new URLSearchParams({
      org: q.org, workspace: q.workspace, period: q.period, window: q.window,
    });
    window.history.replaceState(null, "", window.location.pathname + "?" + params.toString());
  }

  function checkId(name, value) {
    if (!value) return `Enter the ${name}.`;
    if ([...value].length > MAX_ID) return `The ${name} has more than ${MAX_ID} characters.`;
    // The URL standard folds "." and ".." path segments (encoded or not) before sending.
    if (value === "." || value === "..") return `The ${name} "${value}" cannot be sent in a URL path.`;
    return null;
  }

  /* ---------- formatting ---------- */

  function dayToTs(day) {
    const [y, m, d] = day.split("-").map(Number);
    return Date.UTC(y, m - 1, d) / 1000;
  }

  function tsToDay(ts) {
    return new Date(ts * 1000).toISOString().slice(0, 10);
  }

  function previousDay(day) {
    return tsToDay(dayToTs(day) - 86400);
  }

  function longDay(ts) {
    return `${WEEKDAYS[new Date(ts * 1000).getUTCDay()]} ${tsToDay(ts)}`;
  }

  function fmtCount(v) {
    return v == null ? "—" : integer.format(v);
  }

  function fmtPercent(v) {
    return v == null ? "—" : `${v.toFixed(1)} %`;
  }

  // "+12.5 %", "−3.0 %" (a real minus sign), "±0.0 %" when it rounds to nothing, "n/a".
  function fmtChange(pct) {
    if (pct == null) return "n/a";
    const text = Math.abs(pct).toFixed(1);
    if (text === "0.0") return "±0.0 %";
    return `${pct > 0 ? "+" : "\u2212"}${text} %`;
  }

  function trendOf(pct) {
    if (pct == null) return "na";
    const text = Math.abs(pct).toFixed(1);
    if (text === "0.0") return "flat";
    return pct > 0 ? "up" : "down";
  }

  function weekdayName(weekStart) {
    return weekStart === "sunday" ? "Sunday" : "Monday";
  }

  // How the API counted, from its response headers; "" when it does not say.
  function countingText(mode, standardError) {
    if (mode === "exact") return "exact counts";
    if (mode !== "hll") return "";
    const err = Number.parseFloat(standardError);
    return Number.isFinite(err) && err > 0
      ? `HyperLogLog, ±${+(err * 100).toFixed(2)} %`
      : "HyperLogLog";
  }

  /* ---------- messages ---------- */

  function setPageState(name) {
    document.body.dataset.state = name;
  }

  function setStatus(text) {
    $("status").textContent = text;
  }

  function hideOutputs() {
    $("error").hidden = true;
    $("empty").hidden = true;
    $("results").hidden = true;
  }

  function describeDetail(body, text) {
    if (body && typeof body.detail === "string") return body.detail;
    if (body && Array.isArray(body.detail)) {
      return body.detail
        .map((e) => {
          const where = (e.loc || []).filter((p) => p !== "query" && p !== "path").join(".");
          return where ? `${where}: ${e.msg}` : String(e.msg);
        })
        .join("\n");
    }
    if (body != null) return JSON.stringify(body).slice(0, 500);
    return (text || "").trim().slice(0, 500);
  }

  const ERROR_TITLES = {
    401: "Not authenticated (401)",
    403: "Not allowed (403)",
    404: "Not found (404)",
    422: "Invalid request (422)",
    500: "Server error (500)",
    503: "Metrics store unavailable (503)",
  };

  function showError(title, detail, hint) {
    hideOutputs();
    $("error-title").textContent = title;
    $("error-detail").textContent = detail || "";
    $("error-hint").textContent = hint || "";
    $("error").hidden = false;
    setStatus("");
    setPageState("error");
  }

  function showHttpError(resp, body, text) {
    const status = resp.status;
    let hint = "";
    if (status === 401) {
      hint = "Enter a valid, unexpired token for this API.";
      forgetToken();
      showTokenField(true);
    } else if (status === 403) {
      hint = "Reading usage needs an admin, controller or curator token of this org " +
        "(or a superadmin token). Use “change” above to enter another token.";
    } else if (status === 404) {
      hint = "This server may not serve organization-wide numbers; enter a workspace.";
    } else if (status === 422) {
      hint = "Check the organization, workspace, period and window.";
    } else if (status === 503) {
      const after = resp.headers.get("Retry-After");
      hint = after ? `Try again in about ${after} s.` : "Try again shortly.";
    }
    showError(ERROR_TITLES[status] || `Unexpected response (${status})`,
      describeDetail(body, text) || `HTTP ${status}`, hint);
  }

  /* ---------- data ---------- */

  function validRows(body) {
    return Array.isArray(body) && body.every(
      (r) => r && typeof r.date === "string" && /^\d{4}-\d{2}-\d{2}$/.test(r.date));
  }

  function prepare(rows) {
    const xs = rows.map((r) => dayToTs(r.date));
    const dau = rows.map((r) => (r.dau == null ? null : r.dau));
    const wau = rows.map((r) => (r.wau == null ? null : r.wau));
    const mau = rows.map((r) => (r.mau == null ? null : r.mau));
    const stick = rows.map((r) => (r.dau != null && r.mau ? (100 * r.dau) / r.mau : null));
    return { xs, dau, wau, mau, stick };
  }

  function latest(xs, ys) {
    for (let i = ys.length - 1; i >= 0; i--) {
      if (ys[i] != null) return { value: ys[i], day: tsToDay(xs[i]) };
    }
    return null;
  }

  function average(ys) {
    const vals = ys.filter((v) => v != null);
    return vals.length ? vals.reduce((a, b) => a + b, 0) / vals.length : null;
  }

  // The mean of a count over every day of a period: a day without logins is null in the rows
  // and counts as 0 users here. A series with no value at all has no mean (null).
  function periodMean(ys) {
    if (!ys.length || ys.every((v) => v == null)) return null;
    return ys.reduce((a, v) => a + (v == null ? 0 : v), 0) / ys.length;
  }

  function change(current, previous) {
    if (current == null || previous == null || previous === 0) return null;
    return (100 * (current - previous)) / previous;
  }

  // A period has data when somebody logged in on one of its days. Its calendar WAU and MAU
  // alone do not tell: the week or month of its last day may reach into the next period.
  function hasLogins(d) {
    return d != null && d.dau.some((v) => v != null);
  }

  // Each headline's period figure now and in the previous period, and the change between.
  function compare(d, prev) {
    const both = hasLogins(d) && hasLogins(prev);
    const out = {};
    for (const name of ["dau", "wau", "mau"]) {
      const current = periodMean(d[name]);
      const previous = both ? periodMean(prev[name]) : null;
      out[name] = { current, previous, change: change(current, previous) };
    }
    const current = average(d.stick);
    const previous = both ? average(prev.stick) : null;
    out.stick = { current, previous, change: change(current, previous) };
    return out;
  }

  /* ---------- charts ---------- */

  // Isolated values (a day with logins between two without) would vanish with gaps and no
  // points, so they get a point; dense series draw points only where there is room for them.
  function pointFilter(u, sidx) {
    const ys = u.data[sidx];
    const n = ys.length;
    if (u.bbox.width / uPlot.pxRatio / Math.max(n, 1) >= 10) return null;
    const out = [];
    for (let i = 0; i < n; i++) {
      if (ys[i] != null && (i === 0 || ys[i - 1] == null) && (i === n - 1 || ys[i + 1] == null)) {
        out.push(i);
      }
    }
    return out;
  }

  function line(label, color, fill, value) {
    return {
      label,
      stroke: color,
      width: 2,
      fill: fill || undefined,
      spanGaps: false,
      value: (u, v) => value(v),
      points: { show: true, size: 5, fill: color, filter: pointFilter },
    };
  }

  function axes(format) {
    const common = {
      stroke: "#667085",
      font: "12px system-ui, sans-serif",
      grid: { stroke: "#eef0f3", width: 1 },
      ticks: { stroke: "#e3e6eb", width: 1 },
    };
    return [
      { ...common },
      { ...common, size: 60, values: (u, splits) => splits.map((v) => format(v)) },
    ];
  }

  function zeroBased(minRange) {
    return (u, dataMin, dataMax) => uPlot.rangeNum(0, Math.max(dataMax || 0, minRange), 0.1, true);
  }

  function chartWidth(el) {
    return Math.max(320, Math.floor(el.getBoundingClientRect().width || el.parentElement.clientWidth));
  }

  function baseOptions(el) {
    return {
      width: chartWidth(el),
      height: CHART_HEIGHT,
      tzDate: (ts) => uPlot.tzDate(new Date(ts * 1000), "Etc/UTC"),
      cursor: { y: false, drag: { x: true, y: false }, points: { size: 8 } },
      legend: { live: true },
    };
  }

  function buildActive(el, d) {
    const opts = {
      ...baseOptions(el),
      scales: { x: { time: true }, y: { range: zeroBased(4) } },
      axes: axes((v) => integer.format(v)),
      series: [
        { label: "Day", value: (u, ts) => (ts == null ? "hover the chart" : longDay(ts)) },
        line("DAU", COLORS.dau, FILLS.dau, fmtCount),
        line("WAU", COLORS.wau, null, fmtCount),
        line("MAU", COLORS.mau, null, fmtCount),
      ],
    };
    return new uPlot(opts, [d.xs, d.dau, d.wau, d.mau], el);
  }

  function buildStickiness(el, d) {
    const opts = {
      ...baseOptions(el),
      scales: { x: { time: true }, y: { range: zeroBased(10) } },
      axes: axes((v) => `${+v.toFixed(1)} %`),
      series: [
        { label: "Day", value: (u, ts) => (ts == null ? "hover the chart" : longDay(ts)) },
        line("DAU / MAU", COLORS.stick, FILLS.stick, fmtPercent),
      ],
    };
    return new uPlot(opts, [d.xs, d.stick], el);
  }

  function destroyCharts() {
    for (const key of Object.keys(state.charts)) {
      if (state.charts[key]) state.charts[key].destroy();
      state.charts[key] = null;
    }
  }

  function ensureChart(view) {
    if (!state.data || state.charts[view]) return;
    const el = $(view === "active" ? "chart-active" : "chart-stickiness");
    state.charts[view] = view === "active" ? buildActive(el, state.data) : buildStickiness(el, state.data);
  }

  function showView(view) {
    state.view = view;
    const active = view === "active";
    $("tab-active").setAttribute("aria-selected", String(active));
    $("tab-stickiness").setAttribute("aria-selected", String(!active));
    $("chart-active").hidden = !active;
    $("chart-stickiness").hidden = active;
    ensureChart(view);
    resize();
    $("explain").textContent = active ? explainActive() : explainStickiness();
  }

  function explainActive() {
    const base = "DAU: distinct users who logged in that day (a gap is a day without logins). ";
    const week = state.weekStart === "sunday" ? "the week (Sun–Sat)" : "the ISO week (Mon–Sun)";
    return $("window").value === "rolling"
      ? base + "WAU and MAU: distinct users of the 7 and 30 days ending that day."
      : base + `WAU: ${week} holding the day; MAU: its calendar month. ` +
        "A week or month without logins keeps the previous value.";
  }

  function explainStickiness() {
    return "Stickiness: DAU divided by MAU of the same day, the share of the month's users " +
      "who were active that day. Higher means users come back more often.";
  }

  function resize() {
    const view = state.view;
    const chart = state.charts[view];
    if (!chart) return;
    const el = $(view === "active" ? "chart-active" : "chart-stickiness");
    const width = chartWidth(el);
    if (Math.abs(width - chart.width) > 1) chart.setSize({ width, height: CHART_HEIGHT });
  }

  /* ---------- rendering ---------- */

  function scopeName(q) {
    return q.workspace ? `${q.org} / ${q.workspace}` : `${q.org} (whole organization)`;
  }

  function showComparison(comparison, rows, previousRows, problem) {
    const days = rows.length;
    for (const name of ["dau", "wau", "mau", "stick"]) {
      const c = comparison[name];
      const el = $(`card-${name}-delta`);
      el.textContent = fmtChange(c.change);
      el.dataset.trend = trendOf(c.change);
      const label = name === "stick" ? "average stickiness" : `average ${name.toUpperCase()}`;
      el.title = c.change == null
        ? (problem || `no ${name === "stick" ? "stickiness" : name.toUpperCase()} in the previous ${days} days`)
        : `${label}: ${fmtNumber(c.current)} against ${fmtNumber(c.previous)} in the previous ${days} days`;
    }
    const prevRange = previousRows && previousRows.length
      ? ` (${previousRows[0].date} to ${previousRows[previousRows.length - 1].date})`
      : "";
    $("compare-note").textContent =
      `Change: the average of these ${days} days against the ${days} days before` +
      `${prevRange}; a day without logins counts as 0.` +
      (problem ? ` Previous period: ${problem}.` : "");
  }

  function fmtNumber(v) {
    return v == null ? "—" : (Math.round(v * 10) / 10).toLocaleString("en-US");
  }

  function showCounting(counting, weekStart, windowName) {
    $("counting").textContent = counting;
    $("counting").hidden = !counting;
    $("week-start").textContent = weekStart ? `weeks start ${weekdayName(weekStart)}` : "";
    $("week-start").hidden = !weekStart || windowName !== "calendar";
  }

  function render(q, answer, previous) {
    const rows = answer.rows;
    const timezone = answer.timezone;
    hideOutputs();
    destroyCharts();
    state.rows = rows;
    state.previousRows = previous.rows;
    state.timezone = timezone;
    state.weekStart = answer.weekStart;
    const d = prepare(rows);
    state.data = d;
    const range = rows.length
      ? `${rows[0].date} to ${rows[rows.length - 1].date}`
      : "no days";
    const windowName = q.window === "rolling" ? "rolling windows" : "calendar weeks and months";
    const empty = rows.every((r) => r.dau == null && r.wau == null && r.mau == null);
    if (empty) {
      $("empty-detail").textContent =
        `Nobody logged in to ${scopeName(q)} from ${range} (${timezone}). ` +
        (q.workspace ? "Check the organization and workspace ids, or pick a longer period."
          : "Check the organization id, or pick a longer period.");
      $("empty").hidden = false;
      setStatus("");
      setPageState("empty");
      return;
    }
    for (const name of ["dau", "wau", "mau"]) {
      const last = latest(d.xs, d[name]);
      $(`card-${name}`).textContent = last ? fmtCount(last.value) : "—";
      $(`card-${name}-when`).textContent = last ? `latest, ${last.day}` : "no data";
    }
    $("card-stick").textContent = fmtPercent(average(d.stick));
    state.comparison = compare(d, previous.rows ? prepare(previous.rows) : null);
    showComparison(state.comparison, rows, previous.rows, previous.problem);
    $("tz").textContent = `Dates in ${timezone}`;
    showCounting(answer.counting, answer.weekStart, q.window);
    $("results").hidden = false;
    setStatus(`${scopeName(q)} · ${rows.length} days, ${range} · ${windowName}`);
    showView(state.view);
    setPageState("ready");
  }

  function usageUrl(q, endDate) {
    const scope = q.workspace
      ? `/api/v2/org/${encodeURIComponent(q.org)}/workspace/${encodeURIComponent(q.workspace)}`
      : `/api/v2/org/${encodeURIComponent(q.org)}`;
    const params = { period_length: q.period, window: q.window };
    if (endDate) params.end_date = endDate;
    return `${scope}/metrics/usage?${new URLSearchParams(params)}`;
  }

  async function fetchRows(url, token, signal) {
    const resp = await fetch(url, {
      headers: { Authorization: `Bearer ${token}`, Accept: "application/json" },
      signal,
      cache: "no-store",
    });
    const text = await resp.text();
    let body = null;
    try {
      body = text ? JSON.parse(text) : null;
    } catch (_err) {
      body = null;
    }
    return { resp, body, text };
  }

  async function load() {
    const q = {
      org: $("org").value,
      workspace: $("workspace").value,
      period: $("period").value,
      window: $("window").value,
    };
    const typed = $("token").value.trim();
    if (typed) {
      storeToken(typed.replace(/^Bearer\s+/i, ""));
      showTokenField(false);
    }
    const token = storedToken();
    const problem = !token
      ? "Enter an API token first."
      : checkId("organization", q.org) || (q.workspace && checkId("workspace", q.workspace));
    if (problem) {
      showError("Missing input", problem, "");
      if (!token) showTokenField(true);
      return;
    }
    writeUrl(q);

    if (state.request) state.request.abort();
    const controller = new AbortController();
    state.request = controller;
    const ask = (endDate) => fetchRows(usageUrl(q, endDate), token, controller.signal);

    setPageState("loading");
    setStatus("Loading…");
    $("load").disabled = true;
    try {
      const { resp, body, text } = await ask(null);
      if (controller !== state.request) return;
      if (!resp.ok) {
        showHttpError(resp, body, text);
        return;
      }
      if (!validRows(body)) {
        showError("Unexpected answer", "The API answered 200 without rows of usage.", "");
        return;
      }
      const answer = {
        rows: body,
        timezone: resp.headers.get("X-Timezone") || "UTC",
        weekStart: resp.headers.get("X-Week-Start"),
        counting: countingText(resp.headers.get("X-Sketch-Mode"),
          resp.headers.get("X-Standard-Error")),
      };
      // The previous period: same length, ending the day before this one's first (local) day.
      // Its failure costs only the comparison ("n/a"), never the numbers already here.
      const previous = { rows: null, problem: "" };
      if (body.length) {
        setStatus("Loading the previous period…");
        const prev = await ask(previousDay(body[0].date));
        if (controller !== state.request) return;
        if (prev.resp.ok && validRows(prev.body)) {
          previous.rows = prev.body;
        } else {
          previous.problem = `not available (HTTP ${prev.resp.status})`;
        }
      }
      render(q, answer, previous);
    } catch (err) {
      if (err && err.name === "AbortError") return;
      showError("Could not reach the API", String(err && err.message ? err.message : err),
        "Check that the service is running and reachable from this browser.");
    } finally {
      if (controller === state.request) {
        state.request = null;
        $("load").disabled = false;
      }
    }
  }

  /* ---------- wiring ---------- */

  function start() {
    readUrl();
    showTokenField(!storedToken());
    $("query").addEventListener("submit", (ev) => {
      ev.preventDefault();
      load();
    });
    $("change-token").addEventListener("click", () => {
      showTokenField(true);
      $("token-state").hidden = false;
      $("token").focus();
    });
    $("forget-token").addEventListener("click", () => {
      forgetToken();
      showTokenField(true);
      $("token").focus();
    });
    $("tab-active").addEventListener("click", () => showView("active"));
    $("tab-stickiness").addEventListener("click", () => showView("stickiness"));
    if (window.ResizeObserver) {
      new ResizeObserver(() => resize()).observe($("results"));
    } else {
      window.addEventListener("resize", resize);
    }
    $("tz").textContent = "Dates in UTC";
    // A bookmarked view names its org (and a workspace, or none for the whole org).
    if (storedToken() && $("org").value && new URLSearchParams(window.location.search).has("org")) {
      load();
    } else {
      (storedToken() ? $("org") : $("token")).focus();
    }
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else {
    start();
  }
})();
