"""Hostile messages through the real consumer on the real broker (issue 11).

One ``usage-metrics consume`` process serves every example of the property: each example sends
one value of every hostile family (``tests.support.hostile``) between good logins, to both
partitions, and then checks that the same process still runs, every good login is counted, every
offset is committed, and each value that must be dead-lettered is in the dead-letter topic
exactly once, with its own bytes, while the ones the contract counts are not there at all.
``MAX_MESSAGE_BYTES`` is raised to 1 MiB so that 50,000 levels of nesting reach the decoders
instead of the size check.
"""

from __future__ import annotations

import asyncio
import random
import signal
import subprocess
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from sketches.config import Settings
from sketches.keys import Scope
from sketches.store import SketchStore
from tests.support.hostile import Case, good_events, one_of_each
from tests.support.kafka import committed, read_to_end
from tests.support.oracle import Oracle
from tests.test_consumer import check_against_oracle, cli, consumer_env
from usage_metrics.synth import SynthEvent

MAX_MESSAGE_BYTES = 1 << 20


@pytest.fixture
def sketch_mode() -> str:
    return "exact"  # a lost login must show as a wrong count


@dataclass
class Run:
    """What the examples share: the consumer process and everything sent so far."""

    proc: subprocess.Popen[bytes]
    log: Path
    pid: int
    # (partition, offset) -> the value sent there and whether it must be dead-lettered.
    sent: dict[tuple[int, int], tuple[bytes | None, bool]] = field(default_factory=dict)
    counted: list[SynthEvent] = field(default_factory=list)
    ends: dict[int, int] = field(default_factory=dict)

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


@pytest.fixture
def consumer(settings: Settings, topics: tuple[str, str], tmp_path: Path) -> Iterator[Run]:
    log = tmp_path / "consumer.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*cli(), "consume"], stdout=out, stderr=subprocess.STDOUT,
            env=consumer_env(settings, MAX_MESSAGE_BYTES=str(MAX_MESSAGE_BYTES),
                             PYTHONUNBUFFERED="1"),
        )
    run = Run(proc, log, proc.pid)
    try:
        yield run
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


@pytest.fixture
async def producer(settings: Settings) -> AsyncIterator[AIOKafkaProducer]:
    p = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers, linger_ms=2,
                         max_request_size=MAX_MESSAGE_BYTES * 2)
    await p.start()
    try:
        yield p
    finally:
        await p.stop()


async def wait_committed(settings: Settings, topic: str, ends: dict[int, int],
                         run: Run) -> None:
    deadline = time.monotonic() + 30
    while True:
        got = await committed(settings.kafka_bootstrap_servers, settings.kafka_group_id, topic,
                              sorted(ends))
        if all(got[p] == ends[p] for p in ends):
            return
        assert time.monotonic() < deadline, f"committed {got}, want {ends}\n{run.output()}"
        await asyncio.sleep(0.2)


# No shrinking: the examples share one consumer process, so once it is down every later example
# fails too, and the first failure, printed whole, is the one to read.
@settings(max_examples=12, deadline=None, phases=[Phase.explicit, Phase.reuse, Phase.generate],
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(
    cases=one_of_each(),
    good=st.lists(good_events(), min_size=1, max_size=6),
    seed=st.integers(0, 2**32 - 1),
)
async def test_hostile_values_between_good_logins_never_stop_the_consumer(
    settings: Settings, store: SketchStore, topics: tuple[str, str], consumer: Run,
    producer: AIOKafkaProducer, cases: list[Case], good: list[SynthEvent], seed: int,
) -> None:
    topic, dlq = topics
    rng = random.Random(seed)
    mixed: list[tuple[bytes | None, bool, SynthEvent | None]] = [
        *((c.value, c.counted is None, c.counted) for c in cases),
        *((e.to_json(), False, e) for e in good),
    ]
    rng.shuffle(mixed)
    # A tombstone (no value) needs a key: Kafka refuses a record with neither.
    futures = [await producer.send(topic, value, key=b"k" if value is None else None,
                                   partition=rng.randrange(2))
               for value, _, _ in mixed]
    for (value, dead, login), meta in zip(mixed, await asyncio.gather(*futures), strict=True):
        consumer.sent[(meta.partition, meta.offset)] = (value, dead)
        consumer.ends[meta.partition] = max(consumer.ends.get(meta.partition, 0),
                                            meta.offset + 1)
        if login is not None:
            consumer.counted.append(login)

    parts = sorted(consumer.ends)
    deadline = time.monotonic() + 60
    while True:
        assert consumer.proc.poll() is None, f"the consumer exited:\n{consumer.output()}"
        got = await store.applied_offsets([(topic, p) for p in parts])
        if all(g is not None and g >= consumer.ends[p] for g, p in zip(got, parts, strict=True)):
            break
        assert time.monotonic() < deadline, f"applied {got} of {consumer.ends}\n{consumer.output()}"
        await asyncio.sleep(0.1)
    assert consumer.proc.pid == consumer.pid
    await wait_committed(settings, topic, consumer.ends, consumer)

    letters = await read_to_end(settings.kafka_bootstrap_servers, dlq)
    per_source = Counter(
        (int(dict(r.headers)["dlq.source.partition"]), int(dict(r.headers)["dlq.source.offset"]))
        for r in letters
    )
    values = {(int(dict(r.headers)["dlq.source.partition"]),
               int(dict(r.headers)["dlq.source.offset"])): r.value for r in letters}
    for source, (value, dead) in consumer.sent.items():
        if dead:
            assert per_source[source] == 1, (source, per_source[source], value and value[:80])
            assert values[source] == value
        else:
            assert per_source[source] == 0, (source, value and value[:80])
    assert set(per_source) <= set(consumer.sent)

    oracle = Oracle((Scope(e.org_id, e.workspace_id), e.subject, e.timestamp.date())
                    for e in consumer.counted)
    for ws in oracle.days:
        await check_against_oracle(store, oracle, ws, "exact")
