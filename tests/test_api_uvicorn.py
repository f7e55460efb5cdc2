"""The API as it is deployed: ``usage-metrics api`` in its own process, behind real uvicorn.

Settings reach it only through the environment, ids go over a real socket (so ``%2F`` survives
uvicorn's parser), and SIGTERM must shut it down cleanly.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from api.auth import issue_token
from sketches.config import Settings
from sketches.keys import Scope
from sketches.periods import month_of, periods_holding, utc_today, week_of
from sketches.store import SketchStore
from tests.support.servers import free_port

USAGE = "/api/v2/org/{org}/workspace/{ws}/metrics/usage"
USAGE_TEMPLATE = "/api/v2/org/{org_id}/workspace/{workspace_id}/metrics/usage"


def usage_metrics_bin() -> str:
    beside = Path(sys.executable).parent / "usage-metrics"
    if beside.exists():
        return str(beside)
    found = shutil.which("usage-metrics")
    if found is None:
        pytest.fail("the usage-metrics console script is not installed (pip install -e .)")
    return found


@dataclass
class ApiProcess:
    proc: subprocess.Popen[bytes]
    base_url: str
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


def _wait_healthy(api: ApiProcess, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if api.proc.poll() is not None:
            pytest.fail(f"usage-metrics api exited with {api.proc.returncode}:\n{api.output()}")
        try:
            if httpx.get(api.base_url + "/healthz", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"usage-metrics api never answered /healthz:\n{api.output()}")
        time.sleep(0.1)


@pytest.fixture
def api(settings: Settings, tmp_path: Path) -> Iterator[ApiProcess]:
    assert settings.jwt_secret is not None
    port = free_port()
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("REDIS_", "JWT_", "SKETCH_", "MAX_PERIOD", "RETENTION_", "KAFKA_"))
    }
    env.update(
        REDIS_URL=settings.redis_url.get_secret_value(),
        REDIS_KEY_PREFIX=settings.redis_key_prefix,
        SKETCH_MODE=settings.sketch_mode,
        JWT_SECRET=settings.jwt_secret.get_secret_value(),
        PYTHONUNBUFFERED="1",
    )
    log = tmp_path / "api.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [usage_metrics_bin(), "api", "--host", "127.0.0.1", "--port", str(port)],
            cwd=tmp_path,  # no stray .env file
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    handle = ApiProcess(proc, f"http://127.0.0.1:{port}", log)
    try:
        _wait_healthy(handle)
        yield handle
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


async def test_served_by_uvicorn(api: ApiProcess, settings: Settings, store: SketchStore) -> None:
    day = utc_today() - timedelta(days=1)
    plain = Scope("acme", "ws-1")
    slashed = Scope("a/b", "c:d")
    for ws, users in ((plain, {"u1", "u2", "u3"}), (slashed, {"u1"})):
        assert await store.add({(ws, p): users for p in periods_holding(day)}) == []

    token = issue_token(settings, role="admin", org_id="acme", ttl_seconds=300, now=time.time())
    root = issue_token(settings, role="superadmin", org_id=None, ttl_seconds=300, now=time.time())
    params: dict[str, Any] = {"end_date": day.isoformat(), "period_length": 1}
    async with httpx.AsyncClient(base_url=api.base_url, timeout=10.0) as c:
        ready = await c.get("/readyz")
        assert ready.status_code == 200, ready.text

        resp = await c.get(
            USAGE.format(org="acme", ws="ws-1"),
            params=params,
            headers={"Authorization": f"Bearer {token}"},
        )
        assert resp.status_code == 200, resp.text
        assert resp.headers["content-type"].startswith("application/json")
        before = day - timedelta(days=1)
        # The day before has no login; its week and month hold the day's logins when shared.
        assert resp.json() == [
            {
                "date": before.isoformat(),
                "dau": None,
                "wau": 3 if week_of(before) == week_of(day) else None,
                "mau": 3 if month_of(before) == month_of(day) else None,
            },
            {"date": day.isoformat(), "dau": 3, "wau": 3, "mau": 3},
        ]

        # An id with "/" and ":" over a real socket: uvicorn must hand over the raw path.
        odd = await c.get(
            USAGE.format(org="a%2Fb", ws="c%3Ad"),
            params={**params, "metrics": "dau"},
            headers={"Authorization": f"Bearer {root}"},
        )
        assert odd.status_code == 200, odd.text
        assert odd.json()[-1] == {"date": day.isoformat(), "dau": 1, "wau": None, "mau": None}

        other = await c.get(
            USAGE.format(org="other", ws="ws-1"), headers={"Authorization": f"Bearer {token}"}
        )
        assert other.status_code == 403, other.text
        assert set(other.json()) == {"detail"}

        anonymous = await c.get(USAGE.format(org="acme", ws="ws-1"))
        assert anonymous.status_code == 401
        assert anonymous.headers["www-authenticate"].startswith("Bearer")
        assert set(anonymous.json()) == {"detail"}

        invalid = await c.get(
            USAGE.format(org="acme", ws="ws-1"),
            params={"period_length": -1},
            headers={"Authorization": f"Bearer {token}"},
        )
        assert invalid.status_code == 422
        assert invalid.json()["detail"][0]["loc"] == ["query", "period_length"]

        spec = await c.get("/openapi.json")
        assert spec.status_code == 200
        responses = spec.json()["paths"][USAGE_TEMPLATE]["get"]["responses"]
        for status in ("200", "401", "403", "422", "503"):
            assert status in responses, (status, sorted(responses))
        params_doc = {p["name"] for p in spec.json()["paths"][USAGE_TEMPLATE]["get"]["parameters"]}
        assert {"org_id", "workspace_id", "period_length", "metrics", "window", "end_date"} <= (
            params_doc
        )

    assert stop(api) is not None


def stop(api: ApiProcess) -> int:
    """SIGTERM, then the exit code; the process must be gone within 10 s."""
    api.proc.send_signal(signal.SIGTERM)
    try:
        return api.proc.wait(10)
    except subprocess.TimeoutExpired:
        pytest.fail(f"usage-metrics api ignored SIGTERM for 10 s:\n{api.output()}")


async def test_sigterm_exits_cleanly_with_code_0(api: ApiProcess) -> None:
    async with httpx.AsyncClient(base_url=api.base_url, timeout=10.0) as c:
        assert (await c.get("/healthz")).status_code == 200
    code = stop(api)
    assert "Traceback" not in api.output()
    assert code == 0, f"exit code {code} after SIGTERM:\n{api.output()}"
