"""The hiredis-packing connection sends exactly the bytes redis-py's own packer would."""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from hypothesis import given
from hypothesis import strategies as st
from redis.asyncio.connection import Connection

from sketches.connection import HiredisPackConnection

args = st.one_of(
    st.text(max_size=40),
    st.binary(max_size=40),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
)


@given(st.sampled_from(["PFADD", "SET", "CONFIG GET", b"SADD"]), st.lists(args, max_size=20))
def test_packed_bytes_equal_redis_py(command: Any, rest: list[Any]) -> None:
    ours = b"".join(HiredisPackConnection().pack_command(command, *rest))
    theirs = b"".join(Connection().pack_command(command, *rest))
    assert ours == theirs


async def test_a_client_with_it_talks_to_a_real_redis(redis_url: str, key_prefix: str) -> None:
    client = aioredis.Redis.from_url(redis_url, connection_class=HiredisPackConnection)
    try:
        key = f"{key_prefix}:hll"
        assert await client.pfadd(key, "é", "a b", b"\xff", 7) == 1
        assert await client.pfcount(key) == 4
        pipe = client.pipeline(transaction=False)
        pipe.set(f"{key_prefix}:s", "v").get(f"{key_prefix}:s")
        assert await pipe.execute() == [True, b"v"]
    finally:
        await client.delete(f"{key_prefix}:hll", f"{key_prefix}:s")
        await client.aclose()
