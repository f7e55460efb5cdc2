"""A bystander client: PINGs Redis back to back and reports the longest wait it saw.

Run as its own process (``python -m bench.probe URL``) around a query, it shows how long that
query kept Redis from serving anybody else, which is what a multi-key ``PFCOUNT`` pipeline costs
every other client. Prints one JSON line when it gets SIGTERM or SIGINT.
"""

from __future__ import annotations

import signal
import sys
import time

import orjson
import redis


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    client = redis.Redis.from_url(args[0])
    client.ping()
    stop = False

    def _stop(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    waits: list[float] = []
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    clock = time.perf_counter
    while not stop:
        t = clock()
        client.ping()
        waits.append(clock() - t)
    waits.sort()
    n = len(waits)
    out = {
        "pings": n,
        "max_ms": waits[-1] * 1000 if n else None,
        "p999_ms": waits[int(n * 0.999)] * 1000 if n else None,
        "p50_ms": waits[n // 2] * 1000 if n else None,
        "over_1ms": sum(1 for w in waits if w > 0.001),
        "over_5ms": sum(1 for w in waits if w > 0.005),
    }
    sys.stdout.write(orjson.dumps(out).decode() + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
