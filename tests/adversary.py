"""A model-based adversary of the store and its answers (Hypothesis stateful), shared by the one-
Redis run (``tests/test_adversary.py``) and the cluster run (``tests/cluster``).

The machine writes batches of any size across call boundaries, asks with the response cache on
(from one API process, and from a fresh one that only sees Redis), lets a rebuild begin, fill,
switch or be cancelled around everything else, and at any round trip of a request: writes,
deletes or loses any subset of keys (the meta alone, the stored result alone, some sketches),
jumps the counter near 2**32 and where Lua's doubles end, and moves the clock across local
midnights in zones from UTC-12 to UTC+14, with keys expiring at their real deadlines.

Every answer is compared with a direct computation (``sketches.query.usage``) from the keys present
when the request began; an answer around a concurrent change may hold, row by row, the state before
or after it (a rebuild's switch: the whole answer one or the other), and the next answer must be
exact again.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Awaitable, Callable, Coroutine
from datetime import UTC, date, datetime, timedelta
from typing import Any, TypeVar

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import sketches.results as results_module
import sketches.store as store_module
from sketches import scope_settings as wss
from sketches.errors import RebuildInterrupted
from sketches.keys import Scope
from sketches.query import ALL_METRICS, Metric, Window, usage
from sketches.results import Answers, Query, Series
from sketches.scope_settings import OrgSettings, WorkspaceSettings, zone
from sketches.store import SketchStore
from sketches.writes import COUNTER_WRAP

RETENTION = 60
"""Short, so that the moving clock takes keys past their deadlines within a run."""
ZONES = ["Etc/GMT+12", "America/Los_Angeles", "UTC", "Asia/Kolkata", "Pacific/Chatham",
         "Pacific/Kiritimati"]
ORG = "adv"
WORKSPACES = [Scope(ORG, "w1"), Scope(ORG, "w2")]
SCOPES = [*WORKSPACES, Scope(ORG, "")]
SUBJECTS = [f"s{i}" for i in range(12)]
T = TypeVar("T")


def render(series: Series) -> bytes:
    return json.dumps([series.dates, series.dau, series.wau, series.mau]).encode()


class Adversary(RuleBasedStateMachine):
    """Set ``store`` and ``loop`` on a subclass before running it."""

    store: SketchStore
    loop: asyncio.AbstractEventLoop

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)

    @initialize(
        zones=st.lists(st.sampled_from(ZONES), min_size=3, max_size=3),
        sundays=st.lists(st.booleans(), min_size=3, max_size=3),
        hours=st.integers(0, 23),
    )
    def start(self, zones: list[str], sundays: list[bool], hours: int) -> None:
        self.run(self._wipe())
        base = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
        self.now = base + timedelta(hours=hours)
        self.store.clock = lambda: self.now.timestamp()
        self.store.members_per_call = 4
        self.tz: dict[Scope, str] = {}
        self.week: dict[Scope, str] = {}
        for scope, tz, sunday in zip(SCOPES, zones, sundays, strict=True):
            self._settle(scope, tz, "sunday" if sunday else "monday")
        self.logins: list[tuple[Scope, str, datetime]] = []
        self.answers = self._answers()
        self.building: dict[Scope, int] = {}

    # ---------------------------------------------------------------------------------------
    # helpers

    def _answers(self) -> Answers:
        return Answers(self.store, retention_days=RETENTION, default_timezone="UTC",
                       cache_entries=64)

    async def _wipe(self) -> None:
        prefix = self.store.keys.prefix + ":*"
        keys = [k async for k in self.store.client.scan_iter(match=prefix, count=1000)]
        for i in range(0, len(keys), 500):
            await self.store.client.delete(*keys[i : i + 500])

    def _settle(self, scope: Scope, tz: str, week: str) -> None:
        self.tz[scope], self.week[scope] = tz, week
        model: WorkspaceSettings | OrgSettings = (
            OrgSettings(timezone=tz, week_start=week) if scope.is_org  # type: ignore[arg-type]
            else WorkspaceSettings(timezone=tz, week_start=week)  # type: ignore[arg-type]
        )
        self.run(wss.save(self.store.client, self.store.keys, scope, model))

    def today(self, scope: Scope) -> date:
        return self.now.astimezone(zone(self.tz[scope])).date()

    def local_day(self, scope: Scope, moment: datetime) -> date:
        return moment.astimezone(zone(self.tz[scope])).date()

    async def _write(
        self, logins: list[tuple[Scope, str, datetime]], building: dict[Scope, int] | None
    ) -> None:
        days: dict[tuple[Scope, date], set[str]] = {}
        for ws, subject, moment in logins:
            for scope in (ws, ws.org):
                if building is not None and scope not in building:
                    continue
                days.setdefault((scope, self.local_day(scope, moment)), set()).add(subject)
        week_starts: Any = {scope: self.week[scope] for scope, _ in days}
        await self.store.add_by_day(days, week_starts, building=building)

    def query_of(self, scope: Scope, window: Window, metrics: frozenset[Metric],
                 length: int, back: int) -> Query:
        today = self.today(scope)
        return Query(today - timedelta(days=back), length, metrics, window, today)

    async def direct(self, scope: Scope, query: Query) -> list[Any]:
        rows = await usage(
            self.store, scope, end=query.end, period_length=query.period_length,
            metrics=query.metrics or ALL_METRICS, window=query.window,
            horizon=query.today - timedelta(days=RETENTION),
            week_start=self.week[scope],  # type: ignore[arg-type]
        )
        return json.loads(render(Series.of_rows(rows)))

    async def ask(self, answers: Answers, scope: Scope, query: Query) -> list[Any]:
        snap = await answers.snapshot(scope)
        body, _ = await answers.answer(snap, query, render, "json")
        return json.loads(body)

    async def _expire(self) -> None:
        """Keys whose deadline the moved clock has passed go, as Redis would delete them."""
        client = self.store.client
        keys = [k async for k in client.scan_iter(match=self.store.keys.prefix + ":*",
                                                   count=1000)]
        if not keys:
            return
        pipe = client.pipeline(transaction=False)
        for k in keys:
            pipe.expiretime(k)
        deadlines = await pipe.execute()
        now = self.now.timestamp()
        gone = [k for k, at in zip(keys, deadlines, strict=True) if 0 < int(at) <= now]
        if gone:
            await client.delete(*gone)

    def _interleaved(self, at: int, action: Callable[[], Awaitable[None]]) -> list[bool]:
        ran = [False]
        seen = [0]
        real = store_module.run_pipeline

        async def hooked(client: Any, commands: Any) -> list[Any]:
            seen[0] += 1
            if seen[0] == at and not ran[0]:
                ran[0] = True
                await action()
            return await real(client, commands)

        results_module.run_pipeline = hooked  # type: ignore[assignment]
        store_module.run_pipeline = hooked  # type: ignore[assignment]
        self._restore = real
        return ran

    def _uninterleave(self) -> None:
        results_module.run_pipeline = self._restore  # type: ignore[assignment]
        store_module.run_pipeline = self._restore  # type: ignore[assignment]

    # ---------------------------------------------------------------------------------------
    # rules

    @rule(
        size=st.integers(1, 30),
        back_hours=st.lists(st.integers(0, 24 * 70), min_size=1, max_size=30),
        data=st.data(),
    )
    def write(self, size: int, back_hours: list[int], data: st.DataObject) -> None:
        logins = []
        for i in range(size):
            ws = data.draw(st.sampled_from(WORKSPACES))
            moment = self.now - timedelta(hours=back_hours[i % len(back_hours)])
            logins.append((ws, data.draw(st.sampled_from(SUBJECTS)), moment))
        self.logins.extend(logins)
        self.run(self._write(logins, None))

    @rule(
        scope=st.sampled_from(SCOPES),
        window=st.sampled_from(list(Window)),
        metrics=st.sampled_from([ALL_METRICS, frozenset({Metric.DAU}),
                                 frozenset({Metric.WAU}), frozenset({Metric.MAU})]),
        length=st.sampled_from([0, 6, 20, 27, RETENTION + 5]),
        back=st.integers(0, 3),
        fresh=st.booleans(),
    )
    def ask_and_compare(self, scope: Scope, window: Window, metrics: frozenset[Metric],
                        length: int, back: int, fresh: bool) -> None:
        query = self.query_of(scope, window, metrics, length, back)
        want = self.run(self.direct(scope, query))
        answers = self._answers() if fresh else self.answers
        got = self.run(self.ask(answers, scope, query))
        assert got == want, (scope, query)
        self.run(answers.drain())

    @rule(
        scope=st.sampled_from(SCOPES),
        at=st.integers(1, 6),
        what=st.sampled_from(["write", "lose-sketch", "lose-meta", "lose-result", "switch"]),
        window=st.sampled_from(list(Window)),
        data=st.data(),
    )
    def ask_while_something_happens(self, scope: Scope, at: int, what: str, window: Window,
                                    data: st.DataObject) -> None:
        query = self.query_of(scope, window, ALL_METRICS, 20, 0)
        before = self.run(self.direct(scope, query))
        if what == "switch" and not self.building:
            what = "write"
        action = self._action(what, scope, data)
        ran = self._interleaved(at, action)
        try:
            got = self.run(self.ask(self.answers, scope, query))
            self.run(self.answers.drain())
        finally:
            self._uninterleave()
        if not ran[0]:
            self.run(action())
        after = self.run(self.direct(scope, query))
        if what == "switch":
            assert got in (before, after)  # never a mix of two generations
        else:
            for column in range(1, 4):
                for i, value in enumerate(got[column]):
                    assert value in (before[column][i], after[column][i]), (what, column, i)
        again = self.run(self.ask(self.answers, scope, query))
        assert again == after

    @rule(scope=st.sampled_from(SCOPES), at=st.integers(1, 6), window=st.sampled_from(list(Window)),
          data=st.data())
    @precondition(lambda self: bool(self.building))
    def ask_while_a_rebuild_switches(self, scope: Scope, at: int, window: Window,
                                     data: st.DataObject) -> None:
        self.fill_rebuild()
        if self.building:
            self.ask_while_something_happens(scope, at, "switch", window, data)

    def _action(self, what: str, scope: Scope, data: st.DataObject
                ) -> Callable[[], Awaitable[None]]:
        keys = self.store.keys
        client = self.store.client
        if what == "write":
            ws = scope if not scope.is_org else data.draw(st.sampled_from(WORKSPACES))
            login = (ws, data.draw(st.sampled_from(SUBJECTS)),
                     self.now - timedelta(hours=data.draw(st.integers(0, 24 * 20))))
            self.logins.append(login)
            return lambda: self._write([login], None)
        if what == "lose-meta":
            async def lose_meta() -> None:
                await client.delete(keys.meta(scope))
            return lose_meta
        if what == "lose-result":
            async def lose_result() -> None:
                await client.delete(keys.result(scope, "v1"))
            return lose_result
        if what == "switch":
            return self._finish
        pick = data.draw(st.integers(0, 2**32))

        async def lose_sketch() -> None:
            names = sorted([k async for k in client.scan_iter(
                match=keys.sketch_head(scope) + ":[dwsm]:*", count=1000)])
            if names:
                await client.delete(names[pick % len(names)])
        return lose_sketch

    async def _finish(self) -> None:
        building, self.building = self.building, {}
        if not building:
            return
        try:
            await self.store.finish_rebuild(building)
        except RebuildInterrupted:
            # The meta went (and its rebuild marker with it): the switch is refused and the
            # live sketches stay, which the comparisons check. Clean up as the CLI does.
            marked = [await self.store.client.hexists(self.store.keys.meta(s), "b")
                      for s in building]
            assert not all(marked)
            await self.store.cancel_rebuild(building)

    @rule(scopes=st.lists(st.sampled_from(SCOPES), min_size=1, max_size=3, unique=True),
          new_zone=st.sampled_from(ZONES))
    @precondition(lambda self: not self.building)
    def begin_rebuild(self, scopes: list[Scope], new_zone: str) -> None:
        for scope in scopes:  # a timezone change is what a rebuild is for
            self._settle(scope, new_zone, self.week[scope])
        self.building = self.run(self.store.begin_rebuild(scopes))

    @rule()
    @precondition(lambda self: bool(self.building))
    def fill_rebuild(self) -> None:
        try:
            self.run(self._write(list(self.logins), dict(self.building)))
        except RebuildInterrupted:  # its meta went: as above
            building, self.building = self.building, {}
            self.run(self.store.cancel_rebuild(building))

    @rule()
    @precondition(lambda self: bool(self.building))
    def finish_rebuild(self) -> None:
        self.run(self._finish())

    @rule()
    @precondition(lambda self: bool(self.building))
    def cancel_rebuild(self) -> None:
        building, self.building = self.building, {}
        self.run(self.store.cancel_rebuild(building))

    @rule(scope=st.sampled_from(SCOPES), what=st.sampled_from(["meta", "result", "both"]))
    def lose(self, scope: Scope, what: str) -> None:
        keys = self.store.keys
        names = {"meta": [keys.meta(scope)], "result": [keys.result(scope, "v1")],
                 "both": [keys.meta(scope), keys.result(scope, "v1")]}[what]
        self.run(self.store.client.delete(*names))

    @rule(scope=st.sampled_from(SCOPES), near=st.sampled_from([2**32 - 2, COUNTER_WRAP - 2]))
    def jump_counter(self, scope: Scope, near: int) -> None:
        meta = self.store.keys.meta(scope)

        async def jump() -> None:
            if await self.store.client.hexists(meta, "n"):
                await self.store.client.hset(meta, "n", near)
        self.run(jump())

    @rule(hours=st.integers(1, 40))
    def move_clock(self, hours: int) -> None:
        self.now += timedelta(hours=hours)
        self.run(self._expire())

    @invariant()
    def still_interleaving_nothing(self) -> None:
        assert store_module.run_pipeline is results_module.run_pipeline


def _phases() -> list[Any]:
    from hypothesis import Phase

    # Shrinking a failing run of this machine can take many minutes: on when asked for
    # (ADVERSARY_SHRINK=1), else the failing steps are printed as generated.
    base = [Phase.explicit, Phase.reuse, Phase.generate]
    return [*base, Phase.shrink] if os.environ.get("ADVERSARY_SHRINK") else base


PHASES = _phases()


def run_adversary(settings: Any, max_examples: int, steps: int) -> None:
    """Run the machine against a store opened from ``settings`` on an event loop of its own
    (Hypothesis drives the machine synchronously)."""
    from hypothesis import HealthCheck
    from hypothesis import settings as hyp_settings
    from hypothesis.stateful import run_state_machine_as_test

    from sketches.connection import open_store

    loop = asyncio.new_event_loop()
    opened = open_store(settings)
    store = loop.run_until_complete(opened.__aenter__())
    try:
        class Bound(Adversary):
            pass

        Bound.store = store
        Bound.loop = loop
        run_state_machine_as_test(
            Bound,
            settings=hyp_settings(max_examples=max_examples, stateful_step_count=steps,
                                  deadline=None, suppress_health_check=list(HealthCheck),
                                  derandomize=True, phases=PHASES),
        )
    finally:
        loop.run_until_complete(opened.__aexit__(None, None, None))
        loop.close()
