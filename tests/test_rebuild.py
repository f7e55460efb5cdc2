"""A rebuild whose cost follows the selection (issue 17): one pass for many scopes, a prefilter on
raw bytes that never drops a login the full parse would select, only the partitions that can hold
the workspaces when producers key by workspace id, and a wrong ``KAFKA_RECORD_KEY`` refused
before the switch."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import orjson
import pytest
from aiokafka import AIOKafkaProducer
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from consumer.events import Parser, Rules
from consumer.rebuild import rebuild
from consumer.recordfilter import (
    FEW_NEEDLES,
    Prefilter,
    RecordFilter,
    WrongRecordKey,
    default_partition,
    quoted,
    workspace_key,
)
from consumer.selection import Selection
from sketches import scope_settings as wss
from sketches.config import Settings
from sketches.errors import BadMessage
from sketches.keys import Scope, org_scope
from sketches.periods import Granularity, periods_between
from sketches.store import SketchStore
from tests.conftest import create_topics
from tests.support.kafka import produce, running, wait_applied
from tests.test_consumer import consumer_env
from usage_metrics.synth import SynthEvent

NOW = datetime(2026, 12, 7, 12, tzinfo=UTC)
RULES = Rules(login_type="login", retention_days=800, max_bytes=65_536)

# ------------------------------------------------------------------------------ the prefilter

# Ids of any unicode (no lone surrogates: JSON text is UTF-8), biased towards the characters a
# JSON encoder escapes or that look like the syntax around an id.
TRICKY = '"\\/\x00\x1f\x7f:{}, \u2028\u00e9\U0001f600'
ids = st.one_of(
    st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters=TRICKY),
            min_size=1, max_size=6),
    st.text(alphabet=st.one_of(st.sampled_from(TRICKY),
                               st.characters(blacklist_categories=("Cs",))),
            min_size=1, max_size=6),
)


def escape_some(text: str, draw_bits: list[bool]) -> str:
    """A JSON string body that escapes what it must and, per character, may escape any other
    (``\\/``, ``\\uXXXX``, a surrogate pair), as another producer's encoder might."""
    out = []
    for i, ch in enumerate(text):
        chosen = draw_bits[i % len(draw_bits)] if draw_bits else False
        if ch == '"' or ch == "\\" or ord(ch) < 0x20 or chosen:
            if ch == "/" and chosen:
                out.append("\\/")
            elif ord(ch) > 0xFFFF:
                hi, lo = divmod(ord(ch) - 0x10000, 0x400)
                out.append(f"\\u{0xD800 + hi:04x}\\u{0xDC00 + lo:04X}")
            else:
                out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return "".join(out)


@st.composite
def encoded_login(draw: st.DrawFn, scope: Scope) -> bytes:
    """A login of ``scope`` as one of several producers would write it."""
    event = {"metric_type": "login", "subject": draw(ids), "org_id": scope.org_id,
             "workspace_id": scope.workspace_id, "timestamp": "2026-12-07T10:00:00Z"}
    style = draw(st.sampled_from(["orjson", "ascii", "unicode", "escaped"]))
    if style == "orjson":
        return orjson.dumps(event)
    if style in ("ascii", "unicode"):
        return json.dumps(event, ensure_ascii=style == "ascii").encode()
    bits = draw(st.lists(st.booleans(), max_size=8))
    fields = list(event.items())
    draw(st.randoms()).shuffle(fields)
    body = ",".join(f'"{escape_some(k, bits)}":"{escape_some(v, bits)}"' for k, v in fields)
    return ("{" + body + "}").encode()


def parsed_scope(value: bytes) -> Scope | None:
    try:
        login = Parser(RULES, NOW).parse(value)
    except BadMessage:
        return None
    return login.workspace if login is not None else None


def selects(selection: Selection, scope: Scope) -> bool:
    return scope in selection.scopes or scope.org in selection.scopes


@st.composite
def selection_and_login(draw: st.DrawFn, n: int) -> tuple[Selection, bytes]:
    orgs = draw(st.lists(ids, min_size=1, max_size=3))
    scopes = [Scope(draw(st.sampled_from(orgs)), draw(ids)) for _ in range(n)]
    if draw(st.booleans()):
        scopes.append(org_scope(draw(st.sampled_from(orgs))))
    selection = Selection.of(scopes)
    # The login: one of a selected scope's, or a neighbour's (same org, or an id one character
    # off), which the prefilter may drop.
    base = draw(st.sampled_from(scopes))
    kind = draw(st.sampled_from(["same", "org", "near", "other"]))
    if kind == "same" and not base.is_org:
        login_scope = base
    elif kind == "org" or base.is_org:
        login_scope = Scope(base.org_id, draw(ids))
    elif kind == "near":
        login_scope = Scope(base.org_id, base.workspace_id + draw(ids))
    else:
        login_scope = Scope(draw(ids), base.workspace_id)
    return selection, draw(encoded_login(login_scope))


@pytest.mark.parametrize("n", [1, 2, FEW_NEEDLES + 1])
@hsettings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_the_prefilter_never_drops_a_record_the_full_parse_would_select(
        n: int, data: st.DataObject) -> None:
    """Small selections take the substring path, large ones the token-set path."""
    selection, value = data.draw(selection_and_login(n))
    assert_kept(selection, value)


def assert_kept(selection: Selection, value: bytes) -> None:
    scope = parsed_scope(value)
    if scope is not None and selects(selection, scope):
        assert Prefilter(selection)(value), (selection, value)


LOGIN = '{{"metric_type":"login","subject":"u","org_id":"{}","workspace_id":"{}",' \
    '"timestamp":"2026-12-07T10:00:00Z"}}'


@pytest.mark.parametrize(("scope", "org_id", "workspace_id"), [
    (Scope("acme", "a/b"), "acme", "a\\/b"),
    (Scope('ac"me', "ws"), 'ac\\"me', "ws"),
    (org_scope("\u00e9"), "\\u00e9", "ws"),
    (Scope("acme", "\U0001f600"), "acme", "\\ud83d\\ude00"),
    (Scope("acme", "x\x01"), "acme", "x\\u0001"),
])
def test_escaped_ids_are_parsed(scope: Scope, org_id: str, workspace_id: str) -> None:
    value = LOGIN.format(org_id, workspace_id).encode()
    assert parsed_scope(value) in (scope, Scope(scope.org_id, "ws"))
    for big in (False, True):
        others = [Scope("acme", f"o{i}") for i in range(FEW_NEEDLES if big else 0)]
        assert_kept(Selection.of([scope, *others]), value)
        assert Prefilter(Selection.of([scope, *others]))(value)


def test_the_prefilter_drops_other_workspaces_records_without_parsing_them() -> None:
    """What makes a rebuild cheap: a plain record of another workspace, or of the same
    workspace id in another org, is dropped; the org's own scope keeps every record of the org."""
    def value(org: str, ws: str) -> bytes:
        return SynthEvent(org, ws, "u1", NOW).to_json()

    for scopes in ([Scope("acme", "ws-1")],
                   [Scope("acme", f"ws-{i}") for i in range(1, FEW_NEEDLES + 2)]):
        keep = Prefilter(Selection.of(scopes))
        assert keep(value("acme", "ws-1"))
        assert not keep(value("acme", "ws-100"))
        assert not keep(value("globex", "ws-1"))
        assert not keep(value("acme", "ws-1x"))
        assert not keep(None)
        # A backslash anywhere: parsed, whatever it spells.
        assert keep(value("acme", "ws-100").replace(b"u1", b"u\\u0031"))
    org = Prefilter(Selection.of([org_scope("acme")]))
    assert org(value("acme", "ws-100"))
    assert not org(value("globex", "ws-1"))
    # An id that must be escaped has no raw spelling: only values with a backslash can hold it.
    assert quoted('a"b') is None
    assert quoted("a\\b") is None
    assert quoted("a\x01") is None
    assert not Prefilter(Selection.of([Scope("acme", 'a"b')]))(value("acme", "ab"))


# ---------------------------------------------------------------------------- the rebuild


def day_counts(events: list[SynthEvent], scope: Scope, tz: str) -> Counter[Any]:
    days: dict[Any, set[str]] = {}
    for e in events:
        if (scope.is_org and e.org_id == scope.org_id) or Scope(e.org_id, e.workspace_id) == scope:
            days.setdefault(e.timestamp.astimezone(ZoneInfo(tz)).date(), set()).add(e.subject)
    return Counter({d: len(s) for d, s in days.items()})


async def store_day_counts(store: SketchStore, scope: Scope) -> Counter[Any]:
    today = datetime.now(UTC).date()
    periods = periods_between(Granularity.DAY, today - timedelta(days=20), today + timedelta(1))
    counts = await store.counts(scope, periods)
    return Counter({p.start: c for p, c in zip(periods, counts, strict=True) if c})


def spread_events(scopes: list[Scope], per_scope: int = 40) -> list[SynthEvent]:
    """Logins whose UTC and Tokyo dates differ (15:00-23:00 UTC), so a rebuild that re-buckets
    a scope in Tokyo time moves them, and one that does not leaves them."""
    today = datetime.now(UTC).date()
    out = []
    for n, ws in enumerate(scopes):
        for i in range(per_scope):
            d = today - timedelta(days=1 + i % 9)
            moment = datetime(d.year, d.month, d.day, 15 + i % 8, tzinfo=UTC)
            out.append(SynthEvent(ws.org_id, ws.workspace_id, f"u{(i * 7 + n) % 13}", moment))
    return out


async def test_many_scopes_are_rebuilt_in_one_pass_and_no_other(
    settings: Settings, store: SketchStore, topics: tuple[str, str]
) -> None:
    """Every scope moves to Tokyo time; a rebuild of two workspaces of acme, one of globex and
    acme's own scope, in one pass over the topic, re-buckets exactly those."""
    topic, _ = topics
    chosen = [Scope("acme", "a"), Scope("acme", "b"), Scope("globex", "a")]
    left = [Scope("acme", "c"), Scope("globex", "b")]
    events = spread_events(chosen + left)
    ends = await produce(settings.kafka_bootstrap_servers, topic, [e.to_json() for e in events])
    async with running(settings, store):
        await wait_applied(store, topic, ends)
    everything = chosen + left + [org_scope("acme"), org_scope("globex")]
    for scope in everything:
        assert await store_day_counts(store, scope) == day_counts(events, scope, "UTC")
        await wss.save(store.client, store.keys, scope,
                       wss.OrgSettings(timezone="Asia/Tokyo") if scope.is_org
                       else wss.WorkspaceSettings(timezone="Asia/Tokyo"))

    selection = Selection.of([*chosen, org_scope("acme")])
    stats = await rebuild(settings, store, selection)
    assert stats.messages == len(events)  # one pass: every record read once
    assert stats.logins == sum(1 for e in events if Scope(e.org_id, e.workspace_id) in chosen
                               or e.org_id == "acme")
    for scope in everything:
        tz = "Asia/Tokyo" if scope in selection.scopes else "UTC"
        assert await store_day_counts(store, scope) == day_counts(events, scope, tz), scope


async def test_the_cli_rebuilds_repeated_workspaces_of_an_org(
    settings: Settings, store: SketchStore, topics: tuple[str, str]
) -> None:
    topic, _ = topics
    scopes = [Scope("acme", "a"), Scope("acme", "b"), Scope("acme", "c")]
    events = spread_events(scopes, per_scope=10)
    await produce(settings.kafka_bootstrap_servers, topic, [e.to_json() for e in events])
    # Nothing consumed: the rebuild alone writes a and b; c stays empty.
    done = subprocess.run(
        [sys.executable, "-m", "usage_metrics.cli", "rebuild", "--org", "acme",
         "--workspace", "a", "--workspace", "b"],
        env=consumer_env(settings), capture_output=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert b"rebuilt acme/a, acme/b from 30 messages: 20 logins counted" in done.stdout
    for scope in scopes[:2]:
        assert await store_day_counts(store, scope) == day_counts(events, scope, "UTC")
    assert await store_day_counts(store, scopes[2]) == Counter()
    refused = subprocess.run(
        [sys.executable, "-m", "usage_metrics.cli", "rebuild", "--org", "acme",
         "--workspace", ""], env=consumer_env(settings), capture_output=True, timeout=60,
    )
    assert refused.returncode == 2
    assert b"never empty" in refused.stderr


# --------------------------------------------------------------- partitions keyed by workspace

PARTITIONS = 5


async def produce_keyed(bootstrap: str, topic: str, events: list[SynthEvent],
                        key: Any = None, partition: Any = None
                        ) -> tuple[dict[Scope, int], dict[int, int]]:
    """Through aiokafka's own default partitioner (``key`` maps an event to its key, else its
    workspace id); the partition each workspace's records went to, and the end offsets."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    await producer.start()
    where: dict[Scope, int] = {}
    ends: dict[int, int] = {}
    try:
        futures = [await producer.send(
            topic, e.to_json(), key=key(e) if key else workspace_key(e.workspace_id),
            partition=partition(e) if partition else None) for e in events]
        for e, meta in zip(events, [await f for f in futures], strict=True):
            where[Scope(e.org_id, e.workspace_id)] = meta.partition
            ends[meta.partition] = max(ends.get(meta.partition, 0), meta.offset + 1)
    finally:
        await producer.stop()
    return where, ends


def keyed(settings: Settings) -> Settings:
    return settings.model_copy(update={"kafka_record_key": "workspace"})


@pytest.fixture
async def five(settings: Settings) -> str:
    await create_topics(settings.kafka_bootstrap_servers, settings.kafka_topic,
                        partitions=PARTITIONS)
    return settings.kafka_topic


async def test_a_keyed_rebuild_reads_only_the_partitions_the_default_partitioner_chose(
    settings: Settings, store: SketchStore, five: str
) -> None:
    scopes = [Scope("acme", f"ws-{i}") for i in range(12)]
    events = spread_events(scopes, per_scope=6)
    where, _ = await produce_keyed(settings.kafka_bootstrap_servers, five, events)
    assert len(set(where.values())) > 1
    for scope, partition in where.items():
        assert default_partition(workspace_key(scope.workspace_id), PARTITIONS) == partition

    chosen = [scopes[0], scopes[5]]
    selection = Selection.of(chosen)
    read = RecordFilter(selection, keyed=True, login_type="login").partitions(PARTITIONS)
    assert read == sorted({where[ws] for ws in chosen})
    stats = await rebuild(keyed(settings), store, selection)
    assert stats.messages == sum(1 for e in events
                                 if where[Scope(e.org_id, e.workspace_id)] in read)
    assert stats.messages < len(events)
    for scope in scopes:
        want = day_counts(events, scope, "UTC") if scope in chosen else Counter()
        assert await store_day_counts(store, scope) == want
    # An org's own scope lies in every partition: all of them are read.
    stats = await rebuild(keyed(settings), store, Selection.of([org_scope("acme")]))
    assert stats.messages == len(events)
    assert await store_day_counts(store, org_scope("acme")) == day_counts(
        events, org_scope("acme"), "UTC")


@pytest.mark.parametrize("how", ["unkeyed", "by-subject", "other-partitioner"])
async def test_a_wrong_record_key_setting_is_refused_before_the_switch(
    settings: Settings, store: SketchStore, five: str, how: str
) -> None:
    """Producers that do not key (no key), key by something else (the subject: every key sits
    where the partitioner put it, but it is not the workspace), or use another partitioner
    (records of a read partition whose keys hash elsewhere): the rebuild fails loudly and the
    old sketches keep answering."""
    scopes = [Scope("acme", f"ws-{i}") for i in range(12)]
    events = spread_events(scopes, per_scope=6)
    key = {"unkeyed": lambda e: None, "by-subject": lambda e: e.subject.encode(),
           "other-partitioner": None}[how]
    partition = (lambda e: int(e.workspace_id.split("-")[1]) % PARTITIONS
                 ) if how == "other-partitioner" else None
    if how == "unkeyed":
        ends = await produce(settings.kafka_bootstrap_servers, five,
                             [e.to_json() for e in events])
    else:
        _, ends = await produce_keyed(settings.kafka_bootstrap_servers, five, events, key,
                                      partition)
    target = scopes[3]
    async with running(settings, store):
        await wait_applied(store, five, ends)
    before = await store_day_counts(store, target)
    assert before == day_counts(events, target, "UTC")
    await wss.save(store.client, store.keys, target, wss.WorkspaceSettings(timezone="Asia/Tokyo"))

    with pytest.raises(WrongRecordKey, match="KAFKA_RECORD_KEY=none"):
        await rebuild(keyed(settings), store, Selection.of([target]))
    assert await store_day_counts(store, target) == before
    # The same from the command line: exit 2, one line naming the setting, no traceback.
    done = subprocess.run(
        [sys.executable, "-m", "usage_metrics.cli", "rebuild", "--org", "acme",
         "--workspace", target.workspace_id],
        env=consumer_env(settings, KAFKA_RECORD_KEY="workspace"), capture_output=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr.decode()[-2000:]
    assert b"KAFKA_RECORD_KEY=none" in done.stderr
    assert b"Traceback" not in done.stderr
    assert await store_day_counts(store, target) == before
    # Read in full, the same topic rebuilds fine.
    await rebuild(settings, store, Selection.of([target]))
    assert await store_day_counts(store, target) == day_counts(events, target, "Asia/Tokyo")


async def test_a_rebuild_already_under_way_is_refused_unless_taken_over(
    settings: Settings, store: SketchStore, topics: tuple[str, str]
) -> None:
    """A rebuild that died leaves its generation marked: the next one says so in one line
    (exit 1) and names ``--take-over``, which replaces it."""
    topic, _ = topics
    ws = Scope("acme", "a")
    events = spread_events([ws], per_scope=10)
    await produce(settings.kafka_bootstrap_servers, topic, [e.to_json() for e in events])
    await store.begin_rebuild([ws])  # the one that died
    command = [sys.executable, "-m", "usage_metrics.cli", "rebuild", "--org", "acme",
               "--workspace", "a"]
    refused = subprocess.run(command, env=consumer_env(settings), capture_output=True,
                             timeout=120)
    assert refused.returncode == 1
    errors = [line for line in refused.stderr.decode().splitlines() if " ERROR " in line]
    assert len(errors) == 1, refused.stderr
    assert "--take-over" in errors[0]
    assert b"Traceback" not in refused.stderr
    assert await store_day_counts(store, ws) == Counter()
    done = subprocess.run([*command, "--take-over"], env=consumer_env(settings),
                          capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert await store_day_counts(store, ws) == day_counts(events, ws, "UTC")


def test_each_key_check_fails_alone() -> None:
    """Without the broker: a record of a read partition with no key, with a key the partitioner
    puts elsewhere, or (skipped unparsed, then sampled) holding a workspace that is not its key
    fails; records keyed by their own workspace pass and are skipped unparsed."""
    target = Scope("acme", "ws-0")
    records = RecordFilter(Selection.of([target]), keyed=True, login_type="login")
    [home] = records.partitions(PARTITIONS)
    others = [f"ws-{i}" for i in range(1, 400)
              if default_partition(workspace_key(f"ws-{i}"), PARTITIONS) == home]
    elsewhere = next(f"ws-{i}" for i in range(1, 400)
                     if default_partition(workspace_key(f"ws-{i}"), PARTITIONS) != home)

    def record(key: bytes | None, ws: str, offset: int = 0) -> Any:
        from aiokafka.structs import ConsumerRecord

        value = SynthEvent("acme", ws, "u1", NOW).to_json()
        return ConsumerRecord("t", home, offset, 0, 0, key, value, None, 0, len(value), [])

    fine = [record(workspace_key(ws), ws, i) for i, ws in enumerate(others * 40)]
    assert records.select(fine) == []
    assert len(records.select([*fine, record(workspace_key("ws-0"), "ws-0")])) == 1
    with pytest.raises(WrongRecordKey, match="has no key"):
        records.select([record(None, others[0])])
    with pytest.raises(WrongRecordKey, match="puts in partition"):
        records.select([record(workspace_key(elsewhere), elsewhere)])
    # Keyed by one workspace, holding another: found among the sampled skipped records.
    lying = [record(workspace_key(others[0]), others[1], i) for i in range(64)]
    with pytest.raises(WrongRecordKey, match="under key"):
        records.select(lying)
