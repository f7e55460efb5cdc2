"""`usage-metrics demo` works from nothing: it prints a curl line that returns rows with data."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time

import httpx


def test_demo_prints_a_curl_line_that_returns_data(tmp_path: object) -> None:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("KAFKA_", "REDIS_", "JWT_"))}
    # Settings for a managed Kafka in the environment do not reach the demo's own broker.
    env.update(KAFKA_SECURITY_PROTOCOL="SASL_SSL", KAFKA_SASL_MECHANISM="SCRAM-SHA-512",
               KAFKA_SASL_USERNAME="someone", KAFKA_SASL_PASSWORD="not-for-the-demo")
    proc = subprocess.Popen(
        [sys.executable, "-m", "usage_metrics.cli", "demo", "--port", "0", "--days", "21"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True,
    )
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 150
        curl = None
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            if line.startswith("curl "):
                curl = line.strip()
                break
        assert curl is not None, "the demo printed no curl line"
        words = shlex.split(curl)
        header = words[words.index("-H") + 1]
        url = next(w for w in words if w.startswith("http://"))
        assert re.match(r"^Authorization: Bearer [\w-]+\.[\w-]+\.[\w-]+$", header)
        resp = httpx.get(url, headers=dict([header.split(": ", 1)]), timeout=30)
        assert resp.status_code == 200, resp.text
        rows = resp.json()
        assert len(rows) == 31
        assert sum(1 for r in rows if r["dau"]) >= 15  # three weeks of weekday logins
        assert all(r["wau"] is None or r["dau"] is None or r["wau"] >= r["dau"] for r in rows)
        assert all(r["mau"] is None or r["wau"] is None or r["mau"] >= r["dau"] for r in rows
                   if r["dau"])
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    assert proc.returncode == 0
