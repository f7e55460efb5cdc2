"""The store interface: add subjects to period sketches, count periods and rolling windows.

Everything outside this module talks to ``SketchStore`` only, so the whole test suite runs against
both implementations and the API cannot tell them apart except by accuracy:

- ``HllStore`` keeps one Redis HyperLogLog per (scope, period), a scope being a workspace or an
  org: 12 KB at most whatever the number of users, about 0.81 % standard error.
- ``ExactStore`` keeps one Redis set per (scope, period): exact, memory grows with users. It is
  the oracle of the tests and fits small tenants.

Writes are idempotent (adding a subject twice changes nothing), which is what makes at-least-once
ingestion and replay safe. A batch is written as one non-transactional pipeline of script calls,
each carrying many scopes (one slot's on a cluster; ``sketches.writes``): the consumer commits
Kafka offsets only after that pipeline has been acknowledged.

Every key gets an absolute expiry, two days after ``RETENTION_DAYS`` have passed its period (a UTC
midnight: ``sketches.writes.expire_at``), set by every write that finds it without one. Because
the deadline depends only on the key, re-adding to an old key never extends its life.

Redis Cluster (``REDIS_CLUSTER=true``)
--------------------------------------
The store takes a ``redis.asyncio.RedisCluster`` as well as a ``Redis``; only ``add`` (calls
grouped by slot), ``applied_offsets``, ``delete_workspace`` and ``ping`` behave differently, and
only on a cluster.

- **Slots.** Every key of one workspace carries the workspace's hash tag (``sketches.keys``), so
  every multi-key command (a rolling ``PFCOUNT`` over 30 days, the per-key ``EVAL`` loop of
  ``counts`` and ``day_values``, whose keys are all passed as ``KEYS``) and every per-workspace
  pipeline of a query lands in one slot on one node: no query can fail with ``CROSSSLOT``
  (``tests/cluster`` checks every query shape). A batch spans many workspaces, hence slots:
  redis-py's ``ClusterPipeline`` groups the commands by node and sends one pipeline per node, in
  order, on one connection per node, concurrently. With ``raise_on_error=False`` each command's
  error comes back in its place, as on one Redis; ``MOVED``/``ASK`` replies are followed, command
  by command, after the node pipelines have answered.
- **Durability.** On one Redis the batch's offset records follow its sketches on one connection,
  so an AOF that loses its tail loses the record with the writes it vouched for. A cluster has no
  such single log: each master has its own AOF (and its own replication stream to the replica that
  may replace it), a transaction cannot span slots, and the partition's record
  (``KeySpace.offsets``, tagged by the partition) sits on one master while the batch's sketches sit
  on all of them. So ``add`` writes a batch in two steps:

  1. the sketches, as one cluster pipeline; meanwhile ``CLUSTER SLOTS`` names the masters;
  2. once every master has acknowledged its share, each offset record of ``after``, both under its
     own key and under one key per master, whose hash tag is chosen to hash to that master's
     highest slot (``node_record_key``). Redis executes one node's commands one at a time and logs
     them in that order, so on every master the record follows every write of the batch it took,
     whichever connection or redirection carried them. A master that loses the tail of its AOF,
     or a replica promoted with replication lag, loses the record together with those writes.

  ``applied_offsets`` reads ``CLUSTER SLOTS`` afresh and answers, per partition, the *minimum*
  over the partition's own record and every master's: the consumer resumes where the least
  advanced master stands, and re-reads (idempotently) what any master lost. A master with no
  record at all (it lost everything, or it just joined) makes the answer ``None``, and the
  partition is read from the earliest retained offset. One pipeline for both steps would not do:
  redis-py re-sends redirected commands after the node pipelines, so a record could reach a node
  before a redirected write that ends up there.
- **Slots that move.** The masters are read per batch, alongside the writes, so the records follow
  resharding and failover at the next batch. Anchoring on a master's *highest* slot keeps the key
  stable under ``redis-cli --cluster reshard/rebalance``, which moves a node's lowest slots first;
  a failover keeps slots, hence keys (the replica has the records). A record key that moves with
  its slot still vouches for its new node: it was written after every earlier write of its batch.
  What no record can vouch for is a key that ``MIGRATE`` moves to a master that then loses the
  tail of its AOF: treat a master crash during a reshard like the loss of that master and replay
  (``usage-metrics replay --from-beginning``).
"""

from __future__ import annotations

import abc
import asyncio
import functools
import hashlib
import itertools
import secrets
import time as time_module
from collections import Counter, deque
from collections.abc import Callable, Collection, Mapping, Sequence
from datetime import UTC, date, datetime, timedelta
from typing import Any, Literal, TypeAlias

from redis import exceptions as rexc
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from sketches.errors import (
    CorruptSketch,
    RebuildInterrupted,
    RebuildRunning,
    StoreOutOfMemory,
    StoreUnavailable,
)
from sketches.keys import KeySpace, Scope, text_of
from sketches.periods import (
    ONE_DAY,
    Granularity,
    Period,
    WeekStart,
    date_range,
    day_of,
    periods_between,
)
from sketches.writes import (
    BEGIN_SCRIPT,
    CANCEL_SCRIPT,
    DEADLINE_SLACK_DAYS,
    MEMBERS_PER_CALL,
    META_SLACK_DAYS,
    SWITCH_SCRIPT,
    WRITE_SCRIPT,
    ScopeWrite,
    by_day,
    calls,
    failures,
    group_by_scope,
    head_length,
    new_token,
    refusals,
)

RedisClient: TypeAlias = "Redis | RedisCluster"
Batch: TypeAlias = Mapping[tuple[Scope, Period], Collection[str]]
RollingStrategy = Literal["client", "server"]

# ``command key`` for each key, errors kept in place (redis.pcall): one command per chunk.
_PER_KEY_SCRIPT = (
    "local out = {} for i, k in ipairs(KEYS) do out[i] = redis.pcall(ARGV[1], k) end return out"
)
INLINE_VALUES = 64  # day values the kernel merges on the event loop (a live day's 30-day window)
COUNT_CHUNK = 16  # a cached PFCOUNT is ~1 us, recounting a dense sketch ~0.3 ms: <= 5 ms a chunk
READ_CHUNK = 16  # 16 dense sketches are 197 KB: well under a millisecond to copy

WRITE_SHA = hashlib.sha1(WRITE_SCRIPT.encode()).hexdigest()

# Replies that mean "this key holds something else", as opposed to "Redis is not there".
_CORRUPT_MARKERS = ("WRONGTYPE", "INVALIDOBJ")


def _is_corrupt(err: BaseException) -> bool:
    return isinstance(err, rexc.ResponseError) and str(err).startswith(_CORRUPT_MARKERS)


class ScriptMissing(StoreUnavailable):
    """Redis does not know the write script (it restarted, or a master is new): load it."""


def unavailable(err: rexc.RedisError) -> StoreUnavailable:
    if isinstance(err, rexc.OutOfMemoryError):  # at maxmemory: the consumer says why it waits
        return StoreOutOfMemory(f"{type(err).__name__}: {err}")
    return StoreUnavailable(f"{type(err).__name__}: {err}")


def _cluster_unavailable(err: rexc.RedisClusterException) -> StoreUnavailable:
    """redis-py's cluster client raises ``RedisClusterException``, which is no ``RedisError``, when
    it cannot reach the cluster or finds slots uncovered: that is an unavailable store. A
    cross-slot request is a bug in this module, not an outage, and is raised as it is."""
    if "must map to the same key slot" in str(err):
        raise err
    return StoreUnavailable(f"{type(err).__name__}: {err}")


async def run_pipeline(client: RedisClient, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
    """Send commands in one round trip; per-command errors come back in place, as values.

    A lost connection raises ``StoreUnavailable`` for the whole pipeline: none of it may be assumed
    written, so the caller must not commit offsets for it. On a cluster the pipeline is one per
    node (sent concurrently); the results still come back in the order of ``commands``.
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
    except rexc.RedisClusterException as err:
        raise _cluster_unavailable(err) from err
    except OSError as err:
        raise StoreUnavailable(f"{type(err).__name__}: {err}") from err
    for res in results:
        if isinstance(res, rexc.NoScriptError):
            raise ScriptMissing(str(res))
        if isinstance(res, rexc.RedisError) and not _is_corrupt(res):
            # READONLY, LOADING, OOM, MASTERDOWN, CLUSTERDOWN...: the store cannot take writes now.
            raise unavailable(res)
    return results


# --------------------------------------------------------------------------------------------
# Redis Cluster: one offset record per master (see the module docstring)
# --------------------------------------------------------------------------------------------


@functools.cache
def _slot_tags() -> tuple[int, ...]:
    """For each slot, the first n whose ``@n`` hashes there (about 144,000 tries, 0.1 s, once)."""
    table: list[int | None] = [None] * 16384
    left = len(table)
    for n in itertools.count():
        slot = key_slot(b"@%d" % n)
        if table[slot] is None:
            table[slot] = n
            left -= 1
            if not left:
                break
    return tuple(int(x) for x in table if x is not None)


def slot_tag(slot: int) -> str:
    """A hash tag that lands in ``slot``: the first of ``@0``, ``@1``, ... whose CRC16 falls
    there. An encoded topic never holds ``@`` (``sketches.keys.encode_id`` escapes it), so these
    tags can never meet a partition's own tag."""
    if not 0 <= slot < 16384:
        raise ValueError(f"no such slot: {slot}")
    return f"@{_slot_tags()[slot]}"


def node_record_key(record_key: str, tag: str) -> str:
    """``um:offsets:hll:{metrics:0}`` held on the master owning ``tag``'s slot:
    ``um:offsets:hll:{@123}:{metrics:0}`` (the first braces are the hash tag)."""
    cut = record_key.index("{")
    return f"{record_key[:cut]}{{{tag}}}:{record_key[cut:]}"


async def master_tags(client: RedisCluster) -> list[str]:
    """One hash tag per master of the cluster, from a fresh ``CLUSTER SLOTS``: the tag of the
    highest slot it serves."""
    try:
        ranges: Any = await client.cluster_slots()
    except (rexc.RedisError, OSError) as err:
        raise StoreUnavailable(f"{type(err).__name__}: {err}") from err
    except rexc.RedisClusterException as err:
        raise _cluster_unavailable(err) from err
    if not isinstance(ranges, Mapping):
        raise StoreUnavailable(f"unexpected CLUSTER SLOTS reply: {ranges!r}")
    highest: dict[tuple[str, int], int] = {}
    for (_, end), node in ranges.items():
        primary = (str(node["primary"][0]), int(node["primary"][1]))
        highest[primary] = max(highest.get(primary, -1), int(end))
    if not highest:
        raise StoreUnavailable("CLUSTER SLOTS names no master")
    return sorted(slot_tag(slot) for slot in highest.values())


class SketchStore(abc.ABC):
    """Sketches of distinct subjects per workspace and period."""

    def __init__(self, client: RedisClient, keys: KeySpace, retention_days: int) -> None:
        self.client = client
        self.keys = keys
        self.retention_days = retention_days
        self.cluster = isinstance(client, RedisCluster)
        # Scopes share a write call only within a slot on a cluster (CROSSSLOT otherwise).
        self.group_by_slot = self.cluster
        # Every offset record key starts with this (the part before its hash tag).
        sample = keys.offsets("t", 0)
        self._record_head = sample[: sample.index("{")]

    _add_verb: str = "PFADD"
    members_per_call: int = MEMBERS_PER_CALL
    """Members per write script call (``sketches.writes``); tests lower it to split batches."""
    clock: Callable[[], float] = staticmethod(time_module.time)
    """What a write takes as now (which keys are past their deadline): tests move it."""

    @abc.abstractmethod
    def _count_command(self, key: str) -> tuple[Any, ...]: ...

    async def add(
        self, batch: Batch, after: Sequence[tuple[Any, ...]] = (), *,
        building: Mapping[Scope, int] | None = None,
    ) -> list[CorruptSketch]:
        """Add every subject of the batch to its sketch, then run ``after`` on the same
        connection (the consumer records its offsets there).

        The batch goes out as script calls of many scopes each (``sketches.writes``), which also
        give each key its expiry when it has none, bump each scope's counter and stamp the days
        it touched. With ``building`` (a rebuild), each scope's subjects go only to the
        generation its rebuild fills. Returns the keys that could not be written because they
        hold something else: the rest of the batch is kept, and the caller decides what to log.
        Raises ``RebuildInterrupted`` when a rebuild's generation is no longer the one being
        filled (cancelled, or taken over by another rebuild).
        """
        return await self._add_grouped(group_by_scope(batch), after, self.clock(), building)

    async def add_by_day(
        self,
        days: Mapping[tuple[Scope, date], Collection[str]],
        week_starts: Mapping[Scope, WeekStart],
        after: Sequence[tuple[Any, ...]] = (),
        *,
        building: Mapping[Scope, int] | None = None,
    ) -> list[CorruptSketch]:
        """``add`` of members per (scope, local day), each also counted in its week (by the
        scope's week start) and month: the consumer's batches, each member sent once
        (``sketches.writes.by_day``)."""
        return await self._add_grouped(by_day(days, week_starts), after, self.clock(), building)

    def _slot_of(self, scope: Scope) -> int:
        return _scope_slot(self.keys.hash_tag(scope))

    async def _add_grouped(
        self, grouped: Mapping[Scope, ScopeWrite], after: Sequence[tuple[Any, ...]],
        now: float, building: Mapping[Scope, int] | None = None,
    ) -> list[CorruptSketch]:
        batch_calls = calls(
            WRITE_SHA, self.keys, grouped, retention_days=self.retention_days, now=now,
            token=new_token(), command=self._add_verb, building=building,
            slot_of=self._slot_of if self.group_by_slot else None, limit=self.members_per_call,
        )
        commands = [c.command for c in batch_calls]
        try:
            results = await self._write(commands, after)
        except ScriptMissing:
            # A Redis that restarted (or a new cluster master) has no script cache: load it and
            # send the batch again; every write in it is idempotent.
            await self._load_write_script()
            results = await self._write(commands, after)
        failed: dict[str, CorruptSketch] = {}  # a key cut over several calls fails in each
        refused: list[str] = []
        for call, res in zip(batch_calls, results, strict=False):
            if isinstance(res, BaseException):
                key = self.keys.workspace_prefix(call.scopes[0])
                failed.setdefault(key, CorruptSketch(key, str(res)))
            else:
                for key, err in failures(res):
                    failed.setdefault(key, CorruptSketch(key, err))
                refused.extend(refusals(res))
        if refused:
            raise RebuildInterrupted(
                f"the rebuild of {len(set(refused))} scope(s) is no longer the one being filled "
                f"(cancelled, or taken over by another rebuild), e.g. {refused[0]}"
            )
        return list(failed.values())

    async def _write(
        self, commands: Sequence[tuple[Any, ...]], after: Sequence[tuple[Any, ...]]
    ) -> list[Any]:
        if self.cluster and after:
            return await self._add_on_cluster(commands, after)
        # ``after`` (the offset records) only once every call has succeeded. In one pipeline, a
        # call that Redis refuses (OOM: its own arguments push a nearly full Redis over
        # maxmemory; NOSCRIPT) is followed by a small SET that still fits, and the record vouches
        # for a batch the store does not hold: a consumer stopped before its retry resumes past
        # it. Sent after the replies, the records still follow the writes in Redis's log.
        results = await run_pipeline(self.client, commands)
        await run_pipeline(self.client, after)
        return results

    async def _load_write_script(self) -> None:
        try:
            if isinstance(self.client, RedisCluster):
                await self.client.execute_command(
                    "SCRIPT LOAD", WRITE_SCRIPT, target_nodes=RedisCluster.PRIMARIES
                )
            else:
                await self.client.script_load(WRITE_SCRIPT)
        except (rexc.RedisError, OSError) as err:
            raise StoreUnavailable(f"{type(err).__name__}: {err}") from err
        except rexc.RedisClusterException as err:
            raise _cluster_unavailable(err) from err

    def _is_record(self, cmd: tuple[Any, ...]) -> bool:
        return (
            len(cmd) == 3
            and str(cmd[0]).upper() == "SET"
            and isinstance(cmd[1], str)
            and cmd[1].startswith(self._record_head)
            and cmd[1][len(self._record_head) :].startswith("{")
        )

    async def _add_on_cluster(
        self, commands: Sequence[tuple[Any, ...]], after: Sequence[tuple[Any, ...]]
    ) -> list[Any]:
        """Sketches first; ``after`` only once every master has acknowledged them, each offset
        record written on every master too (see the module docstring)."""
        assert isinstance(self.client, RedisCluster)
        outcome = await asyncio.gather(
            run_pipeline(self.client, commands), master_tags(self.client), return_exceptions=True
        )
        for res in outcome:
            if isinstance(res, BaseException):
                raise res
        results, tags = outcome
        assert isinstance(results, list)
        assert isinstance(tags, list)
        seal: list[tuple[Any, ...]] = []
        for cmd in after:
            seal.append(cmd)
            if self._is_record(cmd):
                _, key, value = cmd
                seal.extend(("SET", node_record_key(key, tag), value) for tag in tags)
        await run_pipeline(self.client, seal)
        return results

    async def counts(self, ws: Scope, periods: Sequence[Period]) -> list[int]:
        """Distinct subjects of each period on its own (0 where nobody logged in)."""
        keys = [self.keys.sketch(ws, p) for p in periods]
        results = await self._per_key(self._count_command("")[0], keys, COUNT_CHUNK)
        return [int(r) for r in results]

    async def _per_key(self, command: str, keys: Sequence[str], chunk: int) -> list[Any]:
        """``command key`` for every key, in one round trip, raising ``CorruptSketch`` for a key
        that holds something else.

        A 730-day calendar query counts about 1,000 keys. Sent as 1,000 pipelined commands,
        redis-py's per-reply bookkeeping cost more than Redis's work; a short Lua loop per chunk
        runs them inside Redis as one command each (all keys of a workspace share one hash tag,
        so this holds on a cluster too) and returns one array. Chunks bound how long one script
        keeps Redis busy."""
        commands = [
            ("EVAL", _PER_KEY_SCRIPT, len(part), *part, command)
            for part in (keys[i : i + chunk] for i in range(0, len(keys), chunk))
        ]
        out: list[Any] = []
        for part_keys, res in zip(
            (keys[i : i + chunk] for i in range(0, len(keys), chunk)),
            await run_pipeline(self.client, commands),
            strict=True,
        ):
            if isinstance(res, BaseException):
                raise CorruptSketch(part_keys[0], str(res))
            for key, value in zip(part_keys, res, strict=True):
                if isinstance(value, rexc.RedisError):
                    if not _is_corrupt(value):
                        raise unavailable(value)
                    raise CorruptSketch(key, str(value))
                out.append(value)
        return out

    async def rolling_counts(self, ws: Scope, first: date, last: date, width: int) -> list[int]:
        """For each day ``d`` of ``first..last``: distinct subjects over ``d - width + 1 .. d``."""
        return (await self.rolling_counts_many(ws, first, last, [width]))[width]

    async def rolling_counts_many(
        self, ws: Scope, first: date, last: date, widths: Sequence[int]
    ) -> dict[int, list[int]]:
        """``rolling_counts`` for several widths, reading each day's sketch once."""
        return (await self.rolling_and_daily(ws, first, last, widths))[1]

    @abc.abstractmethod
    async def rolling_and_daily(
        self, ws: Scope, first: date, last: date, widths: Sequence[int]
    ) -> tuple[list[int], dict[int, list[int]]]:
        """For each day of ``first..last``: its own distinct subjects, and those of the
        ``width`` days ending there for each width; each day's sketch read once for both."""

    async def day_values(self, ws: Scope, days: Sequence[date]) -> list[Any]:
        """The raw value of each day's key (``None`` where absent), read in one round trip."""
        keys = [self.keys.sketch(ws, day_of(d)) for d in days]
        values = await self._per_key(self._read_command, keys, READ_CHUNK)
        return [v or None for v in values]

    _read_command: str = "GET"

    async def applied_offsets(self, partitions: Sequence[tuple[str, int]]) -> list[int | None]:
        """The next offset the store has applied for each (topic, partition), None if unknown.

        On a cluster: the minimum over the partition's record and every current master's, None
        if any of them is missing (see the module docstring)."""
        if not partitions:
            return []
        tags: list[str] = []
        if isinstance(self.client, RedisCluster):
            tags = await master_tags(self.client)
        per_partition = 1 + len(tags)
        commands = []
        for t, p in partitions:
            key = self.keys.offsets(t, p)
            commands.append(("GET", key))
            commands.extend(("GET", node_record_key(key, tag)) for tag in tags)
        results = await run_pipeline(self.client, commands)
        out: list[int | None] = []
        for i in range(0, len(results), per_partition):
            values = results[i : i + per_partition]
            if any(r is None or isinstance(r, BaseException) for r in values):
                out.append(None)
            else:
                out.append(min(int(r) for r in values))
        return out

    async def ping(self) -> None:
        """Raises ``StoreUnavailable`` unless Redis answers; on a cluster, every master must
        answer and the cluster must say ``cluster_state:ok`` (else it refuses keyed commands)."""
        try:
            if isinstance(self.client, RedisCluster):
                await self.client.ping(target_nodes=RedisCluster.PRIMARIES)
                info = await self.client.cluster_info()
                state = info.get("cluster_state") if isinstance(info, Mapping) else None
                if state not in ("ok", b"ok"):
                    raise StoreUnavailable(f"cluster_state is {state!r}")
            else:
                await self.client.ping()
        except (rexc.RedisError, OSError) as err:
            raise StoreUnavailable(f"{type(err).__name__}: {err}") from err
        except rexc.RedisClusterException as err:
            raise _cluster_unavailable(err) from err

    async def _keys_with_prefix(self, ws: Scope, prefix: str) -> list[bytes]:
        """Every key of the scope that starts with ``prefix``.

        On one Redis: a SCAN for the prefix. On a cluster all of the scope sits in one slot (its
        hash tag), so only that slot is listed, on the master that owns it
        (``CLUSTER GETKEYSINSLOT``), instead of scanning every key of every node."""
        head = prefix.encode()
        try:
            if isinstance(self.client, RedisCluster):
                slot = key_slot(head)
                total = int(await self.client.cluster_countkeysinslot(slot))
                names: list[Any] = (
                    await self.client.cluster_get_keys_in_slot(slot, total) if total else []
                )
                found = [k if isinstance(k, bytes) else str(k).encode() for k in names]
                return [k for k in found if k.startswith(head)]
            pattern = prefix.replace("\\", "\\\\").replace("[", "\\[").replace("]", "\\]")
            pattern = pattern.replace("*", "\\*").replace("?", "\\?") + "*"
            return [k async for k in self.client.scan_iter(match=pattern, count=1000)]
        except (rexc.RedisError, OSError) as err:
            raise StoreUnavailable(f"{type(err).__name__}: {err}") from err
        except rexc.RedisClusterException as err:
            raise _cluster_unavailable(err) from err

    async def delete_workspace(self, ws: Scope) -> int:
        """Forget one scope: its sketches of every generation, its ``meta`` and stored results
        (its settings stay); returns keys deleted. Readers then find no counter and compute from
        the (absent) sketches; a later write starts a new epoch. Not the rebuild's path, which
        never lets a reader see a half-deleted scope (``begin_rebuild``)."""
        mine = [k for k in await self._keys_with_prefix(ws, self.keys.workspace_prefix(ws))
                if not k.endswith(b":settings")]
        deleted = 0
        try:
            for i in range(0, len(mine), 500):
                deleted += int(await self.client.execute_command("UNLINK", *mine[i : i + 500]))
        except (rexc.RedisError, OSError) as err:
            raise StoreUnavailable(f"{type(err).__name__}: {err}") from err
        return deleted

    async def _script(self, script: str, keys: Sequence[Any], *args: Any) -> Any:
        try:
            return await self.client.eval(script, len(keys), *keys, *args)
        except rexc.RedisError as err:
            raise unavailable(err) from err
        except OSError as err:
            raise StoreUnavailable(f"{type(err).__name__}: {err}") from err
        except rexc.RedisClusterException as err:
            raise _cluster_unavailable(err) from err

    async def begin_rebuild(
        self, scopes: Sequence[Scope], *, take_over: bool = False
    ) -> dict[Scope, int]:
        """Mark, per scope, a new generation for a rebuild to fill (``sketches.writes``):
        answers keep coming from the live sketches, and from now on the consumer writes each
        login to both. Raises ``RebuildRunning`` (nothing marked) when a scope's rebuild is
        already under way, unless ``take_over``: that rebuild's writes are then refused."""
        meta_ttl = (self.retention_days + META_SLACK_DAYS) * 86400
        started: dict[Scope, int] = {}
        for scope in scopes:
            generation = secrets.randbits(48) + 1
            running = await self._script(
                BEGIN_SCRIPT, [self.keys.meta(scope)], generation, meta_ttl,
                "1" if take_over else "0",
            )
            if running is not None:
                await self.cancel_rebuild(started)
                raise RebuildRunning(
                    f"a rebuild of {scope.name} is already under way (generation "
                    f"{text_of(running)}), or one stopped before it finished: rebuild again with "
                    "--take-over to replace it"
                )
            started[scope] = generation
        return started

    async def finish_rebuild(self, building: Mapping[Scope, int]) -> int:
        """Switch each scope to its rebuilt generation in one atomic step (``SWITCH_SCRIPT``);
        returns the sketches moved. Raises ``RebuildInterrupted`` for a scope whose generation
        is no longer the one being filled: that scope keeps its live sketches."""
        moved = 0
        live_names = self._live_candidates(self.clock())
        for scope, generation in building.items():
            live = [self.keys.sketch(scope, p) for p in live_names]
            result = await self._script(
                SWITCH_SCRIPT,
                [self.keys.meta(scope), self.keys.registry(scope, generation), *live],
                generation, new_token(), head_length(self.keys, scope),
            )
            if int(result) < 0:
                raise RebuildInterrupted(
                    f"the rebuild of {scope.name} was cancelled or taken over by "
                    "another: its live sketches are unchanged"
                )
            moved += int(result)
        return moved

    def _live_candidates(self, now: float) -> list[Period]:
        """Every period a live sketch can exist for: any day, week (either start) and month
        from the retention horizon, less the deadline slack and a day for the zones, to two
        days ahead. An older key has passed its deadline (``sketches.writes.expire_at``), so
        the switch names these instead of scanning the keyspace, which cost ~2 s a scope on a
        store of 2,000,000 keys."""
        today = datetime.fromtimestamp(now, UTC).date()
        first = today - timedelta(days=self.retention_days + DEADLINE_SLACK_DAYS + 2)
        last = today + timedelta(days=2)
        return [p for g in Granularity for p in periods_between(g, first, last)]

    async def cancel_rebuild(self, building: Mapping[Scope, int]) -> None:
        """Stop filling each scope's generation and delete what it holds; the live sketches
        never changed."""
        for scope, generation in building.items():
            registry = self.keys.registry(scope, generation)
            names = await self._script(CANCEL_SCRIPT, [self.keys.meta(scope), registry],
                                       generation)
            stale = [*(names or ()), registry]
            try:
                for i in range(0, len(stale), 500):
                    await self.client.execute_command("UNLINK", *stale[i : i + 500])
            except (rexc.RedisError, OSError) as err:
                raise StoreUnavailable(f"{type(err).__name__}: {err}") from err


@functools.lru_cache(maxsize=1 << 18)
def _scope_slot(tag: str) -> int:
    return int(key_slot(tag.encode()))


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

    def _count_command(self, key: str) -> tuple[Any, ...]:
        return ("PFCOUNT", key)

    async def rolling_and_daily(
        self, ws: Scope, first: date, last: date, widths: Sequence[int]
    ) -> tuple[list[int], dict[int, list[int]]]:
        if last < first:
            return [], {w: [] for w in widths}
        if self.rolling == "server":
            rolling = {w: await self._rolling_server(ws, first, last, w) for w in widths}
            daily = await self.counts(ws, [day_of(d) for d in date_range(first, last)])
            return daily, rolling
        from sketches import hll

        lead = max(widths, default=1) - 1
        days = date_range(first - lead * ONE_DAY, last)
        values = await self.day_values(ws, days)

        def merge_and_count() -> tuple[list[int], dict[int, list[int]]]:
            dau, estimates = hll.rolling_from_values(values, widths, skip=lead)
            return dau.tolist(), {w: estimates[w].tolist() for w in widths}

        try:
            if len(values) <= INLINE_VALUES:
                return merge_and_count()  # well under a millisecond: a thread hop costs more
            # Milliseconds of compiled work for a dense workspace (the kernel releases the GIL):
            # off the event loop, so that other requests are served meanwhile.
            return await asyncio.to_thread(merge_and_count)
        except hll.HllFormatError as err:
            raise CorruptSketch(self.keys.sketch(ws, day_of(first)), str(err)) from err

    async def _rolling_server(
        self, ws: Scope, first: date, last: date, width: int
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

    _add_verb = "SADD"

    def _count_command(self, key: str) -> tuple[Any, ...]:
        return ("SCARD", key)

    async def rolling_and_daily(
        self, ws: Scope, first: date, last: date, widths: Sequence[int]
    ) -> tuple[list[int], dict[int, list[int]]]:
        """Days are read ``EXACT_READ_DAYS`` at a time and only the widest window's days are
        kept, so a 730-day query holds about two months of members, not two years of them."""
        if last < first:
            return [], {w: [] for w in widths}
        lead = max(widths, default=1) - 1
        days = date_range(first - lead * ONE_DAY, last)
        slides = {w: _SlidingDistinct(w, lead) for w in widths}
        daily: list[int] = []
        for i in range(0, len(days), EXACT_READ_DAYS):
            for value in await self.day_values(ws, days[i : i + EXACT_READ_DAYS]):
                today = set(value or ())
                daily.append(len(today))
                for slide in slides.values():
                    slide.push(today)
        return daily[lead:], {w: slides[w].out for w in widths}


EXACT_READ_DAYS = 31


class _SlidingDistinct:
    """Distinct members of each ``width`` consecutive days ending at days ``skip..``: a multiset
    slides over the days, so the cost is one pass over the members, not one union per day, and
    only the last ``width`` days are kept."""

    def __init__(self, width: int, skip: int) -> None:
        self.width = width
        self.skip = skip
        self.window: Counter[bytes] = Counter()
        self.recent: deque[set[bytes]] = deque()
        self.seen = 0
        self.out: list[int] = []

    def push(self, today: set[bytes]) -> None:
        window = self.window
        window.update(today)
        self.recent.append(today)
        if len(self.recent) > self.width:
            leaving = self.recent.popleft()
            window.subtract(leaving)
            for m in leaving:
                if window[m] <= 0:
                    del window[m]
        if self.seen >= self.skip:
            self.out.append(len(window))
        self.seen += 1


def make_store(
    client: RedisClient,
    keys: KeySpace,
    retention_days: int,
    rolling: RollingStrategy = "client",
) -> SketchStore:
    if keys.mode == "hll":
        return HllStore(client, keys, retention_days, rolling)
    return ExactStore(client, keys, retention_days)
