"""The Kafka clients of every process, built from settings in one place: the group consumer, the
dead-letter producer, replay's consumer outside any group, and the demo's admin client and
producer. Each gets its connection's security from ``kafka_client_args``, so no client can be
left on plaintext while the others use TLS and SASL.

``check_kafka_access`` makes one connection the way those clients will, before any of them
starts, and turns a refusal (an untrusted certificate, refused credentials, a mechanism the
broker does not offer) into one ``KafkaAccessRefused`` that names the broker and the mechanism.
The clients themselves would log the cause and retry or raise something unrelated:
aiokafka's bootstrap reports only "Unable to bootstrap", and its SCRAM client raises
``KeyError: 'v'`` when the broker's last SCRAM message is an error.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.conn import collect_hosts, create_conn
from aiokafka.errors import (
    IllegalSaslStateError,
    KafkaConnectionError,
    KafkaError,
    SaslAuthenticationFailed,
    UnsupportedSaslMechanismError,
)
from aiokafka.helpers import create_ssl_context
from aiokafka.protocol.metadata import MetadataRequest

from consumer.dlq import MAX_DLQ_REQUEST_BYTES
from sketches.config import SASL_PROTOCOLS, TLS_PROTOCOLS, Settings, kafka_key_password
from sketches.errors import UsageMetricsError

FETCH_MAX_BYTES = 16 * 1024 * 1024
# The access check gives up on an unreachable broker sooner than the clients' own 40 s: it only
# looks for a refusal, and leaves an unreachable broker to the clients.
CHECK_TIMEOUT_MS = 10_000


class KafkaAccessRefused(UsageMetricsError):
    """A broker refused this service's TLS or SASL. Only a change of settings (or of the
    broker's) fixes it, so the command stops (exit 4) rather than retrying."""


def kafka_client_args(settings: Settings) -> dict[str, Any]:
    """The keyword arguments every aiokafka client takes for where and how to connect:
    bootstrap servers, security protocol, TLS context and SASL credentials. The password
    leaves its ``SecretStr`` only here, into the client."""
    protocol = settings.kafka_security_protocol
    args: dict[str, Any] = {
        "bootstrap_servers": settings.kafka_bootstrap_servers,
        "security_protocol": protocol,
    }
    if protocol in TLS_PROTOCOLS:
        args["ssl_context"] = create_ssl_context(
            cafile=settings.kafka_ssl_cafile,
            certfile=settings.kafka_ssl_certfile,
            keyfile=settings.kafka_ssl_keyfile,
            password=kafka_key_password(settings),
        )
    if protocol in SASL_PROTOCOLS:
        assert settings.kafka_sasl_password is not None  # Settings refuses SASL without it
        args["sasl_mechanism"] = settings.kafka_sasl_mechanism
        args["sasl_plain_username"] = settings.kafka_sasl_username
        args["sasl_plain_password"] = settings.kafka_sasl_password.get_secret_value()
    return args


def make_kafka_consumer(settings: Settings, group_id: str | None) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(
        **kafka_client_args(settings),
        group_id=group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        # Room for one oversized message per partition, so it can be dead-lettered.
        max_partition_fetch_bytes=max(1024 * 1024, 2 * settings.max_message_bytes) + 65536,
        # What one fetch may hold before it is inflated (consumer.fetching bounds the rest).
        fetch_max_bytes=FETCH_MAX_BYTES,
        session_timeout_ms=settings.consumer_session_timeout_ms,
        heartbeat_interval_ms=settings.consumer_heartbeat_interval_ms,
    )


def make_dlq_producer(settings: Settings) -> AIOKafkaProducer:
    return AIOKafkaProducer(
        **kafka_client_args(settings),
        acks="all",
        linger_ms=5,
        max_request_size=MAX_DLQ_REQUEST_BYTES,
        # A multi-megabyte bad value is usually text: compressed, it fits the topic's limit.
        compression_type="zstd",
    )


def make_producer(settings: Settings, **tuning: Any) -> AIOKafkaProducer:
    """A producer of the topic's own traffic (the demo's synthetic logins)."""
    return AIOKafkaProducer(**kafka_client_args(settings), **tuning)


def make_admin_client(settings: Settings) -> AIOKafkaAdminClient:
    return AIOKafkaAdminClient(**kafka_client_args(settings))


def _mechanism(settings: Settings) -> str:
    if settings.kafka_security_protocol in SASL_PROTOCOLS:
        return f"SASL {settings.kafka_sasl_mechanism} over {settings.kafka_security_protocol}"
    return settings.kafka_security_protocol


def _mismatch_hint(settings: Settings) -> str:
    """What a broker that drops or ignores a connection it accepted may want instead."""
    mechanism = (
        f"another SASL mechanism than {settings.kafka_sasl_mechanism} (KAFKA_SASL_MECHANISM)"
    )
    return {
        "PLAINTEXT": "TLS (KAFKA_SECURITY_PROTOCOL=SSL or SASL_SSL) or SASL "
                     "(KAFKA_SECURITY_PROTOCOL=SASL_PLAINTEXT)",
        "SSL": "a client certificate it trusts (KAFKA_SSL_CERTFILE, KAFKA_SSL_KEYFILE) or SASL "
               "(KAFKA_SECURITY_PROTOCOL=SASL_SSL), or this is not its TLS listener",
        "SASL_PLAINTEXT": f"TLS (KAFKA_SECURITY_PROTOCOL=SASL_SSL) or {mechanism}",
        "SASL_SSL": "a client certificate it trusts (KAFKA_SSL_CERTFILE, KAFKA_SSL_KEYFILE) or "
                    f"{mechanism}, or this is not its TLS listener",
    }[settings.kafka_security_protocol]


def _refusal(settings: Settings, broker: str, err: BaseException) -> KafkaAccessRefused:
    """What ``err``, raised while a broker that accepted the TCP connection was being
    connected to as the clients would, means for an operator."""
    where = f"cannot connect to Kafka broker {broker} with {_mechanism(settings)}"
    sasl = settings.kafka_security_protocol in SASL_PROTOCOLS
    if isinstance(err, ssl.SSLCertVerificationError):
        trusted = settings.kafka_ssl_cafile or "the system trust store"
        return KafkaAccessRefused(
            f"{where}: its TLS certificate is not trusted ({err.verify_message}); trusted CAs "
            f"come from {trusted} (KAFKA_SSL_CAFILE)"
        )
    if isinstance(err, ssl.SSLError):
        return KafkaAccessRefused(
            f"{where}: the TLS handshake failed ({err.reason or err}); the broker may want "
            f"{_mismatch_hint(settings)}"
        )
    if isinstance(err, UnsupportedSaslMechanismError):
        return KafkaAccessRefused(
            f"{where}: the broker does not offer SASL mechanism "
            f"{settings.kafka_sasl_mechanism} (KAFKA_SASL_MECHANISM)"
        )
    # SaslAuthenticationFailed is how Apache Kafka refuses; aiokafka's SCRAM client raises
    # KeyError or ValueError when a broker ends the exchange with an error message
    # (RFC 5802 "e=...") instead of its signature.
    if isinstance(err, SaslAuthenticationFailed | IllegalSaslStateError) or (
        sasl and isinstance(err, KeyError | ValueError)
    ):
        return KafkaAccessRefused(
            f"{where}: the broker refused the credentials of user "
            f"{settings.kafka_sasl_username!r} (KAFKA_SASL_USERNAME, KAFKA_SASL_PASSWORD)"
        )
    if isinstance(err, TimeoutError):
        return KafkaAccessRefused(
            f"{where}: the broker accepted the connection but did not answer within "
            f"{CHECK_TIMEOUT_MS // 1000} s; it may want {_mismatch_hint(settings)}"
        )
    if isinstance(err, KafkaConnectionError | ConnectionError):
        return KafkaAccessRefused(
            f"{where}: the broker closed the connection before answering; it may want "
            f"{_mismatch_hint(settings)}"
        )
    return KafkaAccessRefused(f"{where}: {type(err).__name__}: {err}")


async def _reachable(host: str, port: int) -> bool:
    try:
        async with asyncio.timeout(CHECK_TIMEOUT_MS / 1000):
            _, writer = await asyncio.open_connection(host, port)
    except (OSError, TimeoutError):
        return False
    writer.close()
    return True


async def check_kafka_access(settings: Settings) -> None:
    """Connect to a bootstrap broker as the clients will (TLS, SASL, then a metadata request)
    and raise ``KafkaAccessRefused`` when one that accepts TCP connections fails any of it.
    Returns when one answers the metadata request, or when none accepts a TCP connection at
    all: the clients then retry or report an unreachable cluster themselves."""
    args = kafka_client_args(settings)
    del args["bootstrap_servers"]
    for host, port, _family in collect_hosts(settings.kafka_bootstrap_servers, randomize=False):
        if not await _reachable(host, port):
            continue
        broker = f"{host}:{port}"
        try:
            conn = await create_conn(
                host, port, client_id="usage-metrics-check",
                request_timeout_ms=CHECK_TIMEOUT_MS, **args,
            )
        # KeyError and ValueError: aiokafka's SCRAM client, on a refusal (see _refusal).
        except (OSError, KafkaError, TimeoutError, KeyError, ValueError) as err:
            raise _refusal(settings, broker, err) from None
        try:
            await conn.send(MetadataRequest([]))
        except (KafkaError, TimeoutError) as err:
            raise _refusal(settings, broker, err) from None
        finally:
            conn.close()
        return
