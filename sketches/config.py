"""One settings object for every process, read from the environment (or a ``.env`` file).

Names follow the contract (section 5). Secrets are ``SecretStr`` so that a settings object that
ends up in a log line or a traceback prints ``**********`` instead of the key.

It lives here, beneath the adapters, rather than in ``usage_metrics`` (the composition root that
builds and runs them): ``consumer/`` and ``api/`` read their settings without importing the
package that imports them. It holds values only; nothing here opens a client.
"""

from __future__ import annotations

import ssl
from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from sketches.keys import KeySpace
from sketches.redis_url import redact_url, url_problem

__all__ = ["MIN_JWT_SECRET_BYTES", "Settings", "SketchMode", "redact_url"]

SketchMode = Literal["hll", "exact"]
MIN_JWT_SECRET_BYTES = 32
KafkaSecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
KafkaSaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]
SASL_PROTOCOLS = frozenset({"SASL_PLAINTEXT", "SASL_SSL"})
TLS_PROTOCOLS = frozenset({"SSL", "SASL_SSL"})


class Settings(BaseSettings):
    # An invalid secret must not be echoed in the error that refuses it.
    model_config = SettingsConfigDict(
        env_file=".env", extra="ignore", frozen=True, hide_input_in_errors=True
    )

    kafka_bootstrap_servers: str = "localhost:9092"
    kafka_topic: str = "metrics"
    kafka_dlq_topic: str = "metrics.dlq"
    kafka_group_id: str = "usage-metrics"
    # How every Kafka client of every process connects (consumer.kafka.kafka_client_args):
    # managed Kafka wants TLS, usually with SASL (PLAIN or SCRAM) or client certificates.
    kafka_security_protocol: KafkaSecurityProtocol = "PLAINTEXT"
    kafka_sasl_mechanism: KafkaSaslMechanism | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    # PEM files. Without a CA file the system's trust store checks the broker's certificate.
    kafka_ssl_cafile: Path | None = None
    kafka_ssl_certfile: Path | None = None
    kafka_ssl_keyfile: Path | None = None
    kafka_ssl_key_password: SecretStr | None = None
    # How the topic's producers key records (consumer.rebuild): ``workspace`` means every record
    # is keyed by its workspace id (UTF-8) with Kafka's default partitioner (murmur2), so a
    # rebuild of workspaces reads only the partitions that can hold them; it checks every record
    # it reads and refuses to switch when that is not so. ``none``: nothing is assumed.
    kafka_record_key: Literal["none", "workspace"] = "none"

    # Before REDIS_URL, whose check depends on it (a cluster takes other URL parameters).
    redis_cluster: bool = False
    # Run even though Redis may evict keys (a maxmemory-policy other than noeviction): every
    # process refuses to start otherwise (sketches.eviction). Answers may then show deleted data.
    redis_allow_eviction: bool = False
    # redis://, rediss:// (TLS, with redis-py's ssl_* query parameters) or unix://; checked at
    # start-up (sketches.redis_url), so that a URL redis-py would misread never runs.
    redis_url: SecretStr = SecretStr("redis://localhost:6379/0")
    # Every Redis key starts with this; tests give each test its own so they share one server.
    redis_key_prefix: str = Field(default="um", min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")

    sketch_mode: SketchMode = "hll"
    login_metric_type: str = "login"
    retention_days: int = Field(default=800, ge=31)
    max_period_length: int = Field(default=730, ge=0)

    jwt_secret: SecretStr | None = None
    jwt_public_key: SecretStr | None = None
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    # Clock skew allowed on exp/nbf/iat, in seconds.
    jwt_leeway_seconds: int = Field(default=30, ge=0, le=600)
    # The longest lifetime a token may have (exp - iat, or exp - now without iat): a token that
    # leaks is refused after this long at most, whatever exp its issuer wrote (api.auth).
    jwt_max_lifetime_seconds: int = Field(default=86_400, ge=60)

    # Consumer tuning. A batch is one getmany() call: one Redis pipeline and one commit.
    consumer_max_batch: int = Field(default=100_000, ge=1)
    consumer_fetch_timeout_ms: int = Field(default=500, ge=1)
    # A batch gathers what arrives within this window after its first fetch (up to
    # CONSUMER_MAX_BATCH): larger batches share sketch keys between more logins.
    consumer_batch_window_ms: int = Field(default=250, ge=0)
    # A value larger than this is dead-lettered unread: a login event is a few hundred bytes.
    max_message_bytes: int = Field(default=65_536, ge=256)
    # Bytes the batches of one fetch may inflate to (consumer.fetching): a compressed batch can
    # hold thousands of times its size. A batch larger than this alone is skipped unread.
    consumer_max_fetch_inflated_bytes: int = Field(default=32 * 1024 * 1024, ge=1024 * 1024)
    # Redis write retries back off from 0.1 s up to this many seconds between attempts.
    redis_retry_max_backoff_s: float = Field(default=5.0, gt=0)
    # The consumer reports unhealthy and exits when it makes no progress while lag stays > 0
    # for this long (a consumer that is alive but never rejoins is worse than a restart).
    consumer_stall_timeout_s: float = Field(default=300.0, gt=0)
    consumer_health_port: int | None = None
    # Group liveness: a crashed member's partitions move after the session timeout.
    consumer_session_timeout_ms: int = Field(default=10_000, ge=1000)
    consumer_heartbeat_interval_ms: int = Field(default=3_000, ge=100)

    # Scope settings: the zone of workspaces that set none, and how often the consumer reads
    # the settings feed (at most once per batch; a change shows within this bound, and costs a
    # read of that scope only: consumer.settings_cache).
    default_timezone: str = "UTC"
    settings_cache_seconds: float = Field(default=30.0, ge=0)

    # API responses kept per process, reused only under the same data version (never stale).
    result_cache_entries: int = Field(default=4096, ge=0)

    # Rate limiting of the /api/ routes (api.ratelimit): a token bucket per caller (token sub +
    # org_id, else client IP), per API process. The bucket holds RATE_LIMIT_BURST requests and
    # refills at RATE_LIMIT_PER_MINUTE; 0 in either turns limiting off.
    rate_limit_per_minute: int = Field(default=600, ge=0)
    rate_limit_burst: int = Field(default=60, ge=0)
    # Requests are charged by estimated cost (api.ratelimit: a 730-day query costs 5.1 units of
    # a 30-day calendar query), and a process runs at most this many heavy recomputes at once
    # (sketches.admission); 0 turns the gate off.
    api_max_expensive_queries: int = Field(default=4, ge=0)
    # Of those, one org holds at most this many (unset: half of them, rounded up), so that a
    # flood from one org never makes another wait.
    api_max_expensive_per_org: int | None = Field(default=None, ge=1)
    # A heavy recompute waits this long for a slot before its 503 + Retry-After; at most
    # API_EXPENSIVE_QUEUE_PER_ORG of one org wait at once (the next: 503 at once).
    api_expensive_wait_s: float = Field(default=2.0, ge=0, le=60)
    api_expensive_queue_per_org: int = Field(default=16, ge=0)

    # Prometheus /metrics of the API on a listener of its own (api.observability), never on the
    # API's port; bound to API_METRICS_HOST. Unset: not served. 0: any free port (tests).
    api_metrics_port: int | None = Field(default=None, ge=0, le=65535)
    api_metrics_host: str = "127.0.0.1"

    # Swagger UI at /docs, served from the fastapi-offline package (api.docs), never a CDN.
    api_docs: bool = True

    log_level: str = "INFO"
    log_format: Literal["text", "json"] = "text"

    @field_validator("jwt_secret")
    @classmethod
    def _secret_long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        # HS256 keys must be at least as long as the hash (RFC 7518, 3.2): a short shared
        # secret is guessed offline from any one token.
        if value is not None and len(value.get_secret_value().encode()) < MIN_JWT_SECRET_BYTES:
            raise ValueError(
                f"JWT_SECRET must be at least {MIN_JWT_SECRET_BYTES} bytes "
                "(generate one with `openssl rand -hex 32`)"
            )
        return value

    @field_validator("kafka_ssl_cafile", "kafka_ssl_certfile", "kafka_ssl_keyfile")
    @classmethod
    def _readable_file(cls, value: Path | None) -> Path | None:
        # Found at start-up rather than at the first connection, which would only say that the
        # TLS handshake failed. A path is not a secret: naming it tells the operator what to fix.
        if value is None:
            return None
        if not value.is_file():
            raise ValueError(f"no such file: {value}")
        try:
            with value.open("rb"):
                pass
        except OSError as err:
            raise ValueError(f"cannot read {value}: {err.strerror}") from None
        return value

    @model_validator(mode="after")
    def _kafka_security_consistent(self) -> Settings:
        # A credential the chosen protocol would silently ignore is refused: with managed Kafka
        # it means the protocol is wrong (SSL where SASL_SSL was meant), and the broker would
        # only answer with a confusing disconnect.
        problems = kafka_security_problems(self)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @field_validator("redis_url")
    @classmethod
    def _redis_url_usable(cls, value: SecretStr, info: ValidationInfo) -> SecretStr:
        # The message quotes nothing of the URL but redis-py's parameter names.
        problem = url_problem(value.get_secret_value(), bool(info.data.get("redis_cluster")))
        if problem is not None:
            raise ValueError(problem)
        return value

    @cached_property
    def keyspace(self) -> KeySpace:
        return KeySpace(self.redis_key_prefix, self.sketch_mode)

    def redis_url_redacted(self) -> str:
        """The Redis URL without its credentials, for logs (``redact_url``)."""
        return redact_url(self.redis_url.get_secret_value())


def kafka_security_problems(settings: Settings) -> list[str]:
    """What is wrong with the Kafka security settings taken together, each naming the settings
    and never a secret's value; empty when they can be used as they are."""
    protocol = settings.kafka_security_protocol
    sasl = {
        "KAFKA_SASL_MECHANISM": settings.kafka_sasl_mechanism,
        "KAFKA_SASL_USERNAME": settings.kafka_sasl_username or None,
        "KAFKA_SASL_PASSWORD": (
            settings.kafka_sasl_password.get_secret_value() or None
            if settings.kafka_sasl_password is not None else None
        ),
    }
    tls = {
        "KAFKA_SSL_CAFILE": settings.kafka_ssl_cafile,
        "KAFKA_SSL_CERTFILE": settings.kafka_ssl_certfile,
        "KAFKA_SSL_KEYFILE": settings.kafka_ssl_keyfile,
        "KAFKA_SSL_KEY_PASSWORD": settings.kafka_ssl_key_password,
    }
    problems: list[str] = []
    if protocol in SASL_PROTOCOLS:
        missing = [name for name, value in sasl.items() if value is None]
        if missing:
            problems.append(f"KAFKA_SECURITY_PROTOCOL={protocol} needs {', '.join(missing)}")
    else:
        stray = [name for name, value in sasl.items() if value is not None]
        if stray:
            problems.append(
                f"{', '.join(stray)} set but KAFKA_SECURITY_PROTOCOL={protocol} does not use "
                f"SASL (use {'SASL_SSL' if protocol == 'SSL' else 'SASL_PLAINTEXT or SASL_SSL'})"
            )
    if protocol not in TLS_PROTOCOLS:
        stray = [name for name, value in tls.items() if value is not None]
        if stray:
            problems.append(
                f"{', '.join(stray)} set but KAFKA_SECURITY_PROTOCOL={protocol} does not use "
                f"TLS (use {'SASL_SSL' if protocol == 'SASL_PLAINTEXT' else 'SSL or SASL_SSL'})"
            )
        return problems
    if settings.kafka_ssl_keyfile is not None and settings.kafka_ssl_certfile is None:
        problems.append("KAFKA_SSL_KEYFILE needs KAFKA_SSL_CERTFILE (the client certificate)")
    elif settings.kafka_ssl_key_password is not None and settings.kafka_ssl_certfile is None:
        problems.append("KAFKA_SSL_KEY_PASSWORD needs KAFKA_SSL_CERTFILE (and its key)")
    else:
        problems.extend(_tls_material_problems(settings))
    return problems


def kafka_key_password(settings: Settings) -> str:
    """The client key's password for ``SSLContext.load_cert_chain``: never ``None``, because
    with ``None`` OpenSSL asks for an encrypted key's password on the terminal, and a service
    would hang at start-up instead of refusing to start."""
    secret = settings.kafka_ssl_key_password
    return secret.get_secret_value() if secret is not None else ""


def _tls_material_problems(settings: Settings) -> list[str]:
    """Loads the CA and the client certificate and key as the Kafka clients will, so that a
    file that is not PEM, a key of another certificate or a wrong key password stops the
    start-up with the setting's name instead of failing every TLS handshake."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    problems: list[str] = []
    cafile = settings.kafka_ssl_cafile
    if cafile is not None:
        try:
            context.load_verify_locations(cafile=cafile)
        except (ssl.SSLError, OSError, ValueError):
            problems.append(f"KAFKA_SSL_CAFILE holds no PEM CA certificate: {cafile}")
    certfile, keyfile = settings.kafka_ssl_certfile, settings.kafka_ssl_keyfile
    if certfile is not None:
        try:
            context.load_cert_chain(certfile, keyfile, password=kafka_key_password(settings))
        except (ssl.SSLError, OSError, ValueError):
            key = f"KAFKA_SSL_KEYFILE ({keyfile})" if keyfile else f"the key in {certfile}"
            problems.append(
                f"KAFKA_SSL_CERTFILE ({certfile}) and {key} do not load: each must be PEM, the "
                "key must belong to the certificate, and an encrypted key needs its "
                "KAFKA_SSL_KEY_PASSWORD"
            )
    return problems
