"""The hiredis-packing connections keep redis-py's whole contract: each URL scheme gets the
connection class redis-py would pick for it (TLS stays TLS, a socket stays a socket), and every
argument redis-py takes is sent as exactly the bytes redis-py's own packer would send, or
refused with redis-py's own error."""

from __future__ import annotations

import array
import decimal
import enum
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from pydantic import SecretStr
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import (
    AbstractConnection,
    Connection,
    SSLConnection,
    UnixDomainSocketConnection,
)

from sketches.config import Settings
from sketches.connection import (
    HiredisPackConnection,
    HiredisPacking,
    HiredisPackSSLConnection,
    HiredisPackUnixConnection,
    make_redis,
)


class Color(enum.IntEnum):
    RED = 1


class Name(str):
    pass


class Blob(bytes):
    pass


class Count(int):
    pass


class Ratio(float):
    def __repr__(self) -> str:
        return f"Ratio({float(self)})"


class Shouting(str):
    """redis-py encodes text with the value's own ``encode``; hiredis reads the characters."""

    def encode(self, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        return super().encode(encoding, errors).upper()


# The types the C packer takes, and every other type redis-py's encoder takes or refuses
# (DataError), with subclasses whose bytes differ between redis-py (repr) and hiredis (the value).
c_args = st.one_of(
    st.text(st.characters(codec=None, exclude_categories=()), max_size=20),  # lone surrogates too
    st.binary(max_size=40),
    st.integers(),  # any size
    st.floats(),  # nan, inf, -0.0 included
)
odd_args = st.one_of(
    st.binary(max_size=20).map(bytearray),
    st.binary(max_size=20).map(memoryview),
    st.lists(st.integers(-(2**31), 2**31 - 1), max_size=4).map(
        lambda xs: memoryview(array.array("i", xs))
    ),
    st.sampled_from([Color.RED, Name("name"), Blob(b"blob"), Count(7), Ratio(2.5),
                     Shouting("quiet")]),
    st.sampled_from([True, False, None, decimal.Decimal("1.5"), [b"a"], object()]),
)
args = st.one_of(c_args, odd_args)


@st.composite
def arguments(draw: st.DrawFn) -> list[Any]:
    """Half the time arguments the C packer takes, with at most one other among them: an odd
    argument must be noticed wherever it stands, not only beside others."""
    if draw(st.booleans()):
        return draw(st.lists(args, max_size=12))
    rest = draw(st.lists(c_args, max_size=12))
    if draw(st.booleans()):
        rest.insert(draw(st.integers(0, len(rest))), draw(odd_args))
    return rest


names = st.one_of(
    st.sampled_from(["PFADD", "SET", "CONFIG GET", b"SADD", b"CLIENT  LIST", "é ÉCHO"]),
    st.text(max_size=12),
    st.binary(max_size=12),
    st.integers(0, 9),
)
encodings = st.sampled_from([
    {}, {"encoding": "utf8"}, {"encoding": "latin-1"}, {"encoding_errors": "replace"},
    {"encoding_errors": "surrogateescape"}, {"encoding": "utf-16"},
])


def outcome(conn: AbstractConnection, *command: Any) -> tuple[str, bytes | str]:
    """The bytes a connection would send for ``command``, or the error it raises."""
    try:
        return ("sent", b"".join(bytes(chunk) for chunk in conn.pack_command(*command)))
    except Exception as err:  # noqa: BLE001 - the error itself is compared
        return (type(err).__name__, str(err))


def twins(**options: Any) -> list[tuple[AbstractConnection, AbstractConnection]]:
    """Each packing class beside the redis-py class it stands for, with the same options."""
    unix: dict[str, Any] = {"path": "/run/redis.sock", **options}
    return [
        (HiredisPackConnection(**options), Connection(**options)),
        (HiredisPackSSLConnection(**options), SSLConnection(**options)),
        (HiredisPackUnixConnection(**unix), UnixDomainSocketConnection(**unix)),
    ]


@given(names, arguments(), encodings)
@example("SET", ["k", Shouting("v")], {})
@example("SET", ["k", Ratio(2.5), Count(3), Color.RED], {})
@example("SET", ["k", memoryview(array.array("i", [1, 2]))], {})
@example("SET", ["k", "é"], {"encoding": "latin-1"})
@example("CONFIG GET", ["maxmemory"], {})
@example(7, ["k"], {})
def test_packed_bytes_and_errors_equal_redis_pys_for_every_input(
    name: Any, rest: list[Any], options: dict[str, Any]
) -> None:
    for ours, theirs in twins(**options):
        assert outcome(ours, name, *rest) == outcome(theirs, name, *rest)
        # redis-py's pure-Python packer, which redis-py 8 falls back on for memoryviews: the
        # reference every other packer must equal.
        reference = getattr(theirs, "_pack_command_python", theirs.pack_command)
        try:
            expected: tuple[str, bytes | str] = (
                "sent", b"".join(bytes(c) for c in reference(name, *rest))
            )
        except Exception as err:  # noqa: BLE001 - the error itself is compared
            expected = (type(err).__name__, str(err))
        assert outcome(ours, name, *rest) == expected


@given(st.lists(st.tuples(names, arguments()), min_size=1, max_size=6))
def test_pipelines_pack_to_the_same_bytes(commands: list[tuple[Any, list[Any]]]) -> None:
    ours, theirs = HiredisPackConnection(), Connection()
    cmds = [(name, *rest) for name, rest in commands]
    try:
        expected: bytes | str = b"".join(bytes(c) for c in theirs.pack_commands(cmds))
    except Exception as err:  # noqa: BLE001 - the error itself is compared
        expected = type(err).__name__
    try:
        got: bytes | str = b"".join(bytes(c) for c in ours.pack_commands(cmds))
    except Exception as err:  # noqa: BLE001 - the error itself is compared
        got = type(err).__name__
    assert got == expected


def test_the_c_packer_takes_the_consumers_arguments_and_hands_everything_else_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The fast path is the point of these classes: the write path's arguments (str, bytes,
    int, float) never reach redis-py's packer; what hiredis would pack differently does."""
    handed_on: list[tuple[Any, ...]] = []
    original = AbstractConnection.pack_command

    def spy(self: AbstractConnection, *command: Any) -> list[bytes]:
        handed_on.append(command)
        return original(self, *command)

    monkeypatch.setattr(AbstractConnection, "pack_command", spy)
    for conn, _ in twins():
        conn.pack_command("EVALSHA", "ab" * 20, 2, "um:{a:b}:hll:d:2026-11-24", b"k", 1.5, "é")
        conn.pack_command(b"PFADD", b"key", *(f"member_{i}" for i in range(100)))
        assert handed_on == [], type(conn).__name__
        odd_ones = (bytearray(b"x"), memoryview(b"x"), Color.RED, Count(3), Shouting("x"),
                    True, None)
        for odd in odd_ones:
            outcome(conn, "SET", "k", odd)
        assert len(handed_on) == len(odd_ones), type(conn).__name__
        handed_on.clear()
    for options in ({"encoding": "latin-1"}, {"encoding_errors": "replace"}):
        conn = HiredisPackConnection(**options)
        conn.pack_command("SET", "k", "v")
        assert handed_on == [("SET", "k", "v")], options
        handed_on.clear()


def built(url: str, cluster: bool = False) -> Any:
    return make_redis(Settings(redis_url=url, redis_cluster=cluster, _env_file=None))


@pytest.mark.parametrize(
    ("url", "packing", "library"),
    [
        ("redis://cache.internal:6379/0", HiredisPackConnection, Connection),
        ("REDIS://cache.internal:6379/0", HiredisPackConnection, Connection),
        ("rediss://app:pw@cache.internal:6380/0?ssl_cert_reqs=required",
         HiredisPackSSLConnection, SSLConnection),
        ("Rediss://cache.internal:6380/0", HiredisPackSSLConnection, SSLConnection),
        ("unix:///run/redis/redis.sock?password=pw", HiredisPackUnixConnection,
         UnixDomainSocketConnection),
        ("unix://app:pw@/run/redis/redis.sock", HiredisPackUnixConnection,
         UnixDomainSocketConnection),
    ],
)
async def test_each_scheme_gets_the_class_redis_py_picks_for_it_packing_in_c(
    url: str, packing: type[HiredisPacking], library: type[AbstractConnection]
) -> None:
    client = built(url)
    try:
        pool = client.connection_pool
        assert pool.connection_class is packing
        assert issubclass(packing, library)
        assert issubclass(packing, SSLConnection) == url.lower().startswith("rediss://")
        assert ("path" in pool.connection_kwargs) == url.startswith("unix://")
    finally:
        await client.aclose()


async def test_rediss_passes_every_tls_parameter_of_the_url_to_the_connection(
    tmp_path: Any,
) -> None:
    for name in ("ca.pem", "client.pem", "client.key"):
        (tmp_path / name).write_text("pem")
    url = (f"rediss://app:pw@cache.internal:6380/0?ssl_ca_certs={tmp_path}/ca.pem"
           f"&ssl_certfile={tmp_path}/client.pem&ssl_keyfile={tmp_path}/client.key"
           "&ssl_cert_reqs=optional&ssl_check_hostname=false&ssl_ciphers=HIGH"
           "&ssl_min_version=771&socket_timeout=7&ssl_password=k3y")
    client = built(url)
    try:
        kwargs = client.connection_pool.connection_kwargs
        assert kwargs["ssl_ca_certs"] == f"{tmp_path}/ca.pem"
        assert kwargs["ssl_certfile"] == f"{tmp_path}/client.pem"
        assert kwargs["ssl_keyfile"] == f"{tmp_path}/client.key"
        assert kwargs["ssl_cert_reqs"] == "optional"
        assert kwargs["ssl_check_hostname"] is False
        assert kwargs["ssl_password"] == "k3y"
        assert kwargs["socket_timeout"] == 7.0  # the URL's own wins over the default 5 s
        conn = client.connection_pool.make_connection()
        assert isinstance(conn, SSLConnection)
        context = conn.ssl_context
        assert (context.ca_certs, context.certfile, context.keyfile, context.ciphers) == (
            f"{tmp_path}/ca.pem", f"{tmp_path}/client.pem", f"{tmp_path}/client.key", "HIGH")
        assert context.check_hostname is False
        assert int(context.min_version) == 771  # TLS 1.2
    finally:
        await client.aclose()


async def test_a_cluster_over_rediss_makes_every_node_connection_tls(tmp_path: Any) -> None:
    (tmp_path / "ca.pem").write_text("pem")
    client = built(f"rediss://app:pw@cache.internal:6380?ssl_ca_certs={tmp_path}/ca.pem"
                   "&ssl_check_hostname=false", cluster=True)
    try:
        assert isinstance(client, RedisCluster)
        kwargs = client.connection_kwargs
        assert kwargs["connection_class"] is SSLConnection
        assert kwargs["ssl_ca_certs"] == f"{tmp_path}/ca.pem"
        assert kwargs["ssl_check_hostname"] is False
        assert (kwargs["username"], kwargs["password"]) == ("app", "pw")
        node = client.startup_nodes[0]  # the node connections are built from its arguments
        assert issubclass(node.connection_class, SSLConnection)
        assert node.connection_kwargs["ssl_ca_certs"] == f"{tmp_path}/ca.pem"
    finally:
        await client.aclose()
    plain = built("redis://cache.internal:6379", cluster=True)
    try:
        assert plain.connection_kwargs["connection_class"] is Connection
    finally:
        await plain.aclose()


async def test_a_client_with_it_talks_to_a_real_redis(redis_url: str, key_prefix: str) -> None:
    client = make_redis(Settings(redis_url=SecretStr(redis_url), _env_file=None))
    try:
        assert client.connection_pool.connection_class is HiredisPackConnection
        key = f"{key_prefix}:hll"
        assert await client.pfadd(key, "é", "a b", b"\xff", 7, bytearray(b"ba")) == 1
        assert await client.pfcount(key) == 5
        pipe = client.pipeline(transaction=False)
        pipe.set(f"{key_prefix}:s", memoryview(b"v")).get(f"{key_prefix}:s")
        assert await pipe.execute() == [True, b"v"]
    finally:
        await client.delete(f"{key_prefix}:hll", f"{key_prefix}:s")
        await client.aclose()
