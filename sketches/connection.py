"""Building Redis clients from settings. Nothing here runs at import time: each process opens its
own Redis client when it starts and closes it when it stops, and tests inject theirs.

Packing: redis-py's synchronous client packs commands with hiredis's C packer when hiredis is
installed; its asyncio connection always uses the pure-Python packer, about 2.5 µs an argument.
A batch of 20,000 logins writes some 60,000 PFADD members, so packing alone was a sixth of the
consumer's time (bench profile). This connection packs the same bytes in C, about 10 times
faster; the rest of the connection (parsing, retries, health checks) is redis-py's own.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, cast

import hiredis
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import Connection
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from sketches.config import Settings
from sketches.store import RedisClient, RollingStrategy, SketchStore, make_store

log = logging.getLogger(__name__)


class HiredisPackConnection(Connection):
    def pack_command(self, *args: Any) -> list[bytes]:
        # As redis-py does: a command name given as "CONFIG GET" is sent as two arguments.
        first = args[0]
        if isinstance(first, str):
            args = (*first.encode().split(), *args[1:])
        elif b" " in first:
            args = (*first.split(), *args[1:])
        # hiredis's stub types the argument as a 1-tuple; it takes any length. It refuses
        # bytearray and memoryview, which redis-py accepts: those (rare here) are copied to
        # bytes and packed again, rather than checking every argument of every command.
        try:
            packed: bytes = hiredis.pack_command(cast(Any, args))
        except TypeError:
            packed = hiredis.pack_command(cast(Any, tuple(
                bytes(a) if isinstance(a, bytearray | memoryview) else a for a in args
            )))
        return [packed]


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
    every operation cluster-safe (see ``sketches.store``).
    """
    url = settings.redis_url.get_secret_value()
    retry = Retry(ExponentialBackoff(cap=1.0, base=0.05), retries=2)
    errors: list[type[Exception]] = [RedisConnectionError, RedisTimeoutError]
    if settings.redis_cluster:
        log.info("connecting to Redis Cluster via %s", settings.redis_url_redacted())
        return RedisCluster.from_url(
            url, socket_connect_timeout=2.0, socket_timeout=5.0, retry=retry,
            retry_on_error=errors, health_check_interval=30,
            max_connections=CLUSTER_MAX_CONNECTIONS_PER_NODE,
            # redis-py's asyncio cluster client builds its node connections itself and takes
            # no connection class, so it packs commands in Python (slower, same bytes).
        )
    return Redis.from_url(
        url, socket_connect_timeout=2.0, socket_timeout=5.0, retry=retry,
        connection_class=HiredisPackConnection,
        retry_on_error=errors, health_check_interval=30,
    )


@asynccontextmanager
async def open_store(
    settings: Settings, rolling: RollingStrategy = "client"
) -> AsyncIterator[SketchStore]:
    client = make_redis(settings)
    try:
        yield make_store(client, settings.keyspace, settings.retention_days, rolling)
    finally:
        await client.aclose()
