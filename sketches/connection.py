"""Building Redis clients from settings. Nothing here runs at import time: each process opens its
own Redis client when it starts and closes it when it stops, and tests inject theirs.

Schemes: ``REDIS_URL`` is read by redis-py's ``from_url`` exactly as redis-py reads it:
``redis://`` (TCP), ``rediss://`` (TLS, with the URL's ``ssl_*`` parameters) and ``unix://``
(a socket), each with a user and password in the user info (an ACL user) or in the query.
``sketches.redis_url`` refuses, at start-up, a URL redis-py would misread.

Packing: the connection classes here pack a command's arguments in C with hiredis. Measured
with ``python -m bench.packing`` (CPU time an argument of a 2,000-member EVALSHA, redis-py 8.2,
hiredis 3.5, a shared 2-core machine): 0.12-0.13 us, where redis-py's asyncio connection takes
0.71 us (hiredis after a Python encode of each argument) and its pure-Python packer, the only
one before redis-py 8, 0.93 us. A batch of 100,000 logins sends some 100,000 PFADD members, so
packing was once a sixth of the consumer's time (bench profile).

There is one class per connection class redis-py picks for a scheme (TCP, TLS, unix socket),
so the scheme's own class still does the connecting: a single TCP class passed for every
scheme once sent ``rediss://`` passwords in clear text. Only the packing changes, and only for
arguments whose bytes are known equal to redis-py's (tests/test_fastredis.py): exact ``str``
(under redis-py's default UTF-8 strict encoding), ``bytes``, ``int`` and ``float``. Anything
else (``bytearray``, ``memoryview``, a subclass such as an ``IntEnum``, whose ``repr`` redis-py
sends, ``bool`` or ``None``, which it refuses with ``DataError``) is packed, or refused, by
redis-py itself. Checking the types costs about 0.02 us an argument.
"""

from __future__ import annotations

import codecs
import logging
import ssl
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any, cast

import hiredis
from redis._parsers import Encoder
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import (
    AbstractConnection,
    Connection,
    SSLConnection,
    UnixDomainSocketConnection,
    parse_url,
)
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import AuthenticationError, RedisClusterException, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.typing import EncodableT

from sketches.config import Settings
from sketches.errors import StoreMisconfigured, StoreUnavailable
from sketches.redis_url import PERCENT_ENCODE, url_problem
from sketches.store import RedisClient, RollingStrategy, SketchStore, make_store

log = logging.getLogger(__name__)

# Argument types hiredis packs to exactly redis-py's bytes (tests/test_fastredis.py); the type
# itself, not subclasses: redis-py sends repr() of an int or float subclass (an IntEnum member
# goes as "<E.A: 1>"), which hiredis refuses or formats otherwise.
_C_TYPES = frozenset({bytes, str, int, float})


class HiredisPacking(AbstractConnection):
    """Packs commands with hiredis's C packer; everything else is the connection class it is
    mixed into (``HiredisPackSSLConnection`` is an ``SSLConnection``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # hiredis encodes text as UTF-8, strictly; another encoder (the URL's ?encoding=, an
        # encoder_class) is redis-py's to apply.
        encoder = self.encoder
        try:
            utf8 = codecs.lookup(encoder.encoding).name == "utf-8"
        except LookupError:
            utf8 = False
        self._pack_in_c = type(encoder) is Encoder and utf8 and encoder.encoding_errors == "strict"

    def pack_command(self, *args: EncodableT) -> list[bytes]:
        if (
            self._pack_in_c
            and args
            and set(map(type, args)) <= _C_TYPES  # one loop in C
        ):
            # As redis-py does: a command name given as "CONFIG GET" is two arguments (and a
            # number as a name raises redis-py's own TypeError, below).
            first = args[0]
            try:
                if isinstance(first, str):
                    args = (*first.encode().split(), *args[1:])
                elif b" " in cast(bytes, first):
                    args = (*cast(bytes, first).split(), *args[1:])
                # hiredis's stub types the argument as a 1-tuple; it takes any length.
                return [hiredis.pack_command(cast(Any, args))]
            except Exception:  # noqa: BLE001 - redis-py packs it, or raises its own error
                # hiredis 3.5 refuses nothing redis-py packs among these types, and raises
                # redis-py's errors (a lone surrogate); another version may not.
                pass
        return super().pack_command(*args)


class HiredisPackConnection(HiredisPacking, Connection):
    """``redis://``: TCP."""


class HiredisPackSSLConnection(HiredisPacking, SSLConnection):
    """``rediss://``: TLS with the URL's ``ssl_*`` parameters."""


class HiredisPackUnixConnection(HiredisPacking, UnixDomainSocketConnection):
    """``unix://``: a socket."""


# The connection class redis-py picks for a scheme, and its packing twin.
PACKING_TWINS: dict[type[AbstractConnection], type[AbstractConnection]] = {
    Connection: HiredisPackConnection,
    SSLConnection: HiredisPackSSLConnection,
    UnixDomainSocketConnection: HiredisPackUnixConnection,
}


def connection_class_for(url: str) -> type[AbstractConnection]:
    """The class redis-py's ``from_url`` would use for ``url``, or its packing twin. Asked of
    redis-py itself (``parse_url``), so that a scheme is never read differently here."""
    chosen = parse_url(url).get("connection_class", Connection)
    return PACKING_TWINS.get(chosen, chosen)


# Connections per cluster node and process. redis-py's cluster client does not wait for a free
# connection: past this many commands in flight to one node it fails with "Too many connections",
# which the API would turn into a 503 (the single-Redis pool is unbounded).
CLUSTER_MAX_CONNECTIONS_PER_NODE = 1024


def make_redis(settings: Settings) -> RedisClient:
    """A client that fails fast (so the API can answer 503 instead of hanging) and retries a
    dropped connection a few times before giving up on a command.

    With ``REDIS_CLUSTER=true``, ``REDIS_URL`` names any node of a Redis Cluster (its database
    must be 0): the client reads the slot map from it (``CLUSTER SLOTS``) on first use, routes
    every command to the master owning its slot, follows ``MOVED``/``ASK`` and re-reads the map
    when slots move or a node fails. Nothing else changes for the caller: ``SketchStore`` makes
    every operation cluster-safe (see ``sketches.store``). ``rediss://`` makes every node
    connection TLS, with the URL's ``ssl_*`` parameters.

    The URL's own query parameters win over the timeouts here (redis-py's ``from_url``). An
    unusable URL raises ``StoreMisconfigured``, whose message shows nothing of it: the settings
    refuse such a URL already, but a test or a tool may build settings without validation.
    """
    url = settings.redis_url.get_secret_value()
    problem = url_problem(url, settings.redis_cluster)
    if problem is not None:
        raise StoreMisconfigured(problem)
    retry = Retry(ExponentialBackoff(cap=1.0, base=0.05), retries=2)
    errors: list[type[Exception]] = [RedisConnectionError, RedisTimeoutError]
    common: dict[str, Any] = {
        "socket_connect_timeout": 2.0, "socket_timeout": 5.0, "retry": retry,
        "retry_on_error": errors, "health_check_interval": 30,
    }
    try:
        if settings.redis_cluster:
            log.info("connecting to Redis Cluster via %s", settings.redis_url_redacted())
            # redis-py's asyncio cluster client builds its node connections itself (TCP or,
            # for rediss://, TLS) and takes no connection class: it packs with redis-py's own
            # packer (the same bytes, about 0.7 us an argument: bench.packing).
            return RedisCluster.from_url(
                url, max_connections=CLUSTER_MAX_CONNECTIONS_PER_NODE, **common
            )
        log.info("connecting to Redis at %s", settings.redis_url_redacted())
        return Redis.from_url(url, connection_class=connection_class_for(url), **common)
    except (ValueError, TypeError, RedisClusterException) as err:
        # Never the message: redis-py's own quote parts of the URL.
        raise StoreMisconfigured(
            f"redis-py cannot build a client from REDIS_URL ({type(err).__name__}): "
            + PERCENT_ENCODE
        ) from None


def _causes(err: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


# OpenSSL's X509_V_ERR_HOSTNAME_MISMATCH and X509_V_ERR_IP_ADDRESS_MISMATCH.
_NAME_MISMATCH = frozenset({62, 64})
_REFUSED_CREDENTIALS = ("WRONGPASS", "NOAUTH", "NOPERM", "invalid username-password")


def misconfiguration(err: BaseException) -> str | None:
    """What in ``err`` (or the errors that caused it) no retry can mend, in a sentence for the
    operator: an untrusted certificate, a failed TLS handshake, refused credentials. ``None``
    for an outage (refused, timed out, loading), which the caller retries."""
    for cause in _causes(err):
        if isinstance(cause, ssl.SSLCertVerificationError):
            reason = cause.verify_message or cause.reason or "verification failed"
            if cause.verify_code in _NAME_MISMATCH:
                return (f"the server's TLS certificate does not name the host in REDIS_URL "
                        f"({reason}): connect by a name the certificate holds, or add "
                        "ssl_check_hostname=false to REDIS_URL")
            return (f"the server's TLS certificate is not trusted ({reason}): name the CA that "
                    "signed it in REDIS_URL, ?ssl_ca_certs=/path/to/ca.pem")
        if isinstance(cause, ssl.SSLError):
            return (f"the TLS handshake with Redis failed ({cause.reason or cause}): is the "
                    "server's port a TLS port (rediss://) or a plain one (redis://)? Does it "
                    "want a client certificate (ssl_certfile, ssl_keyfile)?")
        if isinstance(cause, AuthenticationError) or (
            isinstance(cause, ResponseError) and str(cause).startswith(_REFUSED_CREDENTIALS)
        ):
            return ("Redis refused REDIS_URL's user name or password (is the ACL user on, "
                    "and the password percent-encoded?)")
    return None


async def check_store(store: SketchStore, settings: Settings) -> None:
    """One ``PING`` at start-up. Raises ``StoreMisconfigured`` when Redis refuses this process's
    TLS settings or credentials, which retrying cannot mend (the command exits with a clear
    line); a Redis that does not answer yet is only logged, and the command carries on and
    retries as it always did."""
    try:
        await store.ping()
    except StoreUnavailable as err:
        problem = misconfiguration(err)
        where = settings.redis_url_redacted()
        if problem is not None:
            raise StoreMisconfigured(f"cannot use Redis at {where}: {problem}") from None
        log.warning("Redis at %s does not answer yet (%s); going on, retrying", where, err)


@asynccontextmanager
async def open_store(
    settings: Settings, rolling: RollingStrategy = "client"
) -> AsyncIterator[SketchStore]:
    client = make_redis(settings)
    try:
        yield make_store(client, settings.keyspace, settings.retention_days, rolling)
    finally:
        await client.aclose()
