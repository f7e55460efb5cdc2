"""The live producer: today's logins of one workspace at a steady rate, until SIGTERM.

Run as its own process (``python -m bench.liveprod ...``) so that producing never takes the GIL
of the process that times the queries. Every message carries the current time as its timestamp
and goes to the workspace's partition (keyed, as ``bench.ingest`` keys). Subject i is
``bench.livedata.live_codes`` element i, so the benchmark knows how many distinct subjects any
prefix of the stream holds.

One request in flight at a time keeps the messages in order on the partition, so message i lands
at ``base + i``; each delivery report checks that, and the count of reports that disagree is
printed with the totals (one JSON line) when the process is asked to stop.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from datetime import UTC, datetime
from typing import Any

import orjson

from bench.livedata import BLOCK, live_block, login_json, message_key, subject_name
from sketches.keys import Scope

TICK_S = 0.005


def main(argv: list[str] | None = None) -> int:
    from confluent_kafka import Producer

    p = argparse.ArgumentParser(prog="python -m bench.liveprod")
    p.add_argument("--bootstrap", required=True)
    p.add_argument("--topic", required=True)
    p.add_argument("--partition", type=int, required=True)
    p.add_argument("--base-offset", type=int, required=True,
                   help="the partition's next offset before the first live message")
    p.add_argument("--org", required=True)
    p.add_argument("--workspace", required=True)
    p.add_argument("--population", type=int, required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--rate", type=float, default=1000.0, help="messages per second")
    args = p.parse_args(argv)
    ws = Scope(args.org, args.workspace)
    key = message_key(ws)
    producer = Producer({
        "bootstrap.servers": args.bootstrap,
        "log.connection.close": False,
        "linger.ms": 2,
        "acks": "all",
        "enable.idempotence": False,
        "max.in.flight.requests.per.connection": 1,
    })
    stop = False

    def _stop(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    delivered = errors = misplaced = 0

    def report(i: int) -> Any:
        def on_delivery(err: Any, msg: Any) -> None:
            nonlocal delivered, errors, misplaced
            if err is not None:
                errors += 1
                return
            delivered += 1
            if msg.partition() != args.partition or msg.offset() != args.base_offset + i:
                misplaced += 1
        return on_delivery

    codes: list[int] = []
    sent = 0
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    t0 = time.perf_counter()
    while not stop:
        due = int((time.perf_counter() - t0) * args.rate)
        if due > sent:
            stamp = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
            while sent < due:
                if sent >= len(codes):
                    codes += live_block(len(codes) // BLOCK, args.population, args.seed).tolist()
                value = login_json(subject_name(codes[sent], args.population), ws, stamp)
                try:
                    producer.produce(args.topic, value, key, partition=args.partition,
                                     on_delivery=report(sent))
                except BufferError:
                    break
                sent += 1
        producer.poll(0)
        time.sleep(TICK_S)
    seconds = time.perf_counter() - t0
    left = producer.flush(30)
    out = {"sent": sent, "delivered": delivered, "errors": errors, "unsent": left,
           "misplaced": misplaced, "seconds": seconds, "rate": sent / seconds if seconds else 0.0}
    sys.stdout.write(orjson.dumps(out).decode() + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
