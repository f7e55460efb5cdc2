"""Hostile message values with the verdict each must get, for the parser's property test and the
consumer's end-to-end one.

Every case is built so that its verdict follows from the contract, not from the code under test:
``counted`` is the login it must count, or ``None`` when it must be dead-lettered. Most are bad
messages, but some hostile-looking values are well-formed logins by the contract's rules (an id
with a NUL, nesting or a huge number in an ignored field, a duplicate key whose last value is
good) and must be counted like any other.

The nesting limit is orjson's: 1,024 levels, the message's own object included. A message nested
deeper cannot be decoded at all and is a bad message, wherever the nesting sits.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta

import orjson
from hypothesis import strategies as st

from sketches.periods import utc_today
from usage_metrics.synth import SynthEvent

MAX_DEPTH = 1024
ORG = "hostile"
FIELDS = ("metric_type", "subject", "org_id", "workspace_id", "timestamp")
IDS = ("subject", "org_id", "workspace_id")


@dataclass(frozen=True)
class Case:
    what: str
    value: bytes | None
    counted: SynthEvent | None  # None: a bad message, dead-lettered with its bytes

    def __repr__(self) -> str:  # Hypothesis prints failing cases: keep 250 KB values short
        shown = None if self.value is None else self.value[:80] + (
            b"..." if len(self.value) > 80 else b"")
        return f"Case({self.what!r}, {shown!r}, counted={self.counted!r})"


def today() -> datetime:
    return datetime.combine(utc_today(), time(), UTC)


def good_events() -> st.SearchStrategy[SynthEvent]:
    """Logins well inside the retention and not in the future, in three workspaces."""
    return st.builds(
        lambda back, second, user, ws: SynthEvent(
            ORG, f"ws-{ws}", f"u{user}",
            today() - timedelta(days=back + 1) + timedelta(seconds=second),
        ),
        st.integers(0, 30), st.integers(0, 86399), st.integers(0, 40), st.integers(0, 2),
    )


def fields_of(e: SynthEvent) -> list[tuple[str, bytes]]:
    data = orjson.loads(e.to_json())
    return [(name, orjson.dumps(data[name])) for name in FIELDS]


def render(fields: list[tuple[str, bytes]]) -> bytes:
    return b"{" + b",".join(orjson.dumps(k) + b":" + v for k, v in fields) + b"}"


def with_field(e: SynthEvent, name: str, raw: bytes) -> bytes:
    """``e`` with one field's value replaced by raw JSON text (which may be no JSON at all)."""
    return render([(k, raw if k == name else v) for k, v in fields_of(e)])


def with_extra(e: SynthEvent, raw: bytes) -> bytes:
    """``e`` with an ignored field ``x`` holding raw JSON text."""
    return render([*fields_of(e), ("x", raw)])


def nested(depth: int, kind: str) -> bytes:
    if kind == "list":
        return b"[" * depth + b"]" * depth
    return b'{"a":' * depth + b"1" + b"}" * depth


PLACES = ("top", "ignored", "subject", "timestamp")
# msgspec skips an ignored field, or the top level's unknown keys, by recursing into it: the
# places where depth used to raise RecursionError. Drawn twice as often.
NESTING_PLACES = ("top", "ignored", "top", "ignored", "subject", "timestamp")


@st.composite
def nesting(draw: st.DrawFn) -> Case:
    depth = draw(st.sampled_from([500, 1000, 1023, 1024, 5000, 50_000]) | st.integers(500, 50_000))
    kind = draw(st.sampled_from(["list", "object"]))
    where = draw(st.sampled_from(NESTING_PLACES))
    raw = nested(depth, kind)
    e = draw(good_events())
    what = f"{depth} levels of {kind}s, {where}"
    if where == "top":
        return Case(what, raw, None)
    if where == "ignored":
        return Case(what, with_extra(e, raw), e if depth + 1 <= MAX_DEPTH else None)
    return Case(what, with_field(e, where, raw), None)


@st.composite
def big_numbers(draw: st.DrawFn) -> Case:
    digits = draw(st.integers(1000, 5000))
    lead = draw(st.integers(1, 9))
    text = f"{lead}{'0123456789' * (digits // 10)}"
    text = draw(st.sampled_from(["", "-"])) + text + draw(st.sampled_from(["", ".5", "e999"]))
    where = draw(st.sampled_from(PLACES))
    e = draw(good_events())
    what = f"a number of {len(text)} characters, {where}"
    if where == "top":
        return Case(what, text.encode(), None)
    if where == "ignored":
        # The contract ignores every other field, whatever it holds.
        return Case(what, with_extra(e, text.encode()), e)
    return Case(what, with_field(e, where, text.encode()), None)


@st.composite
def non_finite(draw: st.DrawFn) -> Case:
    token = draw(st.sampled_from([b"NaN", b"Infinity", b"-Infinity", b"nan", b"inf"]))
    where = draw(st.sampled_from(PLACES))
    e = draw(good_events())
    value = {"top": token, "ignored": with_extra(e, token)}.get(where) or with_field(
        e, where, token)
    return Case(f"{token.decode()} {where} (not JSON)", value, None)


@st.composite
def byte_order_marks(draw: st.DrawFn) -> Case:
    bom = draw(st.sampled_from([b"\xef\xbb\xbf", b"\xff\xfe", b"\xfe\xff"]))
    return Case(f"BOM {bom!r}", bom + draw(good_events()).to_json(), None)


@st.composite
def duplicate_keys(draw: st.DrawFn) -> Case:
    """Both decoders keep a duplicated key's last value: the message stands or falls by it."""
    e = draw(good_events())
    name = draw(st.sampled_from(FIELDS))
    bad = draw(st.sampled_from([b"5", b"null", b"[]", b"{}", b"true"]))
    good = dict(fields_of(e))[name]
    good_last = draw(st.booleans())
    pair = [(name, bad), (name, good)] if good_last else [(name, good), (name, bad)]
    fields = [f for f in fields_of(e) if f[0] != name] + pair
    return Case(f"duplicate {name!r}, good value {'last' if good_last else 'first'}",
                render(fields), e if good_last else None)


@st.composite
def nul_in_ids(draw: st.DrawFn) -> Case:
    e = draw(good_events())
    name = draw(st.sampled_from(IDS))
    ids = {"subject": e.subject, "org_id": e.org_id, "workspace_id": e.workspace_id}
    ids[name] = "\x00" + ids[name] + "\x00x"
    counted = SynthEvent(ids["org_id"], ids["workspace_id"], ids["subject"], e.timestamp)
    return Case(f"NUL in {name}", counted.to_json(), counted)


@st.composite
def lone_surrogates(draw: st.DrawFn) -> Case:
    e = draw(good_events())
    name = draw(st.sampled_from(IDS))
    raw = draw(st.sampled_from([b'"a\\ud800b"', b'"\\udfff"', b'"\\ud83d"', b'"a\xed\xa0\x80b"']))
    return Case(f"lone surrogate {raw!r} in {name}", with_field(e, name, raw), None)


EDGE_TIMESTAMPS = [
    b'"0001-01-01T00:00:00Z"', b'"0001-01-01T00:00:00+14:00"', b'"0001-01-01T00:00:00-23:59"',
    b'"9999-12-31T23:59:59.999999Z"', b'"9999-12-31T23:59:59.999999-23:59"',
    b'"9999-12-31T23:59:59+14:00"', b'"1970-01-01T00:00:00Z"',
    b"-62135596800", b"-62135596801", b"253402300799", b"253402300800", b"0", b"-1",
    b"999999999999", b"1000000000000", b"-1000000000000", b"1e15", b"-1e15", b"9.99e15",
    b"9223372036854775807", b"-9223372036854775808", b"18446744073709551616", b"1e308",
    b"5e-324", b"-0.0",
]


@st.composite
def edge_timestamps(draw: st.DrawFn) -> Case:
    """At the edges of what ``datetime`` holds, or just outside the retention and future
    bounds (with a day of margin, as the consumer's clock is not the test's)."""
    e = draw(good_events())
    raw = draw(st.sampled_from([
        *EDGE_TIMESTAMPS,
        orjson.dumps((today() + timedelta(days=3)).isoformat()),
        orjson.dumps((today() - timedelta(days=802)).isoformat()),
    ]))
    return Case(f"timestamp {raw[:40]!r}", with_field(e, "timestamp", raw), None)


def _not_an_object(raw: bytes) -> bool:
    try:
        return not isinstance(orjson.loads(raw), dict)
    except orjson.JSONDecodeError:
        return True


@st.composite
def arbitrary_bytes(draw: st.DrawFn) -> Case:
    raw = draw(st.binary(max_size=300).filter(_not_an_object))
    return Case("arbitrary bytes", raw, None)


def families() -> list[st.SearchStrategy[Case]]:
    """One strategy per kind of hostility."""
    return [
        nesting(), big_numbers(), non_finite(), byte_order_marks(), duplicate_keys(),
        nul_in_ids(), lone_surrogates(), edge_timestamps(), arbitrary_bytes(),
        st.just(Case("no value (a tombstone)", None, None)),
    ]


def hostile() -> st.SearchStrategy[Case]:
    return st.one_of(families())


def one_of_each() -> st.SearchStrategy[list[Case]]:
    """A case of every family (twice for nesting, the one that stopped the consumer), so that
    each of a few end-to-end examples covers them all."""
    return st.tuples(nesting(), *families()).map(list)
