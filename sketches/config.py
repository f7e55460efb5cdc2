"""One settings object for every process, read from the environment (or a ``.env`` file).

Names follow the contract (section 5). Secrets are ``SecretStr`` so that a settings object that
ends up in a log line or a traceback prints ``**********`` instead of the key.

It lives here, beneath the adapters, rather than in ``usage_metrics`` (the composition root that
builds and runs them): ``consumer/`` and ``api/`` read their settings without importing the
package that imports them. It holds values only; nothing here opens a client.
"""

from __future__ import annotations

from functools import cached_property
from typing import Literal
from urllib.parse import unquote_plus, urlsplit

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from sketches.keys import KeySpace

SketchMode = Literal["hll", "exact"]
MIN_JWT_SECRET_BYTES = 32


class Settings(BaseSettings):
    # An invalid secret must not be echoed in the error that refuses it.
    model_config = SettingsConfigDict(
        env_file=".env", extra="ignore", frozen=True, hide_input_in_errors=True
    )

    kafka_bootstrap_servers: str = "localhost:9092"
    kafka_topic: str = "metrics"
    kafka_dlq_topic: str = "metrics.dlq"
    kafka_group_id: str = "usage-metrics"

    redis_url: SecretStr = SecretStr("redis://localhost:6379/0")
    redis_cluster: bool = False
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

    # Scope settings: the zone of workspaces that set none, and how long the consumer may
    # use settings it has read before it reads them again (a change shows within this bound).
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

    @cached_property
    def keyspace(self) -> KeySpace:
        return KeySpace(self.redis_key_prefix, self.sketch_mode)

    def redis_url_redacted(self) -> str:
        """The Redis URL without its credentials, for logs (``redact_url``)."""
        return redact_url(self.redis_url.get_secret_value())


# Query parameters that redis-py reads credentials from (``redis://h/0?password=...``).
SECRET_QUERY_KEYS = frozenset({"password", "pass", "pwd", "secret", "token"})


def redact_url(url: str) -> str:
    """``url`` with every credential replaced by ``***``, whatever the form: a password in the
    user info (``redis://:pw@h``, ``redis://user:pw@h``), user info alone (``redis://pw@h``,
    which some clients read as a password), or a query parameter (``?password=pw``). The host is
    kept as written (an IPv6 address keeps its brackets); an unparsable URL is hidden whole."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "***"
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user, colon, _ = userinfo.partition(":")
        netloc = f"{user}:***@{host}" if colon else f"***@{host}"
    query = "&".join(
        f"{name}=***" if unquote_plus(name).strip().lower() in SECRET_QUERY_KEYS
        else f"{name}{sep}{value}"
        for name, sep, value in (pair.partition("=") for pair in parts.query.split("&") if pair)
    )
    # Rebuilt by hand: urlunsplit would drop the '//' of an empty netloc (unix:///path).
    out = f"{parts.scheme}://{netloc}{parts.path}" if parts.scheme else f"{netloc}{parts.path}"
    if query:
        out += f"?{query}"
    if parts.fragment:
        out += f"#{parts.fragment}"
    return out
