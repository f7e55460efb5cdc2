"""Consumer processes killed with SIGKILL and group rebalances in the middle of batches.

Both tests run ``usage-metrics consume`` as real child processes against the session's broker and
Redis (only the consumers are harmed), in exact mode, and end by comparing every (workspace,
period) set with the subjects the events put there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random

import orjson
import pytest

from consumer.dlq import DeadLetters
from consumer.runner import GroupConsumer
from sketches.config import Settings
from sketches.store import SketchStore
from tests.faults.helpers import (
    Proc,
    Procs,
    Traffic,
    applied,
    assert_buckets_exact,
    assert_rows_exact,
    chunks,
    logins,
    make_topics,
    read_values,
    wait_until,
)
from tests.support.kafka import committed, merge_ends, produce, wait_applied

BAD = [
    b"not json",
    b"[1, 2]",
    orjson.dumps({"metric_type": "login", "subject": "x"}),
    orjson.dumps({"metric_type": "login", "subject": "x", "org_id": "o", "workspace_id": "w",
                  "timestamp": "1999-01-01T00:00:00Z"}),
]

REFUSED = "commit refused after a rebalance"

log = logging.getLogger(__name__)

ASSIGNED = ("resumes at stored offset", "the store holds no offset")


async def until_assigned(proc: Proc, since: int, procs: Procs) -> None:
    """Wait until the member logs an assignment of partitions after ``since`` (a log offset)."""

    async def assigned() -> bool:
        text = proc.output(0)[since:]
        return any(marker in text for marker in ASSIGNED)

    await wait_until(assigned, f"{proc.name} to be assigned partitions", 60, 0.05,
                     procs.all_output)


async def committed_all(settings: Settings, partitions: list[int]) -> dict[int, int | None]:
    return await committed(settings.kafka_bootstrap_servers, settings.kafka_group_id,
                           settings.kafka_topic, partitions)


@pytest.mark.slow
async def test_sigkill_at_random_points_many_times_then_counts_are_exact(
    xsettings: Settings, xstore: SketchStore, procs: Procs
) -> None:
    settings = xsettings
    await make_topics(settings, partitions=2)
    rng = random.Random(4242)
    traffic = logins(20_000, seed=1)
    values = traffic.values
    for i, bad in enumerate(BAD):  # a few dead letters among them, so kills hit those too
        values.insert(2000 + i * 4500, bad)
    parts = [0, 1]
    ends: dict[int, int] = {}
    kills = 8
    mid_stream = 0
    write_ahead_of_commit = 0
    # Traffic arrives in slices while the consumer is killed over and over: each life has work,
    # so each SIGKILL lands somewhere in a batch (fetch, write, dead letters, commit) at random.
    for life, piece in enumerate(chunks(values, len(values) // kills + 1)):
        ends = merge_ends(ends, await produce(settings.kafka_bootstrap_servers,
                                              settings.kafka_topic, piece))
        before = sum((await applied(xstore, settings.kafka_topic, parts)).values())
        consumer = procs.consumer(settings, f"life{life}", CONSUMER_MAX_BATCH="150")

        async def moved(before: int = before) -> bool:
            now = sum((await applied(xstore, settings.kafka_topic, parts)).values())
            return now > before

        await wait_until(moved, f"life {life} to make progress", 60, 0.02, procs.all_output)
        await asyncio.sleep(rng.uniform(0.0, 0.35))
        consumer.kill()
        at_kill = await applied(xstore, settings.kafka_topic, parts)
        if any(at_kill[p] < ends[p] for p in ends):
            mid_stream += 1
        done = await committed_all(settings, parts)
        if any((done[p] or 0) < at_kill[p] for p in parts):
            write_ahead_of_commit += 1
    # The kills really landed in the middle of the stream, not after it was done.
    assert mid_stream >= kills - 2, f"only {mid_stream} of {kills} kills came mid-stream"

    survivor = procs.consumer(settings, "survivor")
    await wait_applied(xstore, settings.kafka_topic, ends, timeout=90)

    async def lag_zero() -> bool:
        got = await committed_all(settings, parts)
        return all(got[p] == ends[p] for p in parts)

    await wait_until(lag_zero, "the group's committed offsets to reach the end", 30, 0.3,
                     survivor.output)
    assert survivor.terminate() == 0, survivor.output()

    await assert_buckets_exact(xstore, traffic.events)
    oracle = traffic.oracle()
    await assert_rows_exact(xstore, oracle, sorted(traffic.workspaces)[:2])
    # At least once: every bad message reached the dead-letter topic (a kill between the
    # dead letter and the commit may send one twice, never zero times).
    dead = await read_values(settings.kafka_bootstrap_servers, settings.kafka_dlq_topic,
                             set(BAD))
    assert set(dead) == set(BAD), "a dead letter was lost"
    log.info(f"kills={kills} mid_stream={mid_stream} write_ahead_of_commit={write_ahead_of_commit} "
          f"dead_letters={len(dead)}")


async def test_a_crash_after_the_store_write_loses_no_dead_letter(
    xsettings: Settings, xstore: SketchStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Deterministic version of a kill the test above hits only by chance: the process dies
    after the batch reached the store and before its dead letters reached the broker. The
    store's offsets decide where a restart resumes, so they must not pass a bad message whose
    dead letter was never acknowledged."""
    settings = xsettings
    await make_topics(settings, partitions=1)
    traffic = logins(50, seed=3)
    bad = b"{not json at all"
    ends = await produce(settings.kafka_bootstrap_servers, settings.kafka_topic,
                         [*traffic.values[:25], bad, *traffic.values[25:]])

    reached = asyncio.Event()

    async def stuck(self: DeadLetters, dead: object) -> None:
        reached.set()
        await asyncio.Event().wait()  # the broker never acknowledges: we crash first

    monkeypatch.setattr(DeadLetters, "send", stuck)
    stop = asyncio.Event()
    first = asyncio.create_task(GroupConsumer(settings, xstore).run(stop))
    await asyncio.wait_for(reached.wait(), 60)
    first.cancel()  # the crash: nothing after this point of the batch happens
    with contextlib.suppress(asyncio.CancelledError):
        await first
    monkeypatch.undo()

    second = asyncio.create_task(GroupConsumer(settings, xstore).run(stop))
    try:
        await wait_applied(xstore, settings.kafka_topic, ends, timeout=60)
    finally:
        stop.set()
        await asyncio.wait_for(second, 30)
    dead = await read_values(settings.kafka_bootstrap_servers, settings.kafka_dlq_topic, {bad},
                             timeout=10)
    assert bad in dead, "the dead letter was lost: the store's offsets had moved past it"
    await assert_buckets_exact(xstore, traffic.events)


@pytest.mark.slow
async def test_rebalances_mid_batch_with_a_slow_member_members_joining_and_leaving(
    xsettings: Settings, xstore: SketchStore, procs: Procs
) -> None:
    settings = xsettings
    await make_topics(settings, partitions=4)
    parts = [0, 1, 2, 3]
    traffic = logins(20_000, seed=2)
    slices = list(chunks(traffic.values, 5000))
    ends = await produce(settings.kafka_bootstrap_servers, settings.kafka_topic, slices[0])

    # The slow member: tiny batches (many write/commit points), and frozen now and then.
    slow = procs.consumer(settings, "slow", CONSUMER_MAX_BATCH="40")
    await until_assigned(slow, 0, procs)
    steady = procs.consumer(settings, "steady", CONSUMER_MAX_BATCH="500")
    await until_assigned(steady, 0, procs)

    # 1. Freeze the slow member while it holds partitions, in the middle of its stream of small
    #    batches, for longer than its session: the group moves its partitions away. 2. A member
    #    joins meanwhile. When the slow one thaws, its batch is stale and its commit is refused
    #    (CommitFailedError), which must not kill it. A freeze that caught it between batches
    #    ends in a plain rejoin instead: then freeze it again once it holds partitions again.
    extra = logins(4000, seed=22).events
    sent = list(traffic.events)
    joiner: Proc | None = None
    mark = 0
    for attempt in range(4):
        await until_assigned(slow, mark, procs)
        await asyncio.sleep(0.3)
        slow.pause()
        more = [*slices[1 + attempt]] if attempt < 2 else []
        more_events = extra[attempt::4]
        ends = merge_ends(ends, await produce(
            settings.kafka_bootstrap_servers, settings.kafka_topic,
            [*more, *(e.to_json() for e in more_events)]))
        sent.extend(more_events)
        await asyncio.sleep(3.0)
        if joiner is None:
            joiner = procs.consumer(settings, "joiner", CONSUMER_MAX_BATCH="200")
        mark = len(slow.output(0))
        slow.resume()

        async def noticed(mark: int = mark) -> bool:
            text = slow.output(0)[mark:]
            return REFUSED in text or "partitions revoked" in text

        await wait_until(noticed, "the thawed member to notice the rebalance", 30, 0.1,
                         procs.all_output)
        if REFUSED in slow.output(0):
            break
    assert REFUSED in slow.output(0), "no commit was refused: the scenario did not happen"
    assert joiner is not None
    ends = merge_ends(ends, await produce(settings.kafka_bootstrap_servers, settings.kafka_topic,
                                          slices[3]))
    if attempt == 0:  # the second slice went out only if a second freeze was needed
        ends = merge_ends(ends, await produce(settings.kafka_bootstrap_servers,
                                              settings.kafka_topic, slices[2]))
    traffic = Traffic(sent)
    # 3. Short freezes (within the session): slow, but still a member.
    for _ in range(3):
        await asyncio.sleep(0.4)
        slow.pause()
        await asyncio.sleep(0.6)
        slow.resume()
    # 4. A member leaves cleanly while the others work.
    assert steady.terminate() == 0, steady.output()

    await wait_applied(xstore, settings.kafka_topic, ends, timeout=90)

    async def lag_zero() -> bool:
        got = await committed_all(settings, parts)
        return all(got.get(p) == ends.get(p, 0) or (p not in ends and got.get(p) is None)
                   for p in parts)

    await wait_until(lag_zero, "committed offsets == end offsets", 45, 0.3, procs.all_output)
    stored = await applied(xstore, settings.kafka_topic, parts)
    assert stored == {p: ends.get(p, 0) for p in parts}

    # Nobody crashed: the members still running leave cleanly with status 0.
    for member in (slow, joiner):
        assert member.alive(), f"{member.name} died:\n{member.output()}"
    for member in (slow, joiner):
        assert member.terminate() == 0, member.output()
    for member in (slow, joiner, steady):
        assert "Traceback" not in member.output(0), member.output()

    await assert_buckets_exact(xstore, traffic.events)
    await assert_rows_exact(xstore, traffic.oracle(), sorted(traffic.workspaces)[:2])
    log.info("slow member's log:\n" + "\n".join(
        line for line in slow.output(0).splitlines()
        if "revoked" in line or "refused" in line or "resumes" in line or "WARN" in line
    ))
