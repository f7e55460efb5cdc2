"""Managed Kafka's security against real servers (issue 16): Tansu behind a TLS proxy, Tansu
with SASL authentication.

What runs against a real server here: TLS with the broker's CA, TLS with a client certificate
(encrypted key), SASL SCRAM-SHA-256 and SCRAM-SHA-512 refused (over SASL_PLAINTEXT and
SASL_SSL), a mechanism the broker does not offer, and a client without the security the
broker wants. The accepted SCRAM and PLAIN logins cannot run here (no user can be created on
Tansu 0.6.0's storage, see tests/support/kafka_security.py): tests/test_kafka_settings.py
checks the arguments each client gets for them.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from aiokafka.structs import TopicPartition

from consumer.kafka import (
    KafkaAccessRefused,
    check_kafka_access,
    make_kafka_consumer,
    make_producer,
)
from consumer.replay import ReplayStart, replay
from sketches.config import Settings
from sketches.keys import Scope
from sketches.periods import utc_today
from sketches.query import Window, usage
from sketches.store import SketchStore
from tests.conftest import unique
from tests.support.kafka import running, wait_applied
from tests.support.kafka_security import (
    CLIENT_CN,
    CLIENT_KEY_PASSWORD,
    Pki,
    PlainTansu,
    TlsProxy,
)
from tests.support.servers import free_port
from usage_metrics import demo

PASSWORD = "pw-Sup3r-s3cret-value"
TODAY = utc_today()


@dataclass
class TlsBroker:
    """Tansu behind ``tls`` (client certificates optional, verified when shown; advertised)
    and ``mtls`` (client certificate required; bootstrap only)."""

    tansu: PlainTansu
    tls: TlsProxy
    mtls: TlsProxy


@dataclass
class AuthBroker:
    """Tansu with ``--authentication`` (SASL_PLAINTEXT on its port), and ``tls`` before it."""

    tansu: PlainTansu
    tls: TlsProxy


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki.create(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_broker(pki: Pki) -> Iterator[TlsBroker]:
    tansu = PlainTansu()
    tls = TlsProxy(pki, tansu.port, client_certs="optional")
    tansu.advertised_port = tls.port
    tansu.start()
    tls.start()
    mtls = TlsProxy(pki, tansu.port, client_certs="required").start()
    try:
        yield TlsBroker(tansu, tls, mtls)
    finally:
        mtls.stop()
        tls.stop()
        tansu.stop()


@pytest.fixture(scope="module")
def auth_broker(pki: Pki) -> Iterator[AuthBroker]:
    tansu = PlainTansu(authentication=True).start()
    tls = TlsProxy(pki, tansu.port, client_certs="none").start()
    try:
        yield AuthBroker(tansu, tls)
    finally:
        tls.stop()
        tansu.stop()


def tls_security(pki: Pki, port: int, **over: Any) -> dict[str, Any]:
    return {"kafka_bootstrap_servers": f"127.0.0.1:{port}", "kafka_security_protocol": "SSL",
            "kafka_ssl_cafile": pki.ca, **over}


def scram_security(port: int, mechanism: str, protocol: str, pki: Pki) -> dict[str, Any]:
    out: dict[str, Any] = {
        "kafka_bootstrap_servers": f"127.0.0.1:{port}", "kafka_security_protocol": protocol,
        "kafka_sasl_mechanism": mechanism, "kafka_sasl_username": "svc-usage",
        "kafka_sasl_password": PASSWORD,
    }
    if protocol == "SASL_SSL":
        out["kafka_ssl_cafile"] = pki.ca
    return out


@pytest.fixture
def settings(redis_url: str, key_prefix: str, pki: Pki, tls_broker: TlsBroker) -> Settings:
    """Every Kafka client of the service through TLS, showing a client certificate whose key
    is encrypted."""
    return Settings(
        **tls_security(pki, tls_broker.tls.port, kafka_ssl_certfile=pki.client_cert,
                       kafka_ssl_keyfile=pki.client_key,
                       kafka_ssl_key_password=CLIENT_KEY_PASSWORD),
        redis_url=redis_url, redis_key_prefix=key_prefix, sketch_mode="exact",
        kafka_topic=unique("metrics"), kafka_dlq_topic=unique("dlq"),
        kafka_group_id=unique("group"), consumer_fetch_timeout_ms=100,
        consumer_session_timeout_ms=6000, consumer_heartbeat_interval_ms=500, _env_file=None,
    )


def login(ws: Scope, subject: str, day: int) -> bytes:
    moment = datetime.combine(TODAY - timedelta(days=day), datetime.min.time(), UTC)
    return orjson.dumps({"metric_type": "login", "subject": subject, "org_id": ws.org_id,
                         "workspace_id": ws.workspace_id, "timestamp": moment.isoformat()})


async def read_topic(settings: Settings, topic: str, expect: int) -> list[Any]:
    """A topic's records, read by the service's own consumer factory (so through TLS)."""
    consumer = make_kafka_consumer(settings, None)
    await consumer.start()
    out: list[Any] = []
    try:
        await consumer.topics()
        parts = consumer.partitions_for_topic(topic) or set()
        consumer.assign([TopicPartition(topic, p) for p in parts])
        for _ in range(100):
            for records in (await consumer.getmany(timeout_ms=200)).values():
                out.extend(records)
            if len(out) >= expect:
                break
    finally:
        await consumer.stop()
    return out


async def test_consume_dead_letter_and_replay_through_tls_with_a_client_certificate(
    settings: Settings, store: SketchStore, tls_broker: TlsBroker
) -> None:
    # The demo's admin client and producer, then the service's consumer, dead-letter producer
    # and replay consumer: every connection goes through the TLS proxy and shows the client
    # certificate (Tansu advertises the proxy's port, never its own).
    await demo._create_topics(settings)
    demo_logins = await demo._publish(settings, days=1)
    ws = Scope("tls-org", "tls-ws")
    mine = [login(ws, f"u{i}", i % 3) for i in range(60)]
    bad = [b"not json", b"[1,2]"]
    producer = make_producer(settings, linger_ms=5)
    await producer.start()
    try:
        sent = [await producer.send(settings.kafka_topic, value, partition=i % 4)
                for i, value in enumerate([*mine, *bad])]
        ends: dict[int, int] = {}
        for meta in await asyncio.gather(*sent):
            ends[meta.partition] = max(ends.get(meta.partition, 0), meta.offset + 1)
    finally:
        await producer.stop()
    assert sorted(ends) == [0, 1, 2, 3]

    async with running(settings, store):
        await wait_applied(store, settings.kafka_topic, ends)
    rows = await usage(store, ws, end=TODAY, period_length=3, window=Window.CALENDAR,
                       horizon=TODAY - timedelta(days=800))
    assert [r.dau for r in rows] == [None, 20, 20, 20]

    dead = await read_topic(settings, settings.kafka_dlq_topic, len(bad) + len(demo.BROKEN))
    assert sorted(r.value for r in dead) == sorted([*bad, *demo.BROKEN])
    assert all(dict(r.headers)["dlq.reason"] for r in dead)

    total = demo_logins + len(demo.BROKEN) + len(mine) + len(bad)
    stats = await replay(settings, store, ReplayStart("beginning"))
    assert stats.messages == total
    assert stats.bad == len(bad) + len(demo.BROKEN)

    proxy = tls_broker.tls
    assert proxy.handshakes >= 5  # admin, producers, group consumer, replay, reader
    assert proxy.peer_subjects == [f"commonName={CLIENT_CN}"] * proxy.handshakes


async def test_a_client_certificate_the_broker_requires_is_shown_or_refused_clearly(
    pki: Pki, tls_broker: TlsBroker
) -> None:
    port = tls_broker.mtls.port
    await check_kafka_access(Settings(**tls_security(
        pki, port, kafka_ssl_certfile=pki.client_cert, kafka_ssl_keyfile=pki.client_key,
        kafka_ssl_key_password=CLIENT_KEY_PASSWORD), _env_file=None))
    for over in ({}, {"kafka_ssl_certfile": pki.rogue_client_cert,
                      "kafka_ssl_keyfile": pki.rogue_client_key}):
        with pytest.raises(KafkaAccessRefused) as refused:
            await check_kafka_access(Settings(**tls_security(pki, port, **over), _env_file=None))
        text = str(refused.value)
        assert f"cannot connect to Kafka broker 127.0.0.1:{port} with SSL" in text
        assert "a client certificate it trusts (KAFKA_SSL_CERTFILE, KAFKA_SSL_KEYFILE)" in text


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-256", "SCRAM-SHA-512"])
@pytest.mark.parametrize("protocol", ["SASL_PLAINTEXT", "SASL_SSL"])
async def test_refused_scram_credentials_are_one_clear_error(
    pki: Pki, auth_broker: AuthBroker, mechanism: str, protocol: str
) -> None:
    # Tansu ends the SCRAM exchange with "e=unknown-user" (aiokafka: KeyError 'v'); Apache
    # Kafka answers SaslAuthenticate with SASL_AUTHENTICATION_FAILED. Both are this error.
    port = auth_broker.tls.port if protocol == "SASL_SSL" else auth_broker.tansu.port
    with pytest.raises(KafkaAccessRefused) as refused:
        await check_kafka_access(
            Settings(**scram_security(port, mechanism, protocol, pki), _env_file=None)
        )
    assert str(refused.value) == (
        f"cannot connect to Kafka broker 127.0.0.1:{port} with SASL {mechanism} over "
        f"{protocol}: the broker refused the credentials of user 'svc-usage' "
        "(KAFKA_SASL_USERNAME, KAFKA_SASL_PASSWORD)"
    )


async def test_a_broker_that_wants_other_security_is_named_with_what_it_may_want(
    pki: Pki, tls_broker: TlsBroker, auth_broker: AuthBroker
) -> None:
    async def refusal(**security: Any) -> str:
        with pytest.raises(KafkaAccessRefused) as refused:
            await check_kafka_access(Settings(**security, _env_file=None))
        return str(refused.value)

    # SASL where the broker has none: Kafka's UNSUPPORTED_SASL_MECHANISM.
    text = await refusal(**scram_security(tls_broker.tansu.port, "SCRAM-SHA-512",
                                          "SASL_PLAINTEXT", pki))
    assert text.endswith("the broker does not offer SASL mechanism SCRAM-SHA-512 "
                         "(KAFKA_SASL_MECHANISM)")
    # PLAIN where the broker offers only SCRAM (Tansu closes the connection).
    text = await refusal(**{**scram_security(auth_broker.tansu.port, "SCRAM-SHA-512",
                                             "SASL_PLAINTEXT", pki),
                            "kafka_sasl_mechanism": "PLAIN"})
    assert "another SASL mechanism than PLAIN (KAFKA_SASL_MECHANISM)" in text
    # No SASL where the broker wants it, no TLS where it wants it.
    text = await refusal(kafka_bootstrap_servers=f"127.0.0.1:{auth_broker.tansu.port}")
    assert "closed the connection before answering" in text
    assert "SASL (KAFKA_SECURITY_PROTOCOL=SASL_PLAINTEXT)" in text
    text = await refusal(kafka_bootstrap_servers=f"127.0.0.1:{tls_broker.tls.port}")
    assert "TLS (KAFKA_SECURITY_PROTOCOL=SSL or SASL_SSL)" in text
    # The system trust store does not know the test CA.
    text = await refusal(**{**tls_security(pki, tls_broker.tls.port), "kafka_ssl_cafile": None})
    assert "its TLS certificate is not trusted" in text
    assert "from the system trust store (KAFKA_SSL_CAFILE)" in text
    # Nothing listening is no refusal: the clients report an unreachable cluster themselves.
    await check_kafka_access(Settings(kafka_bootstrap_servers=f"127.0.0.1:{free_port()}",
                                      _env_file=None))


async def test_the_demo_does_not_retry_a_refusal(
    pki: Pki, tls_broker: TlsBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = 0
    real = demo.check_kafka_access

    async def counted(settings: Settings) -> None:
        nonlocal calls
        calls += 1
        await real(settings)

    monkeypatch.setattr(demo, "check_kafka_access", counted)
    untrusted = Settings(**tls_security(pki, tls_broker.tls.port, kafka_ssl_cafile=pki.rogue_ca),
                         _env_file=None)
    with pytest.raises(KafkaAccessRefused, match="its TLS certificate is not trusted"):
        await demo._create_topics(untrusted)
    assert calls == 1


def cli(command: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("KAFKA_", "REDIS_", "JWT_"))}
    return subprocess.run(
        [sys.executable, "-m", "usage_metrics.cli", *command], cwd=cwd, env={**base, **env},
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
    )


def env_of(security: dict[str, Any]) -> dict[str, str]:
    return {name.upper(): str(value) for name, value in security.items()}


COMMANDS = {
    "consume": ["consume"],
    "replay": ["replay", "--from-beginning"],
    "rebuild": ["rebuild", "--org", "acme", "--workspace", "ws-1"],
}


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.mark.parametrize("refusal", ["untrusted certificate", "refused credentials"])
@pytest.mark.parametrize("command", sorted(COMMANDS))
async def test_each_command_exits_4_with_one_line_naming_broker_and_mechanism(
    pki: Pki, tls_broker: TlsBroker, auth_broker: AuthBroker, redis_url: str,
    redis_client: aioredis.Redis, key_prefix: str, tmp_path: Path, command: str, refusal: str,
) -> None:
    if refusal == "untrusted certificate":
        port = tls_broker.tls.port
        security = tls_security(pki, port, kafka_ssl_cafile=pki.rogue_ca)
        expected = [f"cannot connect to Kafka broker 127.0.0.1:{port} with SSL: its TLS "
                    "certificate is not trusted", str(pki.rogue_ca)]
    else:
        port = auth_broker.tls.port
        security = scram_security(port, "SCRAM-SHA-512", "SASL_SSL", pki)
        expected = [f"cannot connect to Kafka broker 127.0.0.1:{port} with SASL SCRAM-SHA-512 "
                    "over SASL_SSL: the broker refused the credentials of user 'svc-usage'"]
    # A sketch of the workspace being rebuilt: a refused rebuild must not have deleted it.
    keys = Settings(redis_key_prefix=key_prefix, sketch_mode="exact", _env_file=None).keyspace
    kept = keys.workspace_prefix(Scope("acme", "ws-1")) + "set:d:2026-01-01"
    await redis_client.sadd(kept, "someone")
    env = {**env_of(security), "REDIS_URL": redis_url, "REDIS_KEY_PREFIX": key_prefix,
           "SKETCH_MODE": "exact", "KAFKA_TOPIC": unique("metrics")}
    done = await asyncio.to_thread(cli, COMMANDS[command], env, tmp_path)
    assert done.returncode == 4, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert " ERROR " in lines[0]
    for fragment in expected:
        assert fragment in lines[0]
    assert PASSWORD not in done.stderr + done.stdout
    assert await redis_client.exists(kept) == 1
    await redis_client.delete(kept)
