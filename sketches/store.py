"""The store interface: add subjects to period sketches, count periods and rolling windows.

Everything outside this module talks to ``SketchStore`` only, so the whole test suite runs against
both implementations and the API cannot tell them apart except by accuracy:

- ``HllStore`` keeps one Redis HyperLogLog per (workspace, period): 12 KB at most whatever the
  number of users, about 0.81 % standard error.
- ``ExactStore`` keeps one Redis set per (workspace, period): exact, memory grows with users. It is
  the oracle of the tests and fits small tenants.

Writes are idempotent (adding a subject twice changes nothing), which is what makes at-least-once
ingestion and replay safe. A batch is written as one non-transactional pipeline: the consumer
commits Kafka offsets only after that pipeline has been acknowledged.

Every key gets an absolute expiry, ``RETENTION_DAYS`` after the end of its period. Because the
deadline depends only on the key, re-adding to an old key never extends its life.
"""

from __future__ import annotations

import abc
from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from datetime import UTC, date, datetime, time, timedelta
from typing import Any, Literal, TypeAlias

from redis import exceptions as rexc
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from sketches.errors import CorruptSketch, StoreUnavailable
from sketches.keys import KeySpace, Workspace
from sketches.periods import ONE_DAY, Period, date_range, day_of

RedisClient: TypeAlias = "Redis | RedisCluster"
Batch: TypeAlias = Mapping[tuple[Workspace, Period], Collection[str]]
RollingStrategy = Literal["client", "server"]

# Replies that mean "this key holds something else", as opposed to "Redis is not there".
_CORRUPT_MARKERS = ("WRONGTYPE", "INVALIDOBJ")


def _is_corrupt(err: BaseException) -> bool:
    return isinstance(err, rexc.ResponseError) and str(err).startswith(_CORRUPT_MARKERS)


def unavailable(err: rexc.RedisError) -> StoreUnavailable:
    return StoreUnavailable(f"{type(err).__name__}: {err}")


async def run_pipeline(client: RedisClient, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
    """Send commands in one round trip; per-command errors come back in place, as values.

    A lost connection raises ``StoreUnavailable`` for the whole pipeline: none of it may be assumed
    written, so the caller must not commit offsets for it.
    """
    if not commands:
        return []
    pipe = client.pipeline(transaction=False)
    for cmd in commands:
        pipe.execute_command(*cmd)
    try:
        results: list[Any] = await pipe.execute(raise_on_error=False)
    except rexc.ResponseError as err:
        if _is_corrupt(err):
            raise CorruptSketch("?", str(err)) from err
        raise unavailable(err) from err
    except rexc.RedisError as err:
        raise unavailable(err) from err
    except OSError as err:
        raise StoreUnavailable(f"{type(err).__name__}: {err}") from err
    for res in results:
        if isinstance(res, rexc.RedisError) and not _is_corrupt(res):
            # READONLY, LOADING, OOM, MASTERDOWN, CLUSTERDOWN...: the store cannot take writes now.
            raise unavailable(res)
    return results


def expire_at(period: Period, retention_days: int) -> int:
    """Epoch seconds at which a period's key may go: retention after the period's last day."""
    deadline = datetime.combine(period.end + timedelta(days=retention_days + 1), time(), UTC)
    return int(deadline.timestamp())


class SketchStore(abc.ABC):
    """Sketches of distinct subjects per workspace and period."""

    def __init__(self, client: RedisClient, keys: KeySpace, retention_days: int) -> None:
        self.client = client
        self.keys = keys
        self.retention_days = retention_days

    @abc.abstractmethod
    def _add_command(self, key: str, members: Collection[str]) -> tuple[Any, ...]: ...

    @abc.abstractmethod
    def _count_command(self, key: str) -> tuple[Any, ...]: ...

    async def add(
        self, batch: Batch, after: Sequence[tuple[Any, ...]] = ()
    ) -> list[CorruptSketch]:
        """Add every subject of the batch to its sketch, then run ``after`` on the same
        connection (the consumer records its offsets there).

        Returns the keys that could not be written because they hold something else: the rest of
        the batch is kept, and the caller decides what to log.
        """
        commands: list[tuple[Any, ...]] = []
        keys: list[str] = []
        for (ws, period), members in batch.items():
            if not members:
                continue
            key = self.keys.sketch(ws, period)
            keys.append(key)
            commands.append(self._add_command(key, members))
            commands.append(("EXPIREAT", key, expire_at(period, self.retention_days)))
        results = await run_pipeline(self.client, [*commands, *after])
        failed: list[CorruptSketch] = []
        for i, key in enumerate(keys):
            res = results[2 * i]
            if isinstance(res, BaseException):
                failed.append(CorruptSketch(key, str(res)))
        return failed

    async def counts(self, ws: Workspace, periods: Sequence[Period]) -> list[int]:
        """Distinct subjects of each period on its own (0 where nobody logged in)."""
        keys = [self.keys.sketch(ws, p) for p in periods]
        results = await run_pipeline(self.client, [self._count_command(k) for k in keys])
        out: list[int] = []
        for key, res in zip(keys, results, strict=True):
            if isinstance(res, BaseException):
                raise CorruptSketch(key, str(res))
            out.append(int(res))
        return out

    @abc.abstractmethod
    async def rolling_counts(self, ws: Workspace, first: date, last: date, width: int) -> list[int]:
        """For each day ``d`` of ``first..last``: distinct subjects over ``d - width + 1 .. d``."""

    async def day_values(self, ws: Workspace, days: Sequence[date]) -> list[Any]:
        """The raw value of each day's key (``None`` where absent), read in one round trip."""
        keys = [self.keys.sketch(ws, day_of(d)) for d in days]
        commands = [(self._read_command, k) for k in keys]
        results = await run_pipeline(self.client, commands)
        for key, res in zip(keys, results, strict=True):
            if isinstance(res, BaseException):
                raise CorruptSketch(key, str(res))
        return results

    _read_command: str = "GET"

    async def applied_offsets(self, partitions: Sequence[tuple[str, int]]) -> list[int | None]:
        """The next offset the store has applied for each (topic, partition), None if unknown."""
        commands = [("GET", self.keys.offsets(t, p)) for t, p in partitions]
        results = await run_pipeline(self.client, commands)
        return [None if r is None or isinstance(r, BaseException) else int(r) for r in results]

    async def ping(self) -> None:
        try:
            await self.client.ping()
        except (rexc.RedisError, OSError) as err:
            raise StoreUnavailable(f"{type(err).__name__}: {err}") from err

    async def delete_workspace(self, ws: Workspace) -> int:
        """Remove every sketch of one workspace (its settings stay); returns keys deleted."""
        pattern = self.keys.workspace_prefix(ws).replace("[", "\\[").replace("]", "\\]")
        pattern = pattern.replace("*", "\\*").replace("?", "\\?") + "*"
        deleted = 0
        try:
            batch: list[bytes] = []
            async for key in self.client.scan_iter(match=pattern, count=1000):
                if key.endswith(b":settings"):
                    continue
                batch.append(key)
                if len(batch) >= 500:
                    deleted += int(await self.client.unlink(*batch))
                    batch = []
            if batch:
                deleted += int(await self.client.unlink(*batch))
        except (rexc.RedisError, OSError) as err:
            raise StoreUnavailable(f"{type(err).__name__}: {err}") from err
        return deleted


class HllStore(SketchStore):
    """HyperLogLog sketches (``PFADD``/``PFCOUNT``).

    Rolling windows are computed one of two ways. ``server``: one multi-key ``PFCOUNT`` per row,
    which makes Redis merge up to 30 sketches per row while every other client waits. ``client``
    (default): read each day's sketch once with one pipeline of ``GET``s, merge registers with
    numpy, and run Redis's own estimator, bit for bit (``sketches.hll``), so Redis only copies
    bytes.
    """

    _read_command = "GET"

    def __init__(
        self,
        client: RedisClient,
        keys: KeySpace,
        retention_days: int,
        rolling: RollingStrategy = "client",
    ) -> None:
        super().__init__(client, keys, retention_days)
        self.rolling = rolling

    def _add_command(self, key: str, members: Collection[str]) -> tuple[Any, ...]:
        return ("PFADD", key, *members)

    def _count_command(self, key: str) -> tuple[Any, ...]:
        return ("PFCOUNT", key)

    async def rolling_counts(self, ws: Workspace, first: date, last: date, width: int) -> list[int]:
        if last < first:
            return []
        if self.rolling == "server":
            return await self._rolling_server(ws, first, last, width)
        from sketches import hll

        days = date_range(first - (width - 1) * ONE_DAY, last)
        values = await self.day_values(ws, days)
        try:
            registers = hll.decode_many(values)
        except hll.HllFormatError as err:
            raise CorruptSketch(self.keys.sketch(ws, day_of(first)), str(err)) from err
        merged = hll.rolling_max(registers, width)[width - 1 :]
        return [int(x) for x in hll.estimate_many(merged)]

    async def _rolling_server(
        self, ws: Workspace, first: date, last: date, width: int
    ) -> list[int]:
        commands = []
        for d in date_range(first, last):
            window = [self.keys.sketch(ws, day_of(d - i * ONE_DAY)) for i in range(width)]
            commands.append(("PFCOUNT", *window))
        results = await run_pipeline(self.client, commands)
        for res in results:
            if isinstance(res, BaseException):
                raise CorruptSketch(self.keys.workspace_prefix(ws), str(res))
        return [int(r) for r in results]


class ExactStore(SketchStore):
    """Exact sets (``SADD``/``SCARD``); rolling windows read each day's members once and slide a
    multiset over them, so a 730-day query costs one pass over the members, not 730 unions."""

    _read_command = "SMEMBERS"

    def _add_command(self, key: str, members: Collection[str]) -> tuple[Any, ...]:
        return ("SADD", key, *members)

    def _count_command(self, key: str) -> tuple[Any, ...]:
        return ("SCARD", key)

    async def rolling_counts(self, ws: Workspace, first: date, last: date, width: int) -> list[int]:
        if last < first:
            return []
        lead = width - 1
        days = date_range(first - lead * ONE_DAY, last)
        members: list[set[bytes]] = [set(v or ()) for v in await self.day_values(ws, days)]
        window: Counter[bytes] = Counter()
        out: list[int] = []
        for i, today in enumerate(members):
            window.update(today)
            if i >= width:
                window.subtract(members[i - width])
                for m in members[i - width]:
                    if window[m] <= 0:
                        del window[m]
            if i >= lead:
                out.append(len(window))
        return out


def make_store(
    client: RedisClient,
    keys: KeySpace,
    retention_days: int,
    rolling: RollingStrategy = "client",
) -> SketchStore:
    if keys.mode == "hll":
        return HllStore(client, keys, retention_days, rolling)
    return ExactStore(client, keys, retention_days)
