"""Managed Redis, on real servers: a redis-server with TLS only (client certificates required)
and an ACL user, and one on a unix socket only (tests/support/managed_redis.py). The store, the
API and a CLI command all go through ``sketches.connection``; an untrusted certificate, a host
name the certificate does not hold and refused credentials each give one clear error, with no
traceback and no password."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from redis.asyncio.connection import SSLConnection, UnixDomainSocketConnection

from api.app import create_app
from api.auth import issue_token
from sketches.config import Settings
from sketches.connection import (
    HiredisPackSSLConnection,
    HiredisPackUnixConnection,
    check_store,
    make_redis,
    open_store,
)
from sketches.errors import StoreMisconfigured
from sketches.keys import Scope
from sketches.periods import periods_holding, utc_today
from tests.conftest import create_topics, unique
from tests.support.kafka import produce
from tests.support.managed_redis import (
    APP_PASSWORD,
    KEY_PASSWORD,
    TlsFiles,
    TlsRedisServer,
    UnixRedisServer,
    make_tls_files,
)
from tests.support.servers import free_port
from tests.test_consumer import synth

SECRET = "managed-redis-test-secret-of-32-bytes!"
SECRETS = (APP_PASSWORD, quote(APP_PASSWORD, safe=""), KEY_PASSWORD, SECRET)
ORG, WS = "acme", "ws-1"


@pytest.fixture(scope="module")
def tls_files() -> Iterator[TlsFiles]:
    files = make_tls_files()
    yield files
    shutil.rmtree(files.directory, ignore_errors=True)


@pytest.fixture(scope="module")
def tls_server(tls_files: TlsFiles) -> Iterator[TlsRedisServer]:
    server = TlsRedisServer(tls=tls_files).start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.directory, ignore_errors=True)


@pytest.fixture(scope="module")
def unix_server() -> Iterator[UnixRedisServer]:
    server = UnixRedisServer().start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.directory, ignore_errors=True)


@pytest.fixture(params=["tls", "unix-userinfo", "unix-query"])
def managed_url(
    request: pytest.FixtureRequest, tls_server: TlsRedisServer, unix_server: UnixRedisServer
) -> str:
    if request.param == "tls":
        return tls_server.app_url()
    return unix_server.app_url("userinfo" if request.param == "unix-userinfo" else "query")


def settings_for(url: str, **more: str) -> Settings:
    values: dict[str, str] = {"redis_url": url, "redis_key_prefix": unique("mr"),
                              "sketch_mode": "exact", "jwt_secret": SECRET, **more}
    return Settings(**values, _env_file=None)  # type: ignore[arg-type]


def assert_no_secret(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text


# ------------------------------------------------------------------ the store


async def test_the_store_writes_and_reads_as_the_acl_user_over_each_scheme(
    managed_url: str,
) -> None:
    settings = settings_for(managed_url)
    scope, today = Scope(ORG, WS), utc_today()
    async with open_store(settings) as store:
        await check_store(store, settings)
        pool = store.client.connection_pool  # type: ignore[union-attr]
        if managed_url.startswith("rediss://"):
            assert pool.connection_class is HiredisPackSSLConnection
            assert issubclass(pool.connection_class, SSLConnection)
            assert pool.connection_kwargs["ssl_ca_certs"].endswith("ca.pem")
            assert pool.connection_kwargs["ssl_password"] == KEY_PASSWORD
        else:
            assert pool.connection_class is HiredisPackUnixConnection
            assert issubclass(pool.connection_class, UnixDomainSocketConnection)
        assert await store.client.acl_whoami() == "app"  # the ACL user, not the admin
        await store.add_by_day({(scope, today): ["u1", "u2", "é 3", "u1"]}, {scope: "monday"})
        day, week, month = periods_holding(today)
        assert await store.counts(scope, [day, week, month]) == [3, 3, 3]


async def test_no_clear_text_leaves_the_process_for_a_rediss_url() -> None:
    """What issue 16 saw: the client spoke plain TCP and sent ``HELLO 3 AUTH default <pw>``.
    A listener that records what arrives gets a TLS ClientHello and nothing readable."""
    received = bytearray()
    done = asyncio.Event()

    async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            received.extend(await asyncio.wait_for(reader.read(65536), 2.0))
        except TimeoutError:
            pass
        finally:
            writer.close()
            done.set()

    server = await asyncio.start_server(record, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    url = f"rediss://app:{quote(APP_PASSWORD, safe='')}@127.0.0.1:{port}/0"
    client = make_redis(Settings(redis_url=url, _env_file=None))
    try:
        assert issubclass(client.connection_pool.connection_class, SSLConnection)
        with pytest.raises(Exception):  # noqa: B017, PT011 - the handshake cannot complete
            await client.ping()
        await asyncio.wait_for(done.wait(), 5)
    finally:
        await client.aclose()
        server.close()
        await server.wait_closed()
    assert received[:1] == b"\x16"  # a TLS handshake record
    assert received[1:2] == b"\x03"
    for readable in (b"HELLO", b"AUTH", b"app", APP_PASSWORD.encode(), b"PING"):
        assert readable not in received


async def test_the_tls_only_server_refuses_plain_text(tls_server: TlsRedisServer) -> None:
    plain = f"redis://app:{quote(APP_PASSWORD, safe='')}@localhost:{tls_server.port}/0"
    settings = settings_for(plain)
    async with open_store(settings) as store:
        with pytest.raises(Exception):  # noqa: B017, PT011 - whatever redis-py makes of it
            await store.client.ping()


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ("other-ca", "the server's TLS certificate is not trusted (self-signed certificate in "
                     "certificate chain): name the CA that signed it"),
        ("system-ca", "the server's TLS certificate is not trusted"),
        ("host", "the server's TLS certificate does not name the host in REDIS_URL"),
        ("password", "Redis refused REDIS_URL's user name or password"),
        ("user", "Redis refused REDIS_URL's user name or password"),
    ],
)
async def test_what_no_retry_can_mend_is_one_clear_error(
    tls_server: TlsRedisServer, tls_files: TlsFiles, change: str, says: str
) -> None:
    url = wrong_url(tls_server, tls_files, change)
    settings = settings_for(url)
    async with open_store(settings) as store:
        with pytest.raises(StoreMisconfigured) as refused:
            await check_store(store, settings)
    assert says in str(refused.value)
    assert str(refused.value).startswith(f"cannot use Redis at {settings.redis_url_redacted()}")
    assert_no_secret(str(refused.value))


def wrong_url(server: TlsRedisServer, files: TlsFiles, change: str) -> str:
    if change == "other-ca":
        return server.app_url(ca=files.other_ca)
    if change == "system-ca":
        return server.app_url(ssl_ca_certs="")
    if change == "host":
        return server.app_url(host="127.0.0.2")
    if change == "password":
        return server.app_url(userinfo=f"app:{quote(APP_PASSWORD[::-1], safe='')}")
    assert change == "user"
    return server.app_url(userinfo=f"nobody:{quote(APP_PASSWORD, safe='')}")


async def test_a_host_name_mismatch_is_accepted_with_ssl_check_hostname_false(
    tls_server: TlsRedisServer,
) -> None:
    settings = settings_for(tls_server.app_url(host="127.0.0.2", ssl_check_hostname="false"))
    async with open_store(settings) as store:
        await check_store(store, settings)
        assert await store.client.acl_whoami() == "app"


async def test_a_redis_that_is_not_there_is_no_misconfiguration(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An outage is retried by the commands as before: the start-up check only logs it."""
    settings = settings_for(f"redis://127.0.0.1:{free_port()}/0")
    async with open_store(settings) as store:
        await check_store(store, settings)
    assert "does not answer yet" in caplog.text


# ------------------------------------------------------------------ the API


async def api_get(settings: Settings, path: str) -> httpx.Response:
    """The whole application, lifespan included: it builds its own store from the settings."""
    app = create_app(settings, store=None)
    token = issue_token(settings, role="admin", org_id=ORG, ttl_seconds=600, now=time.time())
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            return await client.get(path, headers={"Authorization": f"Bearer {token}"})


async def test_the_api_answers_over_each_scheme(managed_url: str) -> None:
    settings = settings_for(managed_url)
    scope = Scope(ORG, WS)
    async with open_store(settings) as store:
        await store.add_by_day({(scope, utc_today()): ["u1", "u2"]}, {scope: "monday"})
    response = await api_get(settings, f"/api/v2/org/{ORG}/workspace/{WS}/metrics/usage"
                                       "?period_length=0&metrics=dau")
    assert response.status_code == 200, response.text
    assert response.json()[-1]["dau"] == 2


async def test_the_api_answers_503_json_to_an_untrusted_certificate(
    tls_server: TlsRedisServer, tls_files: TlsFiles, caplog: pytest.LogCaptureFixture
) -> None:
    settings = settings_for(tls_server.app_url(ca=tls_files.other_ca))
    response = await api_get(settings, f"/api/v2/org/{ORG}/workspace/{WS}/metrics/usage")
    assert response.status_code == 503
    assert response.json() == {"detail": "store unavailable, try again shortly"}
    assert response.headers["Retry-After"] == "5"
    assert "CERTIFICATE_VERIFY_FAILED" in caplog.text
    assert "Traceback" not in caplog.text
    assert_no_secret(caplog.text + response.text)


# ------------------------------------------------------------------ the commands


def command_env(settings: Settings, **more: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JWT_", "REDIS_", "KAFKA_"))}
    env.update({
        "REDIS_URL": settings.redis_url.get_secret_value(),
        "REDIS_KEY_PREFIX": settings.redis_key_prefix,
        "SKETCH_MODE": settings.sketch_mode,
        "KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
        "KAFKA_TOPIC": settings.kafka_topic,
        "KAFKA_GROUP_ID": settings.kafka_group_id,
        **more,
    })
    return env


def usage_metrics(
    args: list[str], env: dict[str, str], cwd: Path
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "usage_metrics.cli", *args], env=env, cwd=cwd,
        capture_output=True, text=True, timeout=120, check=False,
    )


async def test_replay_runs_over_tls(
    tls_server: TlsRedisServer, kafka_bootstrap: str, tmp_path: Path
) -> None:
    settings = settings_for(tls_server.app_url(), kafka_bootstrap_servers=kafka_bootstrap,
                            kafka_topic=unique("metrics"))
    await create_topics(kafka_bootstrap, settings.kafka_topic)
    scope = Scope(ORG, WS)
    events = synth(60, scope, days=1, users=25, seed=16)
    await produce(kafka_bootstrap, settings.kafka_topic, [e.to_json() for e in events])

    done = usage_metrics(["replay", "--from-beginning"], command_env(settings), tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "replayed 60 messages: 60 logins" in done.stdout
    assert_no_secret(done.stdout + done.stderr)
    day = events[0].timestamp.date()
    async with open_store(settings) as store:
        got = await store.counts(scope, [periods_holding(day)[0]])
    assert got == [len({e.subject for e in events if e.timestamp.date() == day})]


@pytest.mark.parametrize(
    ("change", "says"),
    [("other-ca", "is not trusted"), ("host", "does not name the host"),
     ("password", "refused REDIS_URL's user name or password")],
)
def test_the_consumer_exits_4_with_one_clear_line(
    tls_server: TlsRedisServer, tls_files: TlsFiles, tmp_path: Path, change: str, says: str
) -> None:
    settings = settings_for(wrong_url(tls_server, tls_files, change))
    done = usage_metrics(["consume"], command_env(settings), tmp_path)
    assert done.returncode == 4, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1, done.stderr
    assert says in errors[0]
    assert f"cannot use Redis at {settings.redis_url_redacted()}" in errors[0]
    assert "Traceback" not in done.stderr
    assert_no_secret(done.stdout + done.stderr)


def test_every_command_refuses_a_url_with_a_raw_reserved_character(tmp_path: Path) -> None:
    raw = "redis://app:p4ss/w0rd@cache.internal:6379/0"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JWT_", "REDIS_", "KAFKA_"))}
    for command in (["consume"], ["api"], ["replay", "--from-beginning"]):
        done = usage_metrics(command, {**env, "REDIS_URL": raw, "JWT_SECRET": SECRET}, tmp_path)
        assert done.returncode == 2, (command, done.stderr[-2000:])
        assert "REDIS_URL: Value error, REDIS_URL has an '@' after its host" in done.stderr
        assert "percent-encode" in done.stderr
        for part in ("p4ss", "w0rd"):
            assert part not in done.stdout + done.stderr
