"""``python -m bench.packing``: CPU time to pack one argument of a write-path command (an EVALSHA
with 2,000 members, as the consumer sends), for each packing connection of
``sketches.connection`` beside redis-py's own packers. Process time, best of 9 runs of 300
commands, so that other processes on a shared machine do not count."""

from __future__ import annotations

import sys
import time
import timeit
from collections.abc import Callable
from typing import Any

from redis.asyncio.connection import Connection

from sketches.connection import (
    HiredisPackConnection,
    HiredisPackSSLConnection,
    HiredisPackUnixConnection,
)

COMMANDS = 300
MEMBERS = 2000


def per_argument_ns(pack: Callable[..., Any], args: tuple[Any, ...]) -> float:
    timer = timeit.Timer(lambda: pack(*args), timer=time.process_time)
    return min(timer.repeat(number=COMMANDS, repeat=9)) / COMMANDS / len(args) * 1e9


def main() -> int:
    members = [f"member_{i:06d}" for i in range(MEMBERS)]
    args = ("EVALSHA", "ab" * 20, 3, "um:{acme:ws-1}:hll:d:2026-11-24", "k2", "k3",
            1_795_000_000, *members)
    plain = Connection()
    rows: list[tuple[str, Callable[..., Any]]] = [
        ("redis-py Connection.pack_command", plain.pack_command),
        ("redis-py pure-Python packer", getattr(plain, "_pack_command_python",
                                                plain.pack_command)),
        ("HiredisPackConnection (redis://)", HiredisPackConnection().pack_command),
        ("HiredisPackSSLConnection (rediss://)", HiredisPackSSLConnection().pack_command),
        ("HiredisPackUnixConnection (unix://)",
         HiredisPackUnixConnection(path="/run/redis.sock").pack_command),
    ]
    for name, pack in rows:
        sys.stdout.write(f"{name:40s} {per_argument_ns(pack, args):6.0f} ns of CPU an argument\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
