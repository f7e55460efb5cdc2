"""Start-up against Redis's eviction policy, through the real ``usage-metrics`` processes.

Each test starts a ``redis-server`` of its own with the policy it needs (``allkeys-lru``, a
renamed-away ``CONFIG``, or none yet on the port), and the commands as a supervisor would. The
refusal is exit status 78 with one error line that names the policy, the fix and the override,
and no traceback or password; the override and an unknown policy run on with a warning.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import redis

from sketches.eviction import EXIT_EVICTION_REFUSED
from tests.faults.helpers import (
    Proc,
    Procs,
    fault_settings,
    make_topics,
    service_env,
    wait_http,
)
from tests.support.memory import redis_server
from tests.support.servers import free_port

PASSWORD = "eviction-password-never-printed"
GAUGE = "usage_metrics_redis_eviction_allowed"


def exited(proc: Proc, timeout: float = 60.0) -> int:
    try:
        return proc.proc.wait(timeout)
    except Exception as err:
        raise AssertionError(f"{proc.name} did not exit:\n{proc.output()}") from err


def assert_refusal(proc: Proc, policy: str) -> None:
    out = proc.output(0)
    assert proc.proc.returncode == EXIT_EVICTION_REFUSED, out
    assert "Traceback" not in out, out
    assert PASSWORD not in out, out
    [line] = [x for x in out.splitlines() if "refusing to start" in x]
    assert " ERROR " in line, line
    for needed in (f"maxmemory-policy {policy}", "CONFIG SET maxmemory-policy noeviction",
                   "parameter group", "REDIS_ALLOW_EVICTION=true"):
        assert needed in line, (needed, line)


async def get(url: str) -> httpx.Response:
    async with httpx.AsyncClient(timeout=10) as http:
        return await http.get(url)


def gauge_value(text: str) -> float:
    [line] = [x for x in text.splitlines() if x.startswith(GAUGE + " ")]
    return float(line.split()[1])


async def test_every_command_refuses_an_evicting_redis_with_status_78_and_one_line(
    kafka_bootstrap: str, procs: Procs
) -> None:
    with redis_server("--maxmemory-policy", "allkeys-lru") as server:
        with redis.Redis(port=server.port) as admin:
            admin.config_set("requirepass", PASSWORD)  # the password must never be printed
        url = f"redis://:{PASSWORD}@127.0.0.1:{server.port}/0"
        settings = fault_settings(url, kafka_bootstrap)
        await make_topics(settings)
        env = service_env(settings)
        started = [
            procs.start(["consume"], env, "consume"),
            procs.start(["api", "--port", str(free_port())], env, "api"),
            procs.start(["replay", "--from-beginning"], env, "replay"),
            procs.start(["rebuild", "--org", "acme", "--workspace", "eng"], env, "rebuild"),
        ]
        for proc in started:
            exited(proc)
        for proc in started:
            assert_refusal(proc, "allkeys-lru")


async def test_the_override_runs_with_a_loud_warning_and_the_gauge_at_1(
    kafka_bootstrap: str, procs: Procs
) -> None:
    with redis_server("--maxmemory-policy", "volatile-lru") as server:
        settings = fault_settings(server.url, kafka_bootstrap)
        await make_topics(settings)
        health = free_port()
        consumer = procs.consumer(settings, REDIS_ALLOW_EVICTION="true",
                                  CONSUMER_HEALTH_PORT=str(health))
        api_metrics = free_port()
        api, base = procs.api(settings, REDIS_ALLOW_EVICTION="true",
                              API_METRICS_PORT=str(api_metrics))
        wait_http(consumer, f"http://127.0.0.1:{health}/readyz", 60)
        for proc, metrics_url in ((consumer, f"http://127.0.0.1:{health}/metrics"),
                                  (api, f"http://127.0.0.1:{api_metrics}/metrics")):
            assert gauge_value((await get(metrics_url)).text) == 1, proc.output()
            [line] = [x for x in proc.output(0).splitlines()
                      if "REDIS_ALLOW_EVICTION=true: running anyway" in x]
            assert " WARNING " in line, line
            assert "maxmemory-policy volatile-lru" in line, line
        assert (await get(f"{base}/readyz")).status_code == 200
        assert consumer.terminate() == 0, consumer.output()
        assert api.terminate() == 0, api.output()


async def test_config_disabled_is_said_and_every_process_goes_on(
    kafka_bootstrap: str, procs: Procs
) -> None:
    with redis_server("--rename-command", "CONFIG", "") as server:
        settings = fault_settings(server.url, kafka_bootstrap)
        await make_topics(settings)
        health = free_port()
        consumer = procs.consumer(settings, CONSUMER_HEALTH_PORT=str(health))
        api_metrics = free_port()
        api, _ = procs.api(settings, API_METRICS_PORT=str(api_metrics))
        wait_http(consumer, f"http://127.0.0.1:{health}/readyz", 60)
        for proc, metrics_url in ((consumer, f"http://127.0.0.1:{health}/metrics"),
                                  (api, f"http://127.0.0.1:{api_metrics}/metrics")):
            [line] = [x for x in proc.output(0).splitlines() if "CONFIG is disabled here" in x]
            assert " WARNING " in line, line
            assert "make sure it is noeviction" in line, line
            assert gauge_value((await get(metrics_url)).text) == 0
        assert consumer.terminate() == 0, consumer.output()
        assert api.terminate() == 0, api.output()


async def test_a_redis_that_answers_late_is_checked_then_and_refused(
    kafka_bootstrap: str, procs: Procs
) -> None:
    """Redis down at start: the consumer waits and the API serves 503, as before; once Redis
    answers with an evicting policy, both stop with status 78."""
    port = free_port()
    settings = fault_settings(f"redis://127.0.0.1:{port}/0", kafka_bootstrap)
    await make_topics(settings)
    consumer = procs.consumer(settings, REDIS_RETRY_MAX_BACKOFF_S="0.5")
    api, base = procs.api(settings, REDIS_RETRY_MAX_BACKOFF_S="0.5")
    ready = await get(f"{base}/readyz")
    assert ready.status_code == 503
    assert ready.json() == {"detail": "store unavailable"}
    deadline = time.monotonic() + 30
    while "cannot check Redis's maxmemory-policy yet" not in consumer.output(0):
        assert consumer.alive(), consumer.output()
        assert time.monotonic() < deadline, consumer.output()
        await asyncio.sleep(0.1)
    with redis_server("--maxmemory-policy", "allkeys-random", port=port):
        for proc in (consumer, api):
            exited(proc)
            assert_refusal(proc, "allkeys-random")
