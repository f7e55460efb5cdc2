"""A batch spanning many slots, on a real Redis Cluster: script calls carry many scopes, but only
scopes of one slot share a call, and every scope is written exactly once (issue 17)."""

from __future__ import annotations

import time
from datetime import timedelta

from redis.crc import key_slot

from sketches.keys import Scope
from sketches.periods import periods_holding, utc_today
from sketches.store import WRITE_SHA, SketchStore
from sketches.writes import by_day, calls, new_token

TODAY = utc_today()


async def test_a_batch_over_many_slots_writes_every_scope_exactly_once(
    store: SketchStore,
) -> None:
    scopes = [Scope(f"o{i % 37}", f"w{i}") for i in range(600)]
    scopes += [s.org for s in scopes[:37]]
    logins = {(s, TODAY - timedelta(days=i % 3)): {f"{s.workspace_id}-a", f"{s.workspace_id}-b"}
              for i, s in enumerate(scopes)}
    week_starts = dict.fromkeys(scopes, "monday")
    batch = calls(WRITE_SHA, store.keys, by_day(logins, week_starts),  # type: ignore[arg-type]
                  retention_days=store.retention_days, now=time.time(), token=new_token(),
                  command=store._add_verb, slot_of=store._slot_of)
    slots = {key_slot(store.keys.hash_tag(s).encode()) for s in scopes}
    assert len(slots) > 300  # the batch really spans the cluster
    assert len(batch) == len(slots)  # one call per slot: scopes of a slot share it
    for call in batch:
        assert len({key_slot(store.keys.hash_tag(s).encode()) for s in call.scopes}) == 1

    assert await store.add_by_day(logins, week_starts) == []  # type: ignore[arg-type]
    for i, s in enumerate(scopes):
        meta = await store.client.hgetall(store.keys.meta(s))
        assert int(meta[b"n"]) == 1, s  # one script call wrote it, once
        day = TODAY - timedelta(days=i % 3)
        assert int(meta[str(day.toordinal()).encode()]) == 1
        assert await store.counts(s, list(periods_holding(day))) == [2, 2, 2], s
