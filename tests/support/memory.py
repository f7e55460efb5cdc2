"""Redis servers of one test with a small ``maxmemory`` or an eviction policy, and filling one
up to a chosen distance from its limit (``maxmemory-policy noeviction`` then refuses writes)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from redis import exceptions as rexc

from tests.support.servers import RedisServer

FILLER_PREFIX = "filler"


@contextmanager
def redis_server(*args: str, port: int | None = None) -> Iterator[RedisServer]:
    """A redis-server of this test only, started with ``args`` (``--maxmemory 4mb`` ...)."""
    server = RedisServer(extra_args=list(args))
    if port is not None:
        server.port = port
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.directory, ignore_errors=True)


async def memory(client: Any) -> tuple[int, int]:
    info = await client.info("memory")
    return int(info["used_memory"]), int(info["maxmemory"])


async def fill(client: Any, leave: int, prefix: str = FILLER_PREFIX) -> int:
    """Write filler keys until ``used_memory`` is within ``leave`` bytes of ``maxmemory`` (or
    Redis refuses the next one); returns how many were written."""
    used, limit = await memory(client)
    assert limit > 0, "fill needs a maxmemory"
    n = 0
    while limit - used > leave:
        size = max(64, min(10_000, (limit - used - leave) // 2))
        try:
            await client.set(f"{prefix}:{n}", b"x" * size)
        except rexc.OutOfMemoryError:
            break
        n += 1
        used, _ = await memory(client)
    return n


async def unfill(client: Any, prefix: str = FILLER_PREFIX) -> int:
    """Delete the filler keys: memory freed the way an operator would free it."""
    keys = [k async for k in client.scan_iter(match=f"{prefix}:*", count=1000)]
    return int(await client.delete(*keys)) if keys else 0
