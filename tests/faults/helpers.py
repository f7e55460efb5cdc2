"""What the fault tests share: real consumer and API processes, traffic with known answers, and an
exact check of every bucket the store holds.

Every process a test starts is a child it can SIGKILL, SIGSTOP or SIGTERM, started from a scratch
directory (so no stray ``.env`` file leaks settings in) with its settings in the environment, the
way a supervisor would run it. Its output goes to a file the test reads when an assertion fails.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import httpx
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer

from sketches.config import Settings
from sketches.keys import Scope
from sketches.periods import periods_holding, utc_today
from sketches.query import Window, usage
from sketches.store import SketchStore
from tests.conftest import create_topics
from tests.support.compare import assert_rows_match, rows_as_dicts
from tests.support.oracle import Oracle
from tests.support.servers import free_port
from usage_metrics.synth import SynthEvent

TODAY = utc_today()
JWT_SECRET = "fault-suite-secret-at-least-32-bytes!!"
# Group liveness for the fault tests. A SIGKILLed member stays in the group until its session
# times out, and every restart waits for that, so the tests use 1.5 s. Tansu accepts it; an
# Apache Kafka broker refuses sessions below group.min.session.timeout.ms (6 s by default), so
# on a real Kafka set that broker option lower or expect these tests to take longer.
SESSION_TIMEOUT_MS = 1500
HEARTBEAT_INTERVAL_MS = 300

_OWN_PREFIXES = ("REDIS_", "KAFKA_", "JWT_", "SKETCH_", "CONSUMER_", "RATE_LIMIT_", "LOG_",
                 "MAX_PERIOD", "RETENTION_", "USAGE_METRICS_", "DEFAULT_TIMEZONE",
                 "SETTINGS_CACHE")


def unique(name: str) -> str:
    return f"{name}-{os.urandom(5).hex()}"


def fault_settings(redis_url: str, bootstrap: str, **overrides: object) -> Settings:
    """Exact mode, a fresh topic, group and key prefix, short group timeouts."""
    values: dict[str, object] = {
        "redis_url": redis_url,
        "kafka_bootstrap_servers": bootstrap,
        "kafka_topic": unique("metrics"),
        "kafka_dlq_topic": unique("dlq"),
        "kafka_group_id": unique("group"),
        "redis_key_prefix": unique("f"),
        "sketch_mode": "exact",
        "jwt_secret": JWT_SECRET,
        "consumer_fetch_timeout_ms": 100,
        "consumer_session_timeout_ms": SESSION_TIMEOUT_MS,
        "consumer_heartbeat_interval_ms": HEARTBEAT_INTERVAL_MS,
    }
    values.update(overrides)
    return Settings(**values, _env_file=None)  # type: ignore[arg-type]


def service_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment a supervisor would give ``usage-metrics``: these settings and no others."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_OWN_PREFIXES)}
    env.update({
        "KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
        "KAFKA_TOPIC": settings.kafka_topic,
        "KAFKA_DLQ_TOPIC": settings.kafka_dlq_topic,
        "KAFKA_GROUP_ID": settings.kafka_group_id,
        "REDIS_URL": settings.redis_url.get_secret_value(),
        "REDIS_KEY_PREFIX": settings.redis_key_prefix,
        "SKETCH_MODE": settings.sketch_mode,
        "CONSUMER_FETCH_TIMEOUT_MS": str(settings.consumer_fetch_timeout_ms),
        "CONSUMER_SESSION_TIMEOUT_MS": str(settings.consumer_session_timeout_ms),
        "CONSUMER_HEARTBEAT_INTERVAL_MS": str(settings.consumer_heartbeat_interval_ms),
        "PYTHONUNBUFFERED": "1",
    })
    if settings.jwt_secret is not None:
        env["JWT_SECRET"] = settings.jwt_secret.get_secret_value()
    env.update(extra)
    return env


def cli() -> list[str]:
    return [sys.executable, "-m", "usage_metrics.cli"]


@dataclass
class Proc:
    """One ``usage-metrics`` child process and its combined output."""

    proc: subprocess.Popen[bytes]
    log: Path
    name: str

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def output(self, tail: int = 6000) -> str:
        text = self.log.read_text(errors="replace")
        return text[-tail:] if tail else text

    def kill(self) -> None:
        """SIGKILL: no cleanup, no commit, no leaving the group."""
        if self.alive():
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def pause(self) -> None:
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait: the consumer finishes its batch, commits and leaves the group."""
        if self.alive():
            self.proc.send_signal(signal.SIGCONT)
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"{self.name} ignored SIGTERM:\n{self.output()}") from None


@dataclass
class Procs:
    """Every child a test started; whatever is still running at teardown is SIGKILLed."""

    directory: Path
    started: list[Proc] = field(default_factory=list)

    def start(self, args: Sequence[str], env: dict[str, str], name: str) -> Proc:
        log = self.directory / f"{name}-{len(self.started)}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [*cli(), *args], cwd=self.directory, env=env, stdout=out,
                stderr=subprocess.STDOUT,
            )
        handle = Proc(proc, log, name)
        self.started.append(handle)
        return handle

    def consumer(self, settings: Settings, name: str = "consumer", **extra: str) -> Proc:
        return self.start(["consume"], service_env(settings, **extra), name)

    def api(self, settings: Settings, **extra: str) -> tuple[Proc, str]:
        port = free_port()
        handle = self.start(
            ["api", "--host", "127.0.0.1", "--port", str(port)],
            service_env(settings, **extra), "api",
        )
        base = f"http://127.0.0.1:{port}"
        wait_http(handle, base + "/healthz")
        return handle, base

    def cleanup(self) -> None:
        for p in self.started:
            if p.alive():
                p.proc.send_signal(signal.SIGCONT)
                p.kill()

    def all_output(self) -> str:
        return "\n".join(f"--- {p.name} (pid {p.pid}) ---\n{p.output(3000)}" for p in self.started)


def wait_http(proc: Proc, url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if not proc.alive():
            raise AssertionError(f"{proc.name} exited with {proc.proc.returncode}:\n"
                                 f"{proc.output()}")
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{proc.name} never answered {url}:\n{proc.output()}")
        time.sleep(0.1)


async def make_topics(settings: Settings, partitions: int = 2) -> None:
    await create_topics(settings.kafka_bootstrap_servers, settings.kafka_topic,
                        partitions=partitions)
    await create_topics(settings.kafka_bootstrap_servers, settings.kafka_dlq_topic)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


# Traffic with known answers.

@dataclass(frozen=True)
class Traffic:
    events: list[SynthEvent]

    @property
    def values(self) -> list[bytes]:
        return [e.to_json() for e in self.events]

    def oracle(self) -> Oracle:
        return oracle_of(self.events)

    @property
    def workspaces(self) -> set[Scope]:
        return {Scope(e.org_id, e.workspace_id) for e in self.events}


def logins(
    n: int,
    orgs: Sequence[str] = ("acme", "globex", "initech"),
    workspaces_per_org: int = 2,
    users: int = 300,
    days: int = 45,
    seed: int = 0,
    tag: str = "",
) -> Traffic:
    """``n`` logins spread over orgs, workspaces and the last ``days`` days. Subjects carry their
    org's name (``acme/u17``), so a subject found under another org is a leak, not a
    coincidence."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        org = rng.choice(orgs)
        ws = f"ws-{rng.randrange(workspaces_per_org)}"
        d = TODAY - timedelta(days=rng.randrange(days))
        moment = datetime(d.year, d.month, d.day, tzinfo=UTC) + timedelta(
            seconds=rng.randrange(86400)
        )
        out.append(SynthEvent(org, ws, f"{org}/{tag}u{rng.randrange(users)}", moment))
    return Traffic(out)


def oracle_of(events: Iterable[SynthEvent]) -> Oracle:
    return Oracle(
        (Scope(e.org_id, e.workspace_id), e.subject, e.timestamp.astimezone(UTC).date())
        for e in events if e.metric_type == "login"
    )


_SKETCH_KEY = re.compile(r":set:[dwm]:[^:]+$")


def expected_buckets(store: SketchStore, events: Iterable[SynthEvent]) -> dict[str, set[bytes]]:
    """Every sketch key the events must produce, with its exact members: the workspace's, and
    its org's own (everything here counts in UTC)."""
    out: defaultdict[str, set[bytes]] = defaultdict(set)
    for e in events:
        if e.metric_type != "login":
            continue
        ws = Scope(e.org_id, e.workspace_id)
        for period in periods_holding(e.timestamp.astimezone(UTC).date()):
            for scope in (ws, ws.org):
                out[store.keys.sketch(scope, period)].add(e.subject.encode())
    return dict(out)


async def stored_buckets(store: SketchStore) -> dict[str, set[bytes]]:
    """Every sketch key under the store's prefix with its members (exact mode)."""
    assert store.keys.mode == "exact", "bucket-level checks need exact sets"
    client = store.client
    out: dict[str, set[bytes]] = {}
    async for raw in client.scan_iter(match=f"{store.keys.prefix}:{{*", count=1000):
        key = raw.decode()
        if not _SKETCH_KEY.search(key):
            continue  # workspace settings, version tokens and other bookkeeping
        members = {m if isinstance(m, bytes) else m.encode() for m in await client.smembers(key)}
        out[key] = members
    return out


async def assert_buckets_exact(store: SketchStore, events: Sequence[SynthEvent]) -> None:
    """Every (workspace, period) set holds exactly the subjects the events put there: nothing
    lost, nothing extra, no subject of one org under another."""
    want = expected_buckets(store, events)
    got = await stored_buckets(store)
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    assert not missing, f"{len(missing)} buckets missing, e.g. {missing[:3]}"
    assert not extra, f"{len(extra)} unexpected buckets, e.g. {extra[:3]}"
    wrong = [k for k in want if want[k] != got[k]]
    assert not wrong, "buckets differ: " + "; ".join(
        f"{k}: lost {sorted(want[k] - got[k])[:3]}, extra {sorted(got[k] - want[k])[:3]}"
        for k in wrong[:3]
    )
    for key, members in got.items():
        org = store.keys.parse_workspace(key).org_id
        strangers = [m for m in members if not m.decode().startswith(org + "/")]
        assert not strangers, f"{key} holds subjects of another org: {strangers[:3]}"


async def assert_rows_exact(
    store: SketchStore, oracle: Oracle, workspaces: Iterable[Scope], period_length: int = 50
) -> None:
    """The query path too: the endpoint's rows equal the independent oracle's, both windows."""
    for ws in sorted(workspaces):
        for window in (Window.CALENDAR, Window.ROLLING):
            rows = await usage(store, ws, end=TODAY, period_length=period_length, window=window,
                               horizon=TODAY - timedelta(days=800))
            assert_rows_match(rows_as_dicts(rows),
                              oracle.rows(ws, TODAY, period_length, window.value), "exact")


async def applied(store: SketchStore, topic: str, partitions: Iterable[int]) -> dict[int, int]:
    parts = sorted(partitions)
    got = await store.applied_offsets([(topic, p) for p in parts])
    return {p: (g or 0) for p, g in zip(parts, got, strict=True)}


async def wait_until(
    probe: object, what: str, timeout: float, interval: float = 0.1, context: object = None
) -> None:
    """Poll an async predicate until it holds; fail with ``what`` (and ``context()``) at the
    deadline. The deadline is a limit on waiting, never an assertion about speed."""
    assert callable(probe)
    deadline = time.monotonic() + timeout
    while True:
        if await probe():
            return
        if time.monotonic() > deadline:
            extra = context() if callable(context) else ""
            raise AssertionError(f"timed out waiting for {what}\n{extra}")
        await asyncio.sleep(interval)


def aof_incr_file(directory: Path) -> Path:
    """The file Redis 7 appends to: the last ``incr`` entry of the multi-part AOF manifest."""
    aof_dir = directory / "appendonlydir"
    manifests = list(aof_dir.glob("*.manifest"))
    assert len(manifests) == 1, f"expected one AOF manifest in {aof_dir}: {manifests}"
    incr = [
        line.split()[1]
        for line in manifests[0].read_text().splitlines()
        if line.split()[-1:] == ["i"]
    ]
    assert incr, f"no incr file in {manifests[0].read_text()}"
    return aof_dir / incr[-1]


async def client_count(url: str) -> list[dict[str, str]]:
    """``CLIENT LIST`` of a Redis server, less this very connection."""
    client = aioredis.Redis.from_url(url)
    try:
        me = await client.client_id()
        return [c for c in await client.client_list() if c["id"] != str(me)]
    finally:
        await client.aclose()


async def read_values(
    bootstrap: str, topic: str, want: set[bytes], timeout: float = 15.0
) -> list[bytes]:
    """Every value of a topic read from the beginning until ``want`` has been seen (or the
    deadline passed): duplicates are kept, so at-least-once delivery can be checked."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                enable_auto_commit=False, max_partition_fetch_bytes=16 << 20)
    await consumer.start()
    out: list[bytes] = []
    try:
        deadline = time.monotonic() + timeout
        while not want <= set(out) and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=200)
            for records in batch.values():
                out.extend(r.value for r in records)
        # Whatever else is already there (duplicates), without waiting for more.
        for records in (await consumer.getmany(timeout_ms=300)).values():
            out.extend(r.value for r in records)
    finally:
        await consumer.stop()
    return out


def chunks(values: Sequence[bytes], size: int) -> Iterator[Sequence[bytes]]:
    for i in range(0, len(values), size):
        yield values[i : i + size]


def today() -> date:
    return TODAY
