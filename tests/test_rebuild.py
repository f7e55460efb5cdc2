"""A rebuild whose cost follows the selection (issue 17): one pass for many scopes, a prefilter on
raw bytes that never drops a login the full parse would select, only the partitions that can hold
the workspaces when producers key by workspace id, and a wrong ``KAFKA_RECORD_KEY`` refused
before the switch."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import orjson
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from consumer.events import Parser, Rules
from consumer.rebuild import (
    FEW_NEEDLES,
    Prefilter,
    Selection,
    quoted,
)
from sketches.errors import BadMessage
from sketches.keys import Scope, org_scope
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
