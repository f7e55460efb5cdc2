"""Fair admission of heavy recomputes (sketches/admission.py), driven by asyncio events.

Each holder of a slot is a task parked on an event of its own; the test decides when each slot
frees, so every outcome is decided by the order of events, never by how long anything took. The
only timer used is the bounded wait itself, where it must run out (nothing will free a slot).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from sketches.admission import HEAVY_READS, Admission
from sketches.config import Settings
from sketches.errors import QueryBusy

HEAVY = HEAVY_READS + 1
FOREVER = 3600.0  # a wait that never runs out within a test


class Holder:
    """A task that takes a slot for ``org`` and keeps it until ``done`` is set."""

    def __init__(self, admission: Admission, org: str, log: list[str], reads: int = HEAVY):
        self.org = org
        self.done = asyncio.Event()
        self.entered = asyncio.Event()
        self.task = asyncio.create_task(self._run(admission, reads, log))

    async def _run(self, admission: Admission, reads: int, log: list[str]) -> None:
        async with admission.slot(self.org, reads):
            log.append(self.org)
            self.entered.set()
            await self.done.wait()

    async def finish(self) -> None:
        self.done.set()
        await self.task


async def settle() -> None:
    """Let every ready task run until none is left ready."""
    for _ in range(20):
        await asyncio.sleep(0)


async def until(done: Callable[[], bool]) -> None:
    """Yield to the loop until ``done()``: counted in turns of the loop, never in seconds."""
    for _ in range(100_000):
        if done():
            return
        await asyncio.sleep(0)
    raise AssertionError("the awaited state never came")


async def test_light_work_never_takes_a_slot_nor_waits() -> None:
    admission = Admission(1, wait_s=FOREVER)
    log: list[str] = []
    heavy = Holder(admission, "a", log)
    await heavy.entered.wait()
    async with admission.slot("a", HEAVY_READS):  # at the threshold: light
        assert admission.in_use == 1
    assert admission.waiting() == 0
    await heavy.finish()
    assert admission.in_use == 0


async def test_zero_slots_means_no_bound() -> None:
    admission = Admission(0)
    log: list[str] = []
    holders = [Holder(admission, "a", log) for _ in range(10)]
    await asyncio.gather(*(h.entered.wait() for h in holders))
    assert admission.in_use == 0  # nothing counted, nothing refused
    for h in holders:
        await h.finish()


async def test_one_org_holds_at_most_its_share_and_another_org_gets_the_rest() -> None:
    admission = Admission(4, per_org=2, wait_s=FOREVER)
    log: list[str] = []
    flood = [Holder(admission, "flood", log) for _ in range(6)]
    await until(lambda: admission.waiting("flood") == 4)
    assert admission.held("flood") == 2
    assert admission.in_use == 2  # two slots stay free for everyone else
    others = [Holder(admission, "b", log), Holder(admission, "c", log)]
    await asyncio.gather(*(o.entered.wait() for o in others))  # no wait at all
    assert admission.in_use == 4
    assert log == ["flood", "flood", "b", "c"]
    assert admission.orgs == 3
    for h in [*flood, *others]:
        await h.finish()
    assert admission.in_use == 0
    assert admission.waiting() == 0
    assert admission.orgs == 0  # nothing kept of orgs that neither hold nor wait


async def test_a_freed_slot_goes_to_the_org_holding_fewest_then_orgs_in_turn() -> None:
    admission = Admission(2, per_org=2, wait_s=FOREVER)
    log: list[str] = []
    a1, a2 = Holder(admission, "a", log), Holder(admission, "a", log)
    await asyncio.gather(a1.entered.wait(), a2.entered.wait())
    a3 = Holder(admission, "a", log)  # waits first
    await until(lambda: admission.waiting("a") == 1)
    b1 = Holder(admission, "b", log)  # waits second, but its org holds nothing
    b2 = Holder(admission, "b", log)
    await until(lambda: admission.waiting("b") == 2)
    await a1.finish()
    await b1.entered.wait()  # "b" holds 0 < "a" holds 1: b first, though a3 came earlier
    assert log == ["a", "a", "b"]
    await a2.finish()
    await a3.entered.wait()  # now both hold one: a's turn, b was served last
    assert log == ["a", "a", "b", "a"]
    await b1.finish()
    await b2.entered.wait()
    for h in (a3, b2):
        await h.finish()
    assert admission.in_use == 0


async def test_a_newcomer_never_overtakes_a_waiter_of_the_same_standing() -> None:
    admission = Admission(1, per_org=1, wait_s=FOREVER)
    log: list[str] = []
    first = Holder(admission, "a", log)
    await first.entered.wait()
    waiter = Holder(admission, "b", log)
    await until(lambda: admission.waiting() == 1)
    await first.finish()  # the slot goes to b's waiter in the same step it frees
    late = Holder(admission, "c", log)
    await waiter.entered.wait()
    await settle()
    assert log == ["a", "b"]
    assert admission.waiting("c") == 1
    await waiter.finish()
    await late.finish()
    assert log == ["a", "b", "c"]


async def test_the_wait_is_bounded_and_then_it_is_busy() -> None:
    admission = Admission(1, wait_s=0.01)
    log: list[str] = []
    holder = Holder(admission, "a", log)
    await holder.entered.wait()
    with pytest.raises(QueryBusy, match="heavy recomputes: no slot free within"):
        async with admission.slot("b", HEAVY):
            pytest.fail("no slot was free")
    assert admission.waiting() == 0  # the expired waiter is gone
    assert admission.orgs == 1
    await holder.finish()
    async with admission.slot("b", HEAVY):  # and the slot serves the next one
        assert admission.in_use == 1


async def test_no_wait_refuses_at_once() -> None:
    admission = Admission(1, wait_s=0)
    log: list[str] = []
    holder = Holder(admission, "a", log)
    await holder.entered.wait()
    with pytest.raises(QueryBusy, match=r"heavy recomputes: no slot free \(1 at once"):
        async with admission.slot("b", HEAVY):
            pytest.fail("no slot was free")
    assert admission.waiting() == 0  # it never queued
    await holder.finish()


async def test_a_flood_beyond_the_queue_is_refused_at_once_and_another_org_is_served_in_turn(
) -> None:
    admission = Admission(1, per_org=1, wait_s=FOREVER, queue_per_org=3)
    log: list[str] = []
    holder = Holder(admission, "flood", log)
    await holder.entered.wait()
    queued = [Holder(admission, "flood", log) for _ in range(3)]
    await until(lambda: admission.waiting("flood") == 3)
    with pytest.raises(QueryBusy, match="heavy recomputes: 3 of this org already wait"):
        async with admission.slot("flood", HEAVY):
            pytest.fail("the queue was full")
    other = Holder(admission, "b", log)  # another org's queue is its own
    await until(lambda: admission.waiting("b") == 1)
    await holder.finish()
    await queued[0].entered.wait()  # the flood was waiting first
    await queued[0].finish()
    await other.entered.wait()  # then b's turn, not the rest of the flood's queue
    assert log == ["flood", "flood", "b"]
    for h in (other, *queued[1:]):
        await h.finish()
    assert log == ["flood", "flood", "b", "flood", "flood"]
    assert admission.in_use == 0
    assert admission.orgs == 0


async def test_a_waiter_cancelled_in_the_queue_leaves_it_and_takes_nothing() -> None:
    admission = Admission(1, wait_s=FOREVER)
    log: list[str] = []
    holder = Holder(admission, "a", log)
    await holder.entered.wait()
    gone = Holder(admission, "b", log)
    await until(lambda: admission.waiting() == 1)
    gone.task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone.task
    assert admission.waiting() == 0
    assert admission.orgs == 1  # b left no trace: only a, which holds its slot
    await holder.finish()
    assert admission.in_use == 0
    assert log == ["a"]


async def test_a_waiter_cancelled_after_its_grant_gives_the_slot_back() -> None:
    admission = Admission(1, wait_s=FOREVER)
    log: list[str] = []
    mine = admission.slot("a", HEAVY)
    await mine.__aenter__()  # held by this task, so that it frees the slot without yielding
    unlucky = Holder(admission, "b", log)
    nxt = Holder(admission, "c", log)
    await until(lambda: admission.waiting() == 2)
    await mine.__aexit__(None, None, None)  # the slot goes to b's waiter, b has not run yet
    assert admission.waiting() == 1
    unlucky.task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await unlucky.task
    await nxt.entered.wait()  # the slot b never used went on to c
    await nxt.finish()
    assert log == ["c"]
    assert admission.in_use == 0


async def test_a_cancelled_waiter_is_skipped_when_slots_are_handed_out() -> None:
    admission = Admission(1, wait_s=FOREVER)
    log: list[str] = []
    mine = admission.slot("a", HEAVY)
    await mine.__aenter__()  # held by this task, so that it frees the slot without yielding
    gone, nxt = Holder(admission, "b", log), Holder(admission, "c", log)
    await until(lambda: admission.waiting() == 2)
    gone.task.cancel()  # its future is cancelled now, its task runs only later
    await mine.__aexit__(None, None, None)  # hands the slot out before b's task ran
    with pytest.raises(asyncio.CancelledError):
        await gone.task
    await nxt.entered.wait()
    await nxt.finish()
    assert log == ["c"]
    assert admission.in_use == 0
    assert admission.waiting() == 0


async def test_an_error_inside_the_slot_frees_it() -> None:
    admission = Admission(1, wait_s=0)
    with pytest.raises(RuntimeError):
        async with admission.slot("a", HEAVY):
            raise RuntimeError("the recompute failed")
    assert admission.in_use == 0
    async with admission.slot("a", HEAVY):
        pass


def test_shares_and_settings() -> None:
    assert Admission(4).per_org == 2  # half, rounded up
    assert Admission(5).per_org == 3
    assert Admission(1).per_org == 1
    assert Admission(4, per_org=9).per_org == 4  # never more than the slots
    settings = Settings(api_max_expensive_queries=6, api_max_expensive_per_org=1,
                        api_expensive_wait_s=0.5, api_expensive_queue_per_org=3,
                        _env_file=None)
    made = Admission.from_settings(settings)
    assert (made.slots, made.per_org, made.wait_s, made.queue_per_org) == (6, 1, 0.5, 3)
    default = Admission.from_settings(Settings(_env_file=None))
    assert (default.slots, default.per_org, default.wait_s, default.queue_per_org) == (
        4, 2, 2.0, 16)
