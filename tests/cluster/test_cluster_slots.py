"""No query shape and no write can fail with CROSSSLOT, and the cluster store does what the single
one does: the static half runs without servers, the other half on the real cluster.

Static: a recording client stands in for Redis, every query shape (both windows, every metric
subset, period lengths 0/30/730, every store variant) and arbitrary batches run against it, and
every key of every command is hashed with a CRC16 written here from the cluster specification
(checked against redis-py's ``key_slot``): each query's keys all hash to its workspace's slot, and
each command of a batch stays in one slot. On the cluster the same shapes run for real and agree
with the oracle; the cluster-only paths of the store (per-master offset records, ``ping``,
``delete_workspace`` by slot) are checked directly.
"""

from __future__ import annotations

import functools
import itertools
import random
from collections.abc import Mapping
from datetime import date, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from sketches.config import Settings
from sketches.connection import open_store
from sketches.keys import KeySpace, Scope
from sketches.periods import Period, day_of, periods_holding
from sketches.query import Metric, Window, usage
from sketches.results import STATE_SCRIPT, Answers
from sketches.results import Query as AnswerQuery
from sketches.store import (
    ExactStore,
    HllStore,
    SketchStore,
    make_store,
    master_tags,
    node_record_key,
    slot_tag,
)
from tests.cluster.helpers import replaced
from tests.support.compare import assert_rows_match, rows_as_dicts
from tests.support.oracle import Oracle
from tests.test_query import add_logins

pytestmark = pytest.mark.xdist_group("cluster")

SLOTS = 16384
END = date(2026, 11, 24)
HORIZON = END - timedelta(days=800)
PERIOD_LENGTHS = (0, 30, 730)
METRIC_SUBSETS = [
    frozenset(c) for n in range(len(Metric) + 1) for c in itertools.combinations(Metric, n)
]


# --------------------------------------------------------------------------------------------
# The slot function, from the cluster specification
# --------------------------------------------------------------------------------------------


def crc16(data: bytes) -> int:
    """CRC16-CCITT (XModem): polynomial 0x1021, initial value 0, no reflection."""
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc


@functools.lru_cache(maxsize=1 << 16)
def slot_of(key: str | bytes) -> int:
    """HASH_SLOT: CRC16 of the hash tag (first ``{`` to the next ``}``, if not empty), or of the
    whole key, modulo 16384."""
    raw = key.encode() if isinstance(key, str) else key
    start = raw.find(b"{")
    if start != -1:
        end = raw.find(b"}", start + 1)
        if end > start + 1:
            raw = raw[start + 1 : end]
    return crc16(raw) % SLOTS


def test_the_slot_function_matches_the_specification_and_redis_py() -> None:
    assert crc16(b"123456789") == 0x31C3  # the specification's check value
    rng = random.Random(7)
    keys = [b"", b"{}", b"{}x", b"a{}{b}", b"{a", b"a}{", b"{user1000}.following"]
    keys += [bytes(rng.randrange(256) for _ in range(rng.randrange(40))) for _ in range(300)]
    for key in keys:
        assert slot_of(key) == key_slot(key), key
    assert slot_of("{user1000}.following") == slot_of("{user1000}.followers")


# --------------------------------------------------------------------------------------------
# Static: every key one query or one command touches, on a recording client
# --------------------------------------------------------------------------------------------

# Where the keys of each command the store may send are; anything else fails the test, so a new
# command must be declared here (and be thought about) first.
KEY_ARGS: Mapping[str, slice] = {
    "PFCOUNT": slice(1, None), "GET": slice(1, 2), "SCARD": slice(1, 2),
    "SMEMBERS": slice(1, 2), "PFADD": slice(1, 2), "SADD": slice(1, 2),
    "EXPIREAT": slice(1, 2), "SET": slice(1, 2), "HMGET": slice(1, 2), "PTTL": slice(1, 2),
    "HGET": slice(1, 2), "EXISTS": slice(1, None),
}
EMPTY_REPLY: Mapping[str, Any] = {"PFCOUNT": 0, "SCARD": 0, "GET": None, "SMEMBERS": set()}


SCRIPTS = {"EVAL", "EVALSHA", "EVAL_RO", "EVALSHA_RO", "FCALL", "FCALL_RO"}


def keys_of(cmd: tuple[Any, ...]) -> list[str]:
    name = str(cmd[0]).upper()
    if name in SCRIPTS:  # SCRIPT numkeys key [key ...] arg [arg ...]
        return [str(k) for k in cmd[3 : 3 + int(cmd[2])]]
    assert name in KEY_ARGS, f"undeclared command {name}: say where its keys are"
    return [str(k) for k in cmd[KEY_ARGS[name]]]


def reply_to(cmd: tuple[Any, ...]) -> Any:
    """An empty store's answer; a script (the store's per-key loop) answers per key for the
    command it was given as its last argument."""
    name = str(cmd[0]).upper()
    if name == "EVALSHA":  # the write script (sketches.writes): no key failed, none refused
        return [[], []]
    if name == "EVAL" and cmd[1] == STATE_SCRIPT:  # a scope's meta, no result, no key present
        return [[b"e", b"epoch", b"n", b"3"], None, "0" * (int(cmd[2]) - 2), 1_900_000_000_000]
    if name in SCRIPTS:
        return [EMPTY_REPLY[str(cmd[-1]).upper()] for _ in range(int(cmd[2]))]
    if name == "HMGET":  # a scope's epoch and counter: written to, so results are stored
        return [b"epoch", b"3"]
    if name == "HGET":  # the epoch again, after the recompute: no rebuild switched meanwhile
        return b"epoch"
    return EMPTY_REPLY.get(name, 1)


class _Pipeline:
    def __init__(self, log: list[list[tuple[Any, ...]]]) -> None:
        self.log = log
        self.commands: list[tuple[Any, ...]] = []

    def execute_command(self, *args: Any) -> _Pipeline:
        self.commands.append(args)
        return self

    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        self.log.append(self.commands)
        return [reply_to(c) for c in self.commands]


class RecordingClient:
    """Just enough of ``redis.asyncio.Redis`` for the store: pipelines, recorded."""

    def __init__(self) -> None:
        self.pipelines: list[list[tuple[Any, ...]]] = []

    def pipeline(self, transaction: bool = False) -> _Pipeline:
        return _Pipeline(self.pipelines)

    def commands(self) -> list[tuple[Any, ...]]:
        return [c for p in self.pipelines for c in p]


def recording_store(kind: str) -> tuple[SketchStore, RecordingClient]:
    client = RecordingClient()
    keys = KeySpace("um", "exact" if kind == "exact" else "hll")
    store: SketchStore
    if kind == "exact":
        store = ExactStore(client, keys, 800)  # type: ignore[arg-type]
    else:
        rolling = "server" if kind == "hll-server" else "client"
        store = HllStore(client, keys, 800, rolling)  # type: ignore[arg-type]
    store.group_by_slot = True  # as on a cluster: a write call carries one slot's scopes
    return store, client


ids = st.text(min_size=1, max_size=24) | st.sampled_from(
    ["{", "}", "{}", "a:b", "}{", "{ws}", "x}y{z", "%7B", "ü/ 空", " "]
)
STORE_KINDS = ("hll-client", "hll-server", "exact")


@hyp_settings(max_examples=40, deadline=None)
@given(
    org=ids, workspace=ids,
    kind=st.sampled_from(STORE_KINDS),
    window=st.sampled_from(list(Window)),
    metrics=st.sampled_from(METRIC_SUBSETS),
    period_length=st.sampled_from(PERIOD_LENGTHS),
    end_back=st.integers(0, 400),
)
async def test_every_key_of_a_query_hashes_to_its_workspace_slot(
    org: str, workspace: str, kind: str, window: Window, metrics: frozenset[Metric],
    period_length: int, end_back: int,
) -> None:
    store, client = recording_store(kind)
    ws = Scope(org, workspace)
    await usage(store, ws, end=END - timedelta(days=end_back), period_length=period_length,
                metrics=metrics, window=window, horizon=HORIZON)
    commands = client.commands()
    if metrics - {Metric.DAU} or Metric.DAU in metrics:
        assert commands, "a query that reads nothing"
    want = slot_of(store.keys.hash_tag(ws))
    for cmd in commands:
        for key in keys_of(cmd):
            assert key.startswith(store.keys.workspace_prefix(ws)), key
            assert slot_of(key) == want, (cmd[0], key)


@hyp_settings(max_examples=40, deadline=None)
@given(
    org=ids, workspace=ids, org_level=st.booleans(),
    kind=st.sampled_from(STORE_KINDS),
    window=st.sampled_from(list(Window)),
    metrics=st.sampled_from(METRIC_SUBSETS),
    period_length=st.sampled_from(PERIOD_LENGTHS),
)
async def test_every_key_of_a_stored_result_answer_hashes_to_its_scopes_slot(
    org: str, workspace: str, org_level: bool, kind: str, window: Window,
    metrics: frozenset[Metric], period_length: int,
) -> None:
    """The snapshot (settings, version, seq, stamps, stored result), the recompute and the
    write-back of a workspace's or an org's answer: one slot, the scope's."""
    store, client = recording_store(kind)
    scope = Scope(org, workspace).org if org_level else Scope(org, workspace)
    answers = Answers(store, retention_days=800, default_timezone="UTC", cache_entries=0)
    snap = await answers.snapshot(scope)
    assert snap.seq == 3
    await answers.rows(snap, AnswerQuery(END, period_length, metrics, window, END))
    await answers.drain()  # the write-back runs behind the response
    want = slot_of(store.keys.hash_tag(scope))
    sent = client.commands()
    assert any(str(c[0]).upper() == "SET" for c in sent), "the result was not written back"
    for cmd in sent:
        for key in keys_of(cmd):
            assert key.startswith(store.keys.workspace_prefix(scope)), key
            assert slot_of(key) == want, (cmd[0], key)


def test_every_query_shape_reads_one_slot() -> None:
    """The whole product of shapes, once, for one awkward workspace (the property test samples)."""
    import asyncio

    ws = Scope("a{b}:c", "}{ws")

    async def run() -> None:
        for kind, window, metrics, n in itertools.product(
            STORE_KINDS, Window, METRIC_SUBSETS, PERIOD_LENGTHS
        ):
            store, client = recording_store(kind)
            await usage(store, ws, end=END, period_length=n, metrics=metrics, window=window,
                        horizon=HORIZON)
            slots = {slot_of(k) for c in client.commands() for k in keys_of(c)}
            assert len(slots) <= 1, (kind, window, metrics, n, slots)
            if metrics:
                assert slots == {slot_of(store.keys.hash_tag(ws))}

    asyncio.run(run())


@hyp_settings(max_examples=40, deadline=None)
@given(
    events=st.lists(st.tuples(ids, ids, st.text(min_size=1, max_size=8), st.integers(0, 60)),
                    min_size=1, max_size=20),
    kind=st.sampled_from(STORE_KINDS),
)
async def test_every_command_of_a_batch_stays_in_one_slot(
    events: list[tuple[str, str, str, int]], kind: str
) -> None:
    """A batch spans workspaces (a cluster pipeline splits it by node), but no single command
    may span slots; the offset record stays in its partition's slot."""
    store, client = recording_store(kind)
    batch: dict[tuple[Scope, Period], set[str]] = {}
    for org, wsid, subject, back in events:
        for p in periods_holding(END - timedelta(days=back)):
            batch.setdefault((Scope(org, wsid), p), set()).add(subject)
    after = [("SET", store.keys.offsets("metrics", 3), 17)]
    assert await store.add(batch, after) == []
    for cmd in client.commands():
        assert len({slot_of(k) for k in keys_of(cmd)}) == 1, cmd
    for (ws, period) in batch:
        assert slot_of(store.keys.sketch(ws, period)) == slot_of(store.keys.hash_tag(ws))


def test_a_slot_tag_hashes_to_its_slot_and_never_to_a_partition_tag() -> None:
    some = random.Random(3).sample(range(SLOTS), 20)
    for slot in (0, 1, 5460, 5461, 10922, 10923, 16383, *some):
        tag = slot_tag(slot)
        assert slot_of("{" + tag + "}") == slot
        key = node_record_key(KeySpace("um", "hll").offsets("a@b", 0), tag)
        assert key == f"um:offsets:hll:{{{tag}}}:{{a%40b:0}}"
        assert slot_of(key) == slot
    with pytest.raises(ValueError, match="no such slot"):
        slot_tag(SLOTS)


# --------------------------------------------------------------------------------------------
# On the cluster
# --------------------------------------------------------------------------------------------

def owner(client: RedisCluster, key: str) -> str:
    node = client.get_node_from_key(key)
    assert node is not None
    return str(node.name)


AWKWARD = [Scope("a{b}:c", "}{ws"), Scope("ü/ 空", "x:y"), Scope("{", "}")]


def _events(rng: random.Random, ws: Scope, n: int) -> list[tuple[Scope, str, date]]:
    # Logins over the whole 730-day range, so the longest queries read keys that exist.
    return [(ws, f"u{rng.randrange(60)}", END - timedelta(days=rng.randrange(760)))
            for _ in range(n)]


async def test_every_query_shape_runs_on_the_cluster_and_matches_the_oracle(
    store: SketchStore, sketch_mode: str
) -> None:
    assert isinstance(store.client, RedisCluster)
    rng = random.Random(11)
    events = [e for ws in AWKWARD for e in _events(rng, ws, 900)]
    await add_logins(store, events)
    oracle = Oracle(events)
    # (store, the windows it answers differently): in HLL mode also the other rolling strategy,
    # one multi-key PFCOUNT of up to 30 days per row, the store's only multi-key command.
    stores: list[tuple[SketchStore, tuple[Window, ...]]] = [(store, tuple(Window))]
    if sketch_mode == "hll":
        server = make_store(store.client, store.keys, store.retention_days, "server")
        stores.append((server, (Window.ROLLING,)))
    full: dict[tuple[Scope, Window, int], list[dict[str, Any]]] = {}
    for ws, window, n in itertools.product(AWKWARD, Window, PERIOD_LENGTHS):
        want = oracle.rows(ws, END, n, window.value)
        for s, windows in stores:
            if window not in windows:
                continue
            got = rows_as_dicts(await usage(s, ws, end=END, period_length=n, window=window,
                                            horizon=HORIZON))
            assert_rows_match(got, want, sketch_mode)
            full[ws, window, n] = got
    ws = AWKWARD[0]
    for s, windows in stores:
        for window, metrics, n in itertools.product(windows, METRIC_SUBSETS, PERIOD_LENGTHS):
            got = rows_as_dicts(await usage(s, ws, end=END, period_length=n, metrics=metrics,
                                            window=window, horizon=HORIZON))
            asked = metrics or frozenset(Metric)
            for row, whole in zip(got, full[ws, window, n], strict=True):
                for m in Metric:
                    assert row[m.value] == (whole[m.value] if m in asked else None)


async def test_workspaces_spread_over_every_master(
    store: SketchStore, redis_client: RedisCluster
) -> None:
    """The suite is not accidentally running on one node: 30 workspaces land on all three."""
    wss = [Scope("spread", f"ws-{i}") for i in range(30)]
    await add_logins(store, [(ws, "u", END) for ws in wss])
    owners = {owner(redis_client, store.keys.hash_tag(ws)) for ws in wss}
    assert len(owners) == len(redis_client.get_primaries()) == 3


async def test_offset_records_sit_on_every_master_and_the_minimum_wins(
    store: SketchStore, redis_client: RedisCluster
) -> None:
    key = store.keys.offsets("topic", 5)
    ws = Scope("rec", "ws")
    assert await store.applied_offsets([("topic", 5)]) == [None]
    await store.add({(ws, day_of(END)): {"a"}}, [("SET", key, 40)])
    tags = await master_tags(redis_client)
    assert len(tags) == 3
    node_keys = [node_record_key(key, t) for t in tags]
    owners = {owner(redis_client, k) for k in node_keys}
    assert owners == {n.name for n in redis_client.get_primaries()}
    assert [await redis_client.get(k) for k in [key, *node_keys]] == [b"40"] * 4
    assert await store.applied_offsets([("topic", 5), ("topic", 6)]) == [40, None]

    # A master whose log lost its tail holds an older record: the resume point goes back to it.
    await redis_client.set(node_keys[1], 33)
    assert await store.applied_offsets([("topic", 5)]) == [33]
    # A master that lost everything holds none: nothing is known, read from the earliest offset.
    await redis_client.delete(node_keys[2])
    assert await store.applied_offsets([("topic", 5)]) == [None]
    # The next batch writes every record again.
    await store.add({}, [("SET", key, 41)])
    assert await store.applied_offsets([("topic", 5)]) == [41]


async def test_commands_after_the_batch_other_than_records_run_once(
    store: SketchStore, redis_client: RedisCluster
) -> None:
    ws = Scope("after", "ws")
    marker = f"{store.keys.prefix}:marker"
    await store.add({(ws, day_of(END)): {"a"}}, [("SET", marker, "x")])
    assert await redis_client.get(marker) == b"x"
    assert await store.counts(ws, [day_of(END)]) == [1]


async def test_ping_and_delete_workspace_on_the_cluster(
    settings: Settings, store: SketchStore, redis_client: RedisCluster
) -> None:
    await store.ping()
    ws, other = Scope("del", "ws"), Scope("del", "other")
    await add_logins(store, [(ws, f"u{i}", END - timedelta(days=i)) for i in range(20)]
                     + [(other, "u", END)])
    settings_key = store.keys.settings(ws)
    await redis_client.set(settings_key, b"{}")
    # Another prefix, same workspace: the same slot, and none of our business.
    elsewhere = replaced(settings, redis_key_prefix="zz" + store.keys.prefix)
    async with open_store(elsewhere) as neighbour:
        await add_logins(neighbour, [(ws, "n", END)])
        deleted = await store.delete_workspace(ws)
        periods = {p for i in range(20) for p in periods_holding(END - timedelta(days=i))}
        # ...and its meta (counter and day stamps); its settings stay.
        assert deleted == len(periods) + 1
        assert await redis_client.exists(store.keys.meta(ws)) == 0
        assert await redis_client.exists(settings_key) == 1
        assert await store.counts(ws, [day_of(END)]) == [0]
        assert await store.counts(other, [day_of(END)]) == [1]
        assert await neighbour.counts(ws, [day_of(END)]) == [1]
        assert await redis_client.get(settings_key) == b"{}"
