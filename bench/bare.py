"""The ingestion ceiling: a bare aiokafka consumer that only reads and JSON-decodes the topic.

Run as its own process (``python -m bench.bare``), like the service's consumer, with the very
fetch settings the service uses (``consumer.kafka.make_kafka_consumer``) and the same batch size,
so that the difference between the two is the service's own work. Prints one JSON line.

The rate counts the messages after the first batch over the time from the end of the first batch
to the end of the last one, exactly as the service's rate is taken from its stored offsets.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

import orjson
from aiokafka.structs import TopicPartition

from consumer.kafka import make_kafka_consumer
from sketches.config import Settings


async def consume(
    bootstrap: str, topic: str, expected: list[int], deadline_s: float
) -> dict[str, float]:
    settings = Settings(kafka_bootstrap_servers=bootstrap, _env_file=None)  # type: ignore[call-arg]
    consumer = make_kafka_consumer(settings, None)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(len(expected))]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        position = [0] * len(expected)
        total = first = 0
        decoded_bytes = 0
        t_first: float | None = None
        started = time.perf_counter()
        loads = orjson.loads
        while any(p < e for p, e in zip(position, expected, strict=True)):
            if time.perf_counter() - started > deadline_s:
                raise TimeoutError(f"bare consumer: read {position} of {expected}")
            fetched = await consumer.getmany(
                timeout_ms=settings.consumer_fetch_timeout_ms,
                max_records=settings.consumer_max_batch,
            )
            n = 0
            for tp, records in fetched.items():
                for record in records:
                    loads(record.value)
                    decoded_bytes += len(record.value)
                n += len(records)
                position[tp.partition] = records[-1].offset + 1
            if not n:
                continue
            total += n
            if t_first is None:
                t_first = time.perf_counter()
                first = n
        t_end = time.perf_counter()
    finally:
        await consumer.stop()
    assert t_first is not None
    seconds = t_end - t_first
    return {
        "messages": total,
        "measured_messages": total - first,
        "seconds": seconds,
        "rate": (total - first) / seconds if seconds > 0 else float("nan"),
        "bytes": decoded_bytes,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bare")
    p.add_argument("--bootstrap", required=True)
    p.add_argument("--topic", required=True)
    p.add_argument("--expect", required=True, help="messages per partition, comma-separated")
    p.add_argument("--timeout", type=float, default=600.0)
    args = p.parse_args(argv)
    expected = [int(x) for x in args.expect.split(",")]
    result = asyncio.run(consume(args.bootstrap, args.topic, expected, args.timeout))
    sys.stdout.write(orjson.dumps(result).decode() + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
