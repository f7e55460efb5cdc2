"""Key encoding: one-to-one whatever the ids hold, one hash tag per workspace."""

from __future__ import annotations

from datetime import date

from hypothesis import given
from hypothesis import strategies as st

from sketches.keys import KeySpace, Scope, decode_id, encode_id
from sketches.periods import day_of, month_of, week_of

ids = st.text(min_size=1, max_size=40)  # any unicode, ':' '{' '}' '/' spaces included
KS = KeySpace("um", "hll")
DAY = day_of(date(2026, 11, 24))


def hash_tag_of(key: str) -> str:
    """What Redis Cluster hashes: the text between the first '{' and the next '}'."""
    start = key.index("{")
    end = key.index("}", start + 1)
    return key[start + 1 : end]


@given(ids, ids, ids, ids)
def test_distinct_workspaces_never_share_a_key(o1: str, w1: str, o2: str, w2: str) -> None:
    a, b = Scope(o1, w1), Scope(o2, w2)
    if a != b:
        assert KS.sketch(a, DAY) != KS.sketch(b, DAY)
        assert KS.hash_tag(a) != KS.hash_tag(b)


@given(ids, ids)
def test_every_key_of_a_workspace_carries_its_one_hash_tag(org: str, ws: str) -> None:
    w = Scope(org, ws)
    keys = [KS.sketch(w, p) for p in (DAY, week_of(DAY.start), month_of(DAY.start))]
    keys += [KeySpace("um", "exact").sketch(w, DAY), KS.settings(w)]
    tags = {hash_tag_of(k) for k in keys}
    assert tags == {KS.hash_tag(w)[1:-1]}
    assert KS.parse_workspace(keys[0]) == w


@given(ids)
def test_id_encoding_round_trips_and_never_emits_separators(raw: str) -> None:
    enc = encode_id(raw)
    assert decode_id(enc) == raw
    assert not set(enc) & set(":{}/ ")


def test_known_collision_candidates_stay_apart() -> None:
    pairs = [
        (Scope("a:b", "c"), Scope("a", "b:c")),
        (Scope("a}", "b"), Scope("a", "}b")),
        (Scope("{a", "b"), Scope("a", "b")),
        (Scope("a/b", "c"), Scope("a%2Fb", "c")),
        (Scope("a b", "c"), Scope("a+b", "c")),
        (Scope("é", "x"), Scope("e\u0301", "x")),
    ]
    for left, right in pairs:
        assert KS.sketch(left, DAY) != KS.sketch(right, DAY), (left, right)


def test_modes_and_periods_get_distinct_keys() -> None:
    w = Scope("acme", "ws-1")
    assert KS.sketch(w, DAY) == "um:{acme:ws-1}:hll:d:2026-11-24"
    assert KeySpace("um", "exact").sketch(w, DAY) == "um:{acme:ws-1}:set:d:2026-11-24"
    assert KS.sketch(w, week_of(date(2027, 1, 1))) == "um:{acme:ws-1}:hll:w:2026-W53"
    assert KS.sketch(w, month_of(date(2027, 1, 1))) == "um:{acme:ws-1}:hll:m:2027-01"
