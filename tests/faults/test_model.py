"""A model-based test: Hypothesis picks a sequence of publishes and faults, and after the system
settles, every bucket equals the oracle.

Rules: publish logins of one or several orgs; start a consumer process (a second one makes the
group rebalance); SIGKILL one; SIGTERM one (it leaves the group); SIGKILL Redis and restart it
on its AOF; replay the topic from the beginning. The model is the list of published events. At
the end of each run the machine makes sure a consumer runs, waits until the store has applied
every partition to its end and the group has committed it, and compares every (workspace,
period) set with the model: equal, and no subject of one org under another.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    precondition,
    rule,
    run_state_machine_as_test,
)

from consumer.replay import ReplayStart, replay
from sketches.connection import open_store
from tests.faults.helpers import (
    Proc,
    Procs,
    assert_buckets_exact,
    fault_settings,
    logins,
    make_topics,
    unique,
    wait_until,
)
from tests.support.kafka import committed, merge_ends, produce, wait_applied
from tests.support.servers import RedisServer
from usage_metrics.synth import SynthEvent

ORGS = ("acme", "globex", "initech", "umbrella")


@pytest.mark.slow
def test_publish_kill_restart_rebalance_replay_then_every_bucket_equals_the_oracle(
    own_redis: RedisServer, kafka_bootstrap: str, tmp_path: Path
) -> None:
    redis = own_redis

    class Machine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.loop = asyncio.new_event_loop()
            self.settings = fault_settings(redis.url, kafka_bootstrap)
            directory = tmp_path / unique("run")
            directory.mkdir()
            self.procs = Procs(directory)
            self.running: list[Proc] = []
            self.events: list[SynthEvent] = []
            self.ends: dict[int, int] = {}
            self.seeds = 0
            self.run(make_topics(self.settings, partitions=2))

        def run(self, coro: object) -> object:
            return self.loop.run_until_complete(coro)  # type: ignore[arg-type]

        @initialize(n=st.integers(200, 600))
        def traffic_and_a_consumer(self, n: int) -> None:
            # Every run starts with data of every org and a consumer at work, so that each fault
            # the rules pick lands on a system that is doing something.
            self.publish(list(ORGS), n)
            self.start_consumer()

        @rule(orgs=st.lists(st.sampled_from(ORGS), min_size=1, max_size=3, unique=True),
              n=st.integers(1, 400))
        def publish(self, orgs: list[str], n: int) -> None:
            self.seeds += 1
            batch = logins(n, orgs=tuple(orgs), users=60, days=40, seed=self.seeds).events
            self.ends = merge_ends(self.ends, self.run(produce(
                self.settings.kafka_bootstrap_servers, self.settings.kafka_topic,
                [e.to_json() for e in batch])))  # type: ignore[arg-type]
            self.events.extend(batch)

        @precondition(lambda self: len(self.running) < 2)
        @rule()
        def start_consumer(self) -> None:
            self.running.append(self.procs.consumer(self.settings, CONSUMER_MAX_BATCH="100"))

        @precondition(lambda self: bool(self.running))
        @rule(which=st.integers(0, 1), after=st.floats(0.0, 1.5))
        def kill_consumer(self, which: int, after: float) -> None:
            time.sleep(after)
            self.running.pop(which % len(self.running)).kill()

        @precondition(lambda self: bool(self.running))
        @rule(which=st.integers(0, 1))
        def stop_consumer(self, which: int) -> None:
            proc = self.running.pop(which % len(self.running))
            started = "consuming" in proc.output(0)
            status = proc.terminate()
            # Once running, SIGTERM means: finish the batch, commit, leave, exit 0. A process
            # still importing has no handler yet and dies of the signal, with nothing to lose.
            assert status == 0 or (status == -signal.SIGTERM and not started), proc.output()

        @rule()
        def restart_redis(self) -> None:
            redis.kill()
            redis.start()

        @rule()
        def replay_from_beginning(self) -> None:
            async def go() -> None:
                async with open_store(self.settings) as store:
                    await replay(self.settings, store, ReplayStart("beginning"))

            self.run(go())

        def teardown(self) -> None:
            try:
                if self.events:
                    self.settle_and_check()
            finally:
                self.procs.cleanup()
                self.loop.close()
                shutil.rmtree(self.procs.directory, ignore_errors=True)

        def settle_and_check(self) -> None:
            for proc in self.running:
                assert proc.alive(), f"a consumer died on its own:\n{proc.output()}"
            if not self.running:
                self.running.append(self.procs.consumer(self.settings))
            settings_, ends = self.settings, self.ends

            async def check() -> None:
                async with open_store(settings_) as store:
                    await wait_applied(store, settings_.kafka_topic, ends, timeout=90)

                    async def lag_zero() -> bool:
                        got = await committed(settings_.kafka_bootstrap_servers,
                                              settings_.kafka_group_id, settings_.kafka_topic,
                                              sorted(ends))
                        return all(got[p] == ends[p] for p in ends)

                    await wait_until(lag_zero, "the group to commit the end", 60, 0.3,
                                     self.procs.all_output)
                    await assert_buckets_exact(store, self.events)

            self.run(check())

    run_state_machine_as_test(
        Machine,
        settings=settings(max_examples=6, stateful_step_count=8, deadline=None, database=None,
                          suppress_health_check=list(HealthCheck)),
    )
