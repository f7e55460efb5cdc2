"""The pure helpers of the benchmark's live sections: the live check is only as good as the
count of distinct subjects it compares against, and the memory check only as good as the way it
sorts keys."""

from __future__ import annotations

from datetime import date

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from bench import livedata
from sketches.keys import KeySpace, Scope
from sketches.periods import day_of, month_of, week_of

codes = st.lists(st.integers(min_value=0, max_value=50), max_size=200)


@given(codes)
def test_distinct_prefix_counts_the_distinct_values_of_every_prefix(values: list[int]) -> None:
    out = livedata.distinct_prefix(np.asarray(values, dtype=np.int64))
    assert out.tolist() == [len(set(values[:k])) for k in range(len(values) + 1)]


@given(st.integers(min_value=0, max_value=3 * livedata.BLOCK),
       st.integers(min_value=0, max_value=3 * livedata.BLOCK))
def test_live_stream_is_the_same_whoever_generates_it_and_however_far(a: int, b: int) -> None:
    """The producer extends the stream a block at a time, the benchmark all at once."""
    short, long = sorted((a, b))
    head = livedata.live_codes(short, 500, seed=7)
    assert livedata.live_codes(long, 500, seed=7)[:short].tolist() == head.tolist()
    blocks = [livedata.live_block(i, 500, seed=7) for i in range(long // livedata.BLOCK + 1)]
    assert np.concatenate(blocks)[:short].tolist() == head.tolist()


def test_live_stream_keeps_bringing_new_subjects() -> None:
    """Today's DAU must keep growing through a run, or a stale answer would pass the check."""
    distinct = livedata.distinct_prefix(livedata.live_codes(20_000, 1_000, seed=3))
    assert distinct[20_000] - distinct[10_000] > 0.15 * 10_000


def test_within_takes_the_tolerance_of_an_estimate_only() -> None:
    assert livedata.within(100, 100, 120, 0.0)
    assert livedata.within(120, 100, 120, 0.0)
    assert not livedata.within(99, 100, 120, 0.0)
    assert not livedata.within(121, 100, 120, 0.0)
    assert livedata.within(98, 100, 120, 0.03)
    assert not livedata.within(None, 1, 5, 0.03)
    assert livedata.within(None, 0, 5, 0.0)


def test_key_kind_sorts_a_workspace_keys() -> None:
    ks = KeySpace("lv", "hll")
    ws = Scope("org:{a}", "ws/1 é")
    head = ks.workspace_prefix(ws)
    d = date(2026, 11, 24)
    for period in (day_of(d), week_of(d), month_of(d)):
        key = ks.sketch(ws, period)
        assert livedata.key_kind(key, head) == livedata.SKETCH
        assert livedata.hash_tag(key, "lv") == ks.hash_tag(ws)
    for name in ("hll:meta", "hll:result:v1"):
        assert livedata.key_kind(head + name, head) == livedata.STORED
    assert livedata.key_kind(ks.meta(ws), head) == livedata.STORED
    assert livedata.key_kind(ks.settings(ws), head) == livedata.OTHER
    assert livedata.hash_tag(ks.offsets("t", 0), "lv") is None


def test_plan_puts_the_densest_first_and_one_warmup_aside() -> None:
    spaces = livedata.plan(6, (500, 3_000), seed=1)
    assert [w.cls for w in spaces] == ["dense", "dense", "small", "small", "small", "small",
                                       "warmup"]
    assert spaces[0].dau == 3_000
    assert len({w.ws for w in spaces}) == len(spaces)
