"""More consumers: three ``usage-metrics consume`` processes in one group on a 6-partition topic,
writing to the Redis Cluster, reach the counts one consumer reaches; a fourth that joins while
they run changes no count.

Exact mode, so that "the same counts" means the same sets: every bucket is compared member for
member with what the events must produce, and the endpoint's rows with the oracle's and with those
of a single consumer that read the same topic into a store of its own.
"""

from __future__ import annotations

import signal
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sketches.connection import open_store
from sketches.keys import Scope
from sketches.query import Window, usage
from sketches.store import SketchStore
from tests.cluster.helpers import replaced
from tests.faults.helpers import (
    TODAY,
    Procs,
    Traffic,
    assert_buckets_exact,
    assert_rows_exact,
    fault_settings,
    logins,
    make_topics,
    unique,
    wait_until,
)
from tests.support.compare import rows_as_dicts
from tests.support.kafka import merge_ends, produce, wait_applied
from tests.test_consumer import running

pytestmark = pytest.mark.xdist_group("cluster")

PARTITIONS = 6
ASSIGNED = "resumes at stored offset"  # what a member logs for each partition it is given


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    handles = Procs(tmp_path)
    try:
        yield handles
    finally:
        handles.cleanup()


async def snapshot(store: SketchStore, workspaces: Iterable[Scope]) -> list[Any]:
    out = []
    for ws in sorted(workspaces):
        for window in Window:
            rows = await usage(store, ws, end=TODAY, period_length=50, window=window,
                               horizon=TODAY)
            out.append((ws, window, rows_as_dicts(rows)))
    return out


async def test_three_consumer_processes_and_then_four_count_what_one_counts(
    redis_cluster_url: str, kafka_bootstrap: str, procs: Procs
) -> None:
    settings = fault_settings(redis_cluster_url, kafka_bootstrap, redis_cluster=True)
    topic, bootstrap = settings.kafka_topic, settings.kafka_bootstrap_servers
    await make_topics(settings, partitions=PARTITIONS)
    first, second = logins(4000, seed=61), logins(3000, seed=62, tag="late-")
    ends = await produce(bootstrap, topic, first.values)
    assert sorted(ends) == list(range(PARTITIONS))

    async with open_store(settings) as store:
        members = [procs.consumer(settings, f"member{i}", REDIS_CLUSTER="true") for i in range(3)]
        await wait_applied(store, topic, ends, timeout=90)
        await assert_rows_exact(store, first.oracle(), first.workspaces)
        before = await snapshot(store, first.workspaces)

        # A fourth member joins: the group rebalances, every partition's new owner resumes from
        # the store's offsets, and no count moves.
        fourth = procs.consumer(settings, "member3", REDIS_CLUSTER="true")

        async def fourth_has_partitions() -> bool:
            return ASSIGNED in fourth.output(0)

        await wait_until(fourth_has_partitions, "the fourth member to be given partitions", 60,
                         context=procs.all_output)
        assert await snapshot(store, first.workspaces) == before

        # More traffic, now shared four ways.
        ends = merge_ends(ends, await produce(bootstrap, topic, second.values))
        await wait_applied(store, topic, ends, timeout=90)
        everyone = [*members, fourth]
        for member in everyone:  # all at once: each finishes its batch, commits, leaves
            member.proc.send_signal(signal.SIGTERM)
        for member in everyone:
            assert member.proc.wait(30) == 0, member.output()
        owners = [m.name for m in everyone if ASSIGNED in m.output(0)]
        assert len(owners) == 4, procs.all_output()  # every member did hold partitions

        both = Traffic(first.events + second.events)
        await assert_buckets_exact(store, both.events)
        await assert_rows_exact(store, both.oracle(), both.workspaces)
        shared = await snapshot(store, both.workspaces)

    # One consumer, the same topic, a store of its own: the same rows.
    alone = replaced(settings, redis_key_prefix=unique("one"), kafka_group_id=unique("group"))
    async with open_store(alone) as single:
        async with running(alone, single):
            await wait_applied(single, topic, ends, timeout=90)
        assert await snapshot(single, both.workspaces) == shared
