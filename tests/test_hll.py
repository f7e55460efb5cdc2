"""sketches.hll against the facts in the shared notes and against a real redis-server.

Redis is the oracle: every estimate must equal what ``PFCOUNT`` answers for the same value, and
every decoded register what ``hash_element`` predicts. Crafted values (written with ``SET``) reach
corners ``PFADD`` would take astronomically long to reach: registers at 51 and above, any mix of
sparse opcodes, corrupt values.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, cast

import numba
import numpy as np
import numpy.typing as npt
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sketches import hll
from sketches.hll import HllFormatError, M, decode, decode_many, estimate, estimate_many

INT64_MIN = -(1 << 63)
# Cached cardinality marked invalid (top bit of byte 15), as Redis leaves it after a write.
SPARSE_HEADER = b"HYLL\x01\x00\x00\x00" + bytes(7) + b"\x80"
DENSE_HEADER = b"HYLL\x00\x00\x00\x00" + bytes(7) + b"\x80"

# `PFADD k a b c` on Redis 7.0.15, read back with GET.
ABC_VALUE = bytes.fromhex("48594c4c01000000000000000000008060f38050b1844bfb80425a")
ABC_REGISTERS = {8436: 1, 12711: 2, 15780: 1}

RedisHypothesis = settings(
    max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


# ------------------------------------------------------------------------------------------------
# Helpers: an independent model of the format
# ------------------------------------------------------------------------------------------------


def registers_of(elements: Iterable[bytes]) -> npt.NDArray[np.uint8]:
    """The registers PFADD builds from these elements: register-wise max of their hashes."""
    regs = np.zeros(M, dtype=np.uint8)
    pairs = [hll.hash_element(e) for e in elements]
    if pairs:
        index, value = zip(*pairs, strict=True)
        np.maximum.at(regs, np.array(index), np.array(value, dtype=np.uint8))
    return regs


def encode_dense(registers: npt.NDArray[np.integer]) -> bytes:
    regs = np.asarray(registers, dtype=np.uint32).reshape(-1, 4)
    word = regs[:, 0] | regs[:, 1] << 6 | regs[:, 2] << 12 | regs[:, 3] << 18
    body = np.stack([word & 0xFF, word >> 8 & 0xFF, word >> 16 & 0xFF], axis=1).astype(np.uint8)
    return DENSE_HEADER + body.tobytes()


def zero_opcode(length: int, extended: bool) -> bytes:
    if extended:
        return bytes([0x40 | (length - 1) >> 8, (length - 1) & 0xFF])
    return bytes([length - 1])


def val_opcode(value: int, length: int) -> bytes:
    return bytes([0x80 | (value - 1) << 2 | (length - 1)])


def decode_sparse_slowly(value: bytes) -> list[int]:
    """The opcode walk of Redis's hllSparseRegHisto, one opcode at a time."""
    regs: list[int] = []
    body, i = value[16:], 0
    while i < len(body):
        op = body[i]
        if op >> 6 == 0:
            regs += [0] * ((op & 0x3F) + 1)
            i += 1
        elif op >> 6 == 1:
            regs += [0] * (((op & 0x3F) << 8 | body[i + 1]) + 1)
            i += 2
        else:
            regs += [((op >> 2) & 0x1F) + 1] * ((op & 0x03) + 1)
            i += 1
    return regs


_ZERO_RUN = st.tuples(
    st.just(0),
    st.one_of(st.integers(1, 64), st.integers(65, 128), st.integers(1, M)),
    st.booleans(),  # XZERO even where ZERO would do (PFADD never writes that; Redis reads it)
)
_VAL_RUN = st.tuples(st.integers(1, 32), st.integers(1, 4), st.just(False))


@st.composite
def sparse_values(draw: st.DrawFn) -> tuple[bytes, npt.NDArray[np.uint8]]:
    """Any valid sparse value, not only what PFADD writes: ZERO and XZERO freely mixed, runs of
    XZERO whose second bytes also start with 01 (lengths 65..128), adjacent VAL runs, and a final
    zero run up to 16,384. Returns (value, registers)."""
    body = bytearray()
    regs: list[int] = []
    runs = draw(st.lists(st.one_of(_ZERO_RUN, _VAL_RUN), max_size=60))
    runs.append((0, M, draw(st.booleans())))
    for value, length, extended in runs:
        length = min(length, M - len(regs))
        while length:
            if value:
                body += val_opcode(value, length)
                part = length
            else:
                extended = extended or length > 64
                part = min(length, M if extended else 64)
                body += zero_opcode(part, extended)
            regs += [value] * part
            length -= part
    return SPARSE_HEADER + bytes(body), np.array(regs, dtype=np.uint8)


def simulated_registers(rng: np.random.Generator, cardinality: float) -> npt.NDArray[np.uint8]:
    """Registers of a sketch of about `cardinality` elements, drawn from their exact distribution
    (each register sees Poisson(cardinality / M) hashes; one hash exceeds v with chance 2^-v),
    so that any cardinality, up to every register at 51, costs one array of random numbers."""
    lam = cardinality / M
    v = np.arange(hll.MAX_REGISTER + 1, dtype=np.float64)
    cdf = np.exp(-lam * np.exp2(-v))  # P(register <= v); P(register <= 51) = 1
    cdf[-1] = 1.0
    return np.searchsorted(cdf, rng.random(M), side="left").astype(np.uint8)


def naive_rolling_max(rows: npt.NDArray[np.uint8], width: int) -> npt.NDArray[np.uint8]:
    out = np.empty_like(rows)
    for i in range(rows.shape[0]):
        out[i] = rows[max(0, i - width + 1) : i + 1].max(axis=0)
    return out


# ------------------------------------------------------------------------------------------------
# Fixtures
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def r(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def key(r: redis.Redis) -> Iterator[Callable[[str], str]]:
    """Key names under a fresh uuid prefix; the keys are deleted afterwards (never a flush)."""
    prefix = f"test-hll:{uuid.uuid4().hex}:"
    used: set[str] = set()

    def make(name: str) -> str:
        used.add(prefix + name)
        return prefix + name

    yield make
    if used:
        r.delete(*used)


def pfadd_all(r: redis.Redis, name: str, elements: list[bytes]) -> None:
    if not elements:
        r.pfadd(name)  # creates the empty sketch, as PFADD without elements does
    for lo in range(0, len(elements), 5000):
        r.pfadd(name, *elements[lo : lo + 5000])


def get(r: redis.Redis, name: str) -> bytes:
    value = r.get(name)
    assert isinstance(value, bytes)
    return value


def mget(r: redis.Redis, names: list[str]) -> list[bytes | None]:
    values = r.mget(names)
    assert all(v is None or isinstance(v, bytes) for v in values)
    return cast("list[bytes | None]", values)


def check_against_redis(r: redis.Redis, name: str, elements: list[bytes]) -> bytes:
    pfadd_all(r, name, elements)
    value = get(r, name)  # before PFCOUNT, which writes its cache into the value
    regs = decode(value)
    np.testing.assert_array_equal(regs, registers_of(elements))
    assert estimate(regs) == r.pfcount(name)
    assert estimate_many(regs[None])[0] == estimate(regs)
    return value


# ------------------------------------------------------------------------------------------------
# The facts in the notes
# ------------------------------------------------------------------------------------------------


def test_the_notes_test_vector() -> None:
    regs = decode(ABC_VALUE)
    assert regs.shape == (M,)
    assert regs.dtype == np.uint8
    nonzero = np.flatnonzero(regs)
    assert dict(zip(nonzero.tolist(), regs[nonzero].tolist(), strict=True)) == ABC_REGISTERS
    assert estimate(regs) == 3
    assert {hll.hash_element(e) for e in (b"a", b"b", b"c")} == set(ABC_REGISTERS.items())


def test_empty_sketch_and_missing_key() -> None:
    empty = SPARSE_HEADER + b"\x7f\xff"  # XZERO:16384
    assert not decode(empty).any()
    assert estimate(decode(empty)) == 0
    rows = decode_many([None, empty, None])
    assert rows.shape == (3, M)
    assert not rows.any()
    np.testing.assert_array_equal(estimate_many(rows), [0, 0, 0])
    assert decode_many([]).shape == (0, M)
    assert estimate_many(np.zeros((0, M), np.uint8)).shape == (0,)


def test_dense_bit_layout() -> None:
    regs = np.random.default_rng(7).integers(0, 64, M).astype(np.uint8)
    np.testing.assert_array_equal(decode(encode_dense(regs)), regs)
    # the 4 registers of a 3-byte group, as the notes spell them out
    b0, b1, b2 = 0b10_000001, 0b1111_0011, 0b101010_11
    value = DENSE_HEADER + bytes([b0, b1, b2]) + bytes(12285)
    assert decode(value)[:5].tolist() == [1, 0b0011_10, 0b11_1111, 0b101010, 0]


def test_sigma_and_tau_tables_match_the_scalar_series() -> None:
    """estimate_many reads sigma and tau from tables; every entry must be the scalar's double."""
    sigma, tau = hll._sigma_table(), hll._tau_table()
    m = float(M)
    for k in range(M + 1):
        assert sigma[k] == hll._sigma(k / m), k
        assert tau[k] == hll._tau((m - k) / m), k


@pytest.mark.parametrize(
    ("v", "rounded"),
    [
        (0.0, 0),
        (0.49999999999999994, 0),
        (0.5, 1),
        (1.5, 2),
        (2.5, 3),  # Python's round() gives 2
        (2.4999999999999996, 2),
        (1234567.5, 1234568),
        (2.0**53 + 2, 2**53 + 2),
        (2.0**63 - 1024, 2**63 - 1024),
        (2.0**63, INT64_MIN),  # llroundl overflows; Redis then replies -2**63
        (math.inf, INT64_MIN),  # every register at 51 or above: z is 0
    ],
)
def test_rounding_is_llroundl(v: float, rounded: int) -> None:
    assert hll._llround(v) == rounded
    assert hll._llround_many(np.array([v]))[0] == rounded
    assert hll._k_llround(v) == rounded


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (b"", "shorter than the 16-byte header"),
        (b"12345", "shorter than the 16-byte header"),
        (b"HYLX" + ABC_VALUE[4:], "magic"),
        (b"HYLL\x02" + ABC_VALUE[5:], "encoding byte 2"),
        (DENSE_HEADER + bytes(12287), "dense HyperLogLog of 12303 bytes"),
        (DENSE_HEADER + bytes(12289), "dense HyperLogLog of 12305 bytes"),
        (DENSE_HEADER[:4] + b"\x00" + ABC_VALUE[5:], "dense HyperLogLog of 27 bytes"),
        (SPARSE_HEADER, "cover 0 registers"),
        (SPARSE_HEADER + zero_opcode(M - 1, True), "cover 16383 registers"),
        (SPARSE_HEADER + b"\x7f\xff\x00", "cover 16385 registers"),
        (SPARSE_HEADER + b"\x7f\xff" + val_opcode(3, 1), "cover 16385 registers"),
        (SPARSE_HEADER + zero_opcode(M - 1, True) + b"\x40", "ends inside a 2-byte XZERO"),
    ],
)
def test_malformed_values_are_refused(value: bytes, message: str) -> None:
    with pytest.raises(HllFormatError, match=message):
        decode(value)
    dense = encode_dense(np.ones(M, np.uint8))
    # every value sparse (the kernel keeps only touched columns) and with a dense one (all columns)
    for batch in ([ABC_VALUE, value, None], [dense, value, None]):
        for decoder in (decode_many, hll._numpy_decode_many):
            with pytest.raises(HllFormatError, match=f"value 1: .*{message}"):
                decoder(batch)
        for skip in (0, 3):  # also when the value's own day is not reported
            with pytest.raises(HllFormatError, match=f"value 1: .*{message}"):
                hll.rolling_from_values(batch, (2,), skip)


def test_values_that_are_not_bytes_are_refused() -> None:
    for values in (["HYLL"], [ABC_VALUE, 12]):
        with pytest.raises(TypeError, match="expected bytes"):
            decode_many(values)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="expected bytes"):
            hll.rolling_from_values(values, (7,), 0)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("value", "redis_error"),
    [
        (b"12345", "WRONGTYPE"),
        (b"HYLX" + ABC_VALUE[4:], "WRONGTYPE"),
        (b"HYLL\x02" + ABC_VALUE[5:], "WRONGTYPE"),
        (DENSE_HEADER + bytes(12287), "WRONGTYPE"),
        (SPARSE_HEADER + zero_opcode(M - 1, True), "INVALIDOBJ"),
        (SPARSE_HEADER + b"\x7f\xff" + val_opcode(3, 1), "INVALIDOBJ"),
    ],
)
def test_redis_refuses_what_decode_refuses(
    r: redis.Redis, key: Callable[[str], str], value: bytes, redis_error: str
) -> None:
    k = key("bad")
    r.set(k, value)
    with pytest.raises(HllFormatError):
        decode(value)
    for keys in ([k], [k, key("missing")]):  # single-key and multi-key code paths
        with pytest.raises(redis.ResponseError, match=redis_error):
            r.pfcount(*keys)


def test_redis_accepts_a_truncated_xzero_that_decode_refuses(
    r: redis.Redis, key: Callable[[str], str]
) -> None:
    """Documents the one place decode is stricter than Redis: Redis reads the string's NUL
    terminator as the missing second byte of a final XZERO, which here completes the count."""
    k = key("truncated")
    value = SPARSE_HEADER + zero_opcode(M - 1, True) + b"\x40"
    r.set(k, value)
    assert r.pfcount(k) == 0
    with pytest.raises(HllFormatError):
        decode(value)


def test_wrong_register_arrays_are_refused() -> None:
    with pytest.raises(ValueError, match="shape"):
        estimate(np.zeros(100, np.uint8))
    with pytest.raises(ValueError, match="shape"):
        estimate_many(np.zeros(M, np.uint8))
    with pytest.raises(ValueError, match=r"0\.\.63"):
        estimate_many(np.full((2, M), 64, np.uint8))  # would spill into the next row's bins
    with pytest.raises(ValueError, match="integers"):
        estimate(np.zeros(M))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="width"):
        hll.rolling_max(np.zeros((3, 4), np.uint8), 0)
    with pytest.raises(ValueError, match="width"):
        hll.rolling_estimates(np.zeros((3, M), np.uint8), (7, 0), 0)
    with pytest.raises(ValueError, match="width"):
        hll.rolling_from_values([None], (0,), 0)
    with pytest.raises(ValueError, match="skip"):
        hll.rolling_from_values([None], (1,), -1)
    with pytest.raises(ValueError, match=r"0\.\.63"):
        hll.rolling_estimates(np.full((2, M), 64, np.uint8), (1,), 0)


# ------------------------------------------------------------------------------------------------
# Against Redis: PFADD, GET, PFCOUNT
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "encoding"),
    [(0, 1), (1, 1), (3, 1), (100, 1), (1000, 1), (3000, 0), (50_000, 0)],
)
def test_fixed_sizes_match_redis(
    r: redis.Redis, key: Callable[[str], str], size: int, encoding: int
) -> None:
    elements = [f"user-{i}".encode() for i in range(size)]
    value = check_against_redis(r, key("k"), elements)
    assert value[4] == encoding  # 0 dense, 1 sparse: both decoders are exercised


@RedisHypothesis
@given(elements=st.sets(st.binary(max_size=24), max_size=300))
def test_random_sets_match_redis(
    r: redis.Redis, key: Callable[[str], str], elements: set[bytes]
) -> None:
    check_against_redis(r, key(uuid.uuid4().hex), sorted(elements))


@settings(RedisHypothesis, max_examples=15)
@given(size=st.integers(0, 6000), seed=st.integers(0, 2**32 - 1))
def test_random_sizes_across_the_sparse_dense_switch(
    r: redis.Redis, key: Callable[[str], str], size: int, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    elements = [bytes(e) for e in rng.integers(0, 256, (size, int(rng.integers(1, 20))), np.uint8)]
    check_against_redis(r, key(uuid.uuid4().hex), elements)


def test_union_matches_multi_key_pfcount_and_pfmerge(
    r: redis.Redis, key: Callable[[str], str]
) -> None:
    sizes = [10, 500, 2500, 20_000, 3, 0]
    names = [key(f"day{i}") for i in range(len(sizes))] + [key("never-written")]
    for i, (name, size) in enumerate(zip(names, sizes, strict=False)):
        # overlapping sets: day i holds users i*200 .. i*200 + size
        pfadd_all(r, name, [f"u{j}".encode() for j in range(i * 200, i * 200 + size)])
    rows = decode_many(mget(r, names))
    assert not rows[-1].any()
    union = rows.max(axis=0)
    assert estimate(union) == r.pfcount(*names)
    for lo in range(len(names)):
        assert estimate(rows[lo:].max(axis=0)) == r.pfcount(*names[lo:])
    np.testing.assert_array_equal(estimate_many(rows), [r.pfcount(n) for n in names])
    merged = key("merged")
    r.pfmerge(merged, *names)
    np.testing.assert_array_equal(decode(get(r, merged)), union)


def test_rolling_from_values_matches_pfcount_of_each_window(
    r: redis.Redis, key: Callable[[str], str]
) -> None:
    """The values as the service reads them (``MGET`` of day keys, some never written), and
    every figure against Redis: each day's ``PFCOUNT`` and each window's multi-key ``PFCOUNT``."""
    sizes = [30, 0, 2500, 40, 9000, -1, 700, 5, -1, 3000, 60]  # -1: the key is never written
    names = [key(f"day{i}") for i in range(len(sizes))]
    for i, (name, size) in enumerate(zip(names, sizes, strict=True)):
        if size >= 0:  # a pool of users, each day a different slice of it
            pfadd_all(r, name, [f"u{j % 4000}".encode() for j in range(i * 350, i * 350 + size)])
    values = mget(r, names)
    assert {v[4] for v in values if v is not None} == {0, 1}  # dense and sparse
    for batch in (values, [v if v is None or v[4] == 1 else None for v in values]):
        for skip in (0, 4):
            dau, rolling = hll.rolling_from_values(batch, (1, 3, 7, 30), skip)
            present = [n if v is not None else None for n, v in zip(names, batch, strict=True)]
            assert dau.tolist() == [r.pfcount(n) if n else 0 for n in present[skip:]]
            for width, got in rolling.items():
                windows = [
                    [n for n in present[max(0, i - width + 1) : i + 1] if n]
                    for i in range(skip, len(names))
                ]
                assert got.tolist() == [r.pfcount(*w) if w else 0 for w in windows], width


@RedisHypothesis
@given(sets=st.lists(st.sets(st.binary(min_size=1, max_size=8), max_size=200), max_size=6))
def test_random_unions_match_multi_key_pfcount(
    r: redis.Redis, key: Callable[[str], str], sets: list[set[bytes]]
) -> None:
    names = [key(uuid.uuid4().hex) for _ in range(len(sets) + 1)]  # the last is never written
    for name, elements in zip(names, sets, strict=False):
        pfadd_all(r, name, sorted(elements))
    rows = decode_many(mget(r, names))
    assert estimate(rows.max(axis=0)) == r.pfcount(*names)
    np.testing.assert_array_equal(estimate_many(rows), [estimate(row) for row in rows])


# ------------------------------------------------------------------------------------------------
# Against Redis: crafted values, for the corners of the estimator and of the sparse format
# ------------------------------------------------------------------------------------------------


def test_estimator_over_the_whole_range_matches_redis(
    r: redis.Redis, key: Callable[[str], str]
) -> None:
    """From empty to every register at 51, in steps of 2^(1/4) in cardinality, and registers
    above 51 (possible in a hand-made dense value; Redis ignores them in its histogram)."""
    rng = np.random.default_rng(20240601)
    rows = [simulated_registers(rng, 2.0 ** (i / 4)) for i in range(-16, 272)]
    rows += [
        np.full(M, 51, np.uint8),
        np.r_[np.full(M - 1, 51), 50].astype(np.uint8),
        np.r_[np.full(M - 1, 51), 0].astype(np.uint8),
        np.r_[np.zeros(M - 1), 1].astype(np.uint8),
        rng.integers(0, 64, M).astype(np.uint8),
        np.minimum(simulated_registers(rng, 1e6) + 20, 63).astype(np.uint8),
    ]
    names = [key(f"crafted{i}") for i in range(len(rows))]
    pipe = r.pipeline(transaction=False)
    for name, row in zip(names, rows, strict=True):
        pipe.set(name, encode_dense(row))
    pipe.execute()
    missing = key("missing")
    for name in names:
        pipe.pfcount(name, missing)  # the multi-key path: hllMerge into raw bytes
        pipe.pfcount(name)  # the single-key path: histogram of the dense encoding
    answers = pipe.execute()
    multi, single = answers[0::2], answers[1::2]
    assert multi == single
    assert [estimate(row) for row in rows] == multi
    assert estimate_many(np.stack(rows)).tolist() == multi
    assert INT64_MIN in multi  # the all-51 sketch: Redis's own overflow answer


@RedisHypothesis
@given(sparse=st.lists(sparse_values(), min_size=1, max_size=4), seed=st.integers(0, 2**32 - 1))
def test_any_valid_sparse_value_decodes_and_counts_like_redis(
    r: redis.Redis,
    key: Callable[[str], str],
    sparse: list[tuple[bytes, npt.NDArray[np.uint8]]],
    seed: int,
) -> None:
    values = [v for v, _ in sparse]
    expected = [regs for _, regs in sparse]
    for value, regs in sparse:
        assert decode_sparse_slowly(value) == regs.tolist()  # the generator itself is right
    # a batch mixing sparse, dense and missing values, in a shuffled order
    dense = encode_dense(simulated_registers(np.random.default_rng(seed), 5000))
    batch: list[bytes | None] = [*values, dense, None]
    order = np.random.default_rng(seed).permutation(len(batch))
    rows = decode_many([batch[i] for i in order])
    truth = [*expected, decode(dense), np.zeros(M, np.uint8)]
    for row, i in zip(rows, order, strict=True):
        np.testing.assert_array_equal(row, truth[i])
    names = [key(uuid.uuid4().hex) for _ in values]
    for name, value in zip(names, values, strict=True):
        r.set(name, value)
    assert [estimate(e) for e in expected] == [r.pfcount(n) for n in names]
    assert estimate(np.max(expected, axis=0)) == r.pfcount(*names)


# ------------------------------------------------------------------------------------------------
# The vectorised paths against the simple ones
# ------------------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 12),
    scales=st.lists(st.floats(-8, 70), min_size=1, max_size=12),
    seed=st.integers(0, 2**32 - 1),
)
def test_estimate_many_equals_estimate(n: int, scales: list[float], seed: int) -> None:
    rng = np.random.default_rng(seed)
    rows = np.stack([simulated_registers(rng, 2.0 ** scales[i % len(scales)]) for i in range(n)])
    rows[rng.random(n) < 0.1] = 0
    assert estimate_many(rows).tolist() == [estimate(row) for row in rows]
    assert estimate_many(rows.astype(np.int64)).tolist() == estimate_many(rows).tolist()


@settings(max_examples=100, deadline=None)
@given(
    n=st.integers(0, 45),
    width=st.integers(1, 60),
    cols=st.integers(1, 4),
    seed=st.integers(0, 2**32 - 1),
)
def test_rolling_max_equals_naive(n: int, width: int, cols: int, seed: int) -> None:
    rows = np.random.default_rng(seed).integers(0, 52, (n, cols)).astype(np.uint8)
    expected = naive_rolling_max(rows, width)
    np.testing.assert_array_equal(hll.rolling_max(rows, width), expected)
    # any memory layout: Fortran order, and a strided view
    np.testing.assert_array_equal(hll.rolling_max(np.asfortranarray(rows), width), expected)
    wide = np.repeat(rows, 2, axis=1)[:, ::2]
    np.testing.assert_array_equal(hll.rolling_max(wide, width), expected)


@pytest.mark.parametrize("width", [1, 7, 30, 100])
def test_rolling_max_of_real_sized_rows(width: int) -> None:
    rows = np.random.default_rng(width).integers(0, 52, (61, M)).astype(np.uint8)
    before = rows.copy()
    np.testing.assert_array_equal(hll.rolling_max(rows, width), naive_rolling_max(rows, width))
    np.testing.assert_array_equal(rows, before)  # the input is left alone
    np.testing.assert_array_equal(
        hll.rolling_max(rows[:, 5], width), naive_rolling_max(rows[:, 5:6], width)[:, 0]
    )


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 40),
    widths=st.lists(st.integers(1, 35), min_size=1, max_size=3, unique=True),
    density=st.sampled_from([0.0005, 0.01, 0.5, 1.0]),
    seed=st.integers(0, 2**32 - 1),
)
def test_rolling_estimates_equal_estimating_each_naive_union(
    n: int, widths: list[int], density: float, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    rows = rng.geometric(0.5, size=(n, hll.M)).clip(0, 51).astype(np.uint8)
    rows[rng.random(rows.shape) > density] = 0
    skip = min(n - 1, int(rng.integers(0, n)))
    got = hll.rolling_estimates(rows, widths, skip)
    for w in widths:
        want = [hll.estimate(rows[max(0, i - w + 1) : i + 1].max(axis=0)) for i in range(skip, n)]
        assert got[w].tolist() == want


# ------------------------------------------------------------------------------------------------
# The compiled kernel against the numpy reference, and its compilation
# ------------------------------------------------------------------------------------------------

# A valid sparse value that touches every register (4,096 VAL opcodes): with it, every value of a
# batch can be sparse and yet the kernel must keep all columns.
ALL_ONES_SPARSE = SPARSE_HEADER + val_opcode(1, 4) * (M // 4)
_DENSE_KINDS = ("simulated", "crafted", "all-51")


@st.composite
def day_batches(draw: st.DrawFn) -> list[bytes | None]:
    """``MGET`` results as the kernel meets them: missing keys, any valid sparse value, and dense
    values of any cardinality, crafted ones with registers up to 63 (which Redis ignores) and
    all-51 ones (Redis's overflow answer). Half the batches have no dense value, which makes the
    kernel keep only the registers the values touch."""
    pool = draw(st.lists(sparse_values(), min_size=1, max_size=3))
    sparse_only = draw(st.booleans())
    kinds = draw(
        st.lists(st.sampled_from(["missing", "sparse", "all-ones", *_DENSE_KINDS]), max_size=40)
    )
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    batch: list[bytes | None] = []
    for kind in kinds:
        if kind == "missing":
            batch.append(None)
        elif kind == "sparse" or (sparse_only and kind in _DENSE_KINDS):
            batch.append(pool[int(rng.integers(len(pool)))][0])
        elif kind == "all-ones":
            batch.append(ALL_ONES_SPARSE)
        elif kind == "simulated":
            batch.append(encode_dense(simulated_registers(rng, 2.0 ** rng.uniform(0, 60))))
        elif kind == "crafted":
            batch.append(encode_dense(rng.integers(0, 64, M).astype(np.uint8)))
        else:
            batch.append(encode_dense(np.full(M, 51, np.uint8)))
    return batch


@settings(max_examples=40, deadline=None)
@given(
    batch=day_batches(),
    widths=st.lists(st.integers(1, 45), min_size=1, max_size=3),
    skip=st.integers(0, 45),
)
def test_kernel_equals_the_numpy_reference(
    batch: list[bytes | None], widths: list[int], skip: int
) -> None:
    """Every compiled entry point against the numpy implementation it replaced, which the tests
    above hold to Redis. Windows longer than the batch, skips past its end and every layout of
    the kernel (touched registers only, all registers) are all drawn."""
    regs = hll._numpy_decode_many(batch)
    np.testing.assert_array_equal(decode_many(batch), regs)
    assert estimate_many(regs).tolist() == hll._numpy_estimate_many(regs).tolist()
    want = hll._numpy_rolling_estimates(regs, widths, skip)
    from_registers = hll.rolling_estimates(regs, widths, skip)
    dau, from_values = hll.rolling_from_values(batch, widths, skip)
    assert dau.tolist() == hll._numpy_estimate_many(regs[skip:]).tolist()
    assert sorted(from_values) == sorted(from_registers) == sorted(set(widths))
    for w in widths:
        assert from_values[w].tolist() == want[w].tolist(), w
        assert from_registers[w].tolist() == want[w].tolist(), w


def test_the_compiled_estimator_rounds_every_operation_separately() -> None:
    """Matching Redis bit for bit needs each double operation rounded on its own: a fused
    multiply-add (one rounding for ``a * b + c``) would move some estimates by one. The
    estimator compiled with the kernels' options must contain none. (Code loaded from numba's
    cache cannot be inspected, so it is compiled afresh here.)"""
    fresh = numba.njit(**hll._JIT_OPTIONS)(cast("Any", hll._k_count).py_func)
    hist = np.zeros(64, np.int64)
    hist[0], hist[1], hist[2] = M - 3, 2, 1
    assert fresh(hist, hll._sigma_table(), hll._tau_table()) == 3
    (asm,) = fresh.inspect_asm().values()
    assert "mulsd" in asm or "fmul" in asm  # the instructions are there to be seen
    assert not re.search(r"\b(vfn?m(add|sub)|fn?m(add|sub)|fml[as])", asm)


def test_every_width_and_skip_of_a_short_series() -> None:
    """Every block boundary, window cut off at row 0 and first reported row: each (width, skip)
    pair over 24 rows, through both entry points, alone and beside a second width."""
    rng = np.random.default_rng(11)
    rows = np.zeros((24, M), np.uint8)
    rows[:, rng.choice(M, 40, replace=False)] = rng.integers(0, 33, (24, 40))
    rows[[3, 17]] = 0
    values = [SPARSE_HEADER + b"".join(sparse_opcodes(row)) for row in rows]
    for width in range(1, 27):
        for skip in range(26):
            for widths in ([width], [5, width]):
                want = hll._numpy_rolling_estimates(rows, widths, skip)
                got = hll.rolling_estimates(rows, widths, skip)
                _, from_values = hll.rolling_from_values(values, widths, skip)
                for w in widths:
                    assert got[w].tolist() == want[w].tolist(), (w, skip)
                    assert from_values[w].tolist() == want[w].tolist(), (w, skip)


def test_rolling_from_values_of_a_full_recompute_equals_the_reference() -> None:
    """The shape the service asks for: 760 days, dense and sparse weeks, a gap, widths 7 and 30,
    the first 29 days only feeding the windows."""
    rng = np.random.default_rng(2024)
    batch: list[bytes | None] = []
    for day in range(760):
        if day % 97 == 5:
            batch.append(None)
        elif (day // 7) % 3 == 0:
            regs = np.minimum(simulated_registers(rng, 50), 32)
            batch.append(SPARSE_HEADER + b"".join(sparse_opcodes(regs)))
        else:
            batch.append(encode_dense(simulated_registers(rng, 2.0 ** rng.uniform(11, 20))))
    regs = hll._numpy_decode_many(batch)
    dau, rolling = hll.rolling_from_values(batch, (7, 30), 29)
    want = hll._numpy_rolling_estimates(regs, (7, 30), 29)
    assert dau.tolist() == hll._numpy_estimate_many(regs[29:]).tolist()
    assert rolling[7].tolist() == want[7].tolist()
    assert rolling[30].tolist() == want[30].tolist()
    assert len(dau) == len(rolling[7]) == len(rolling[30]) == 731


def sparse_opcodes(registers: npt.NDArray[np.uint8]) -> Iterator[bytes]:
    """The opcodes PFADD would write for these registers (values up to 32)."""
    i = 0
    while i < M:
        value = int(registers[i])
        j = i + 1
        while j < M and registers[j] == value and j - i < (4 if value else M):
            j += 1
        yield val_opcode(value, j - i) if value else zero_opcode(j - i, j - i > 64)
        i = j


def python(code: str, env: dict[str, str], cwd: Path | None = None) -> str:
    """Run `code` in a fresh interpreter (nothing compiled, nothing loaded) and return its
    output."""
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=cwd, capture_output=True, text=True,
        timeout=170, check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_warm_up_compiles_every_kernel_the_public_functions_call() -> None:
    """After warm_up, no input the public functions accept compiles anything more: a kernel
    compiled for a new argument type would cost seconds in the middle of a request."""
    code = """
import numpy as np
from sketches import hll
M = hll.M
hll.warm_up()
def signatures():
    return {n: list(getattr(hll, n).signatures) for n in dir(hll) if n.startswith("_k_")}
before = signatures()
called_from_python = ["_k_decode_many", "_k_estimate_rows", "_k_rolling_registers",
                      "_k_rolling_values", "_k_touched"]  # the others, from these kernels only
assert all(before[n] for n in called_from_python), before
abc = bytes.fromhex("48594c4c01000000000000000000008060f38050b1844bfb80425a")
dense = b"HYLL" + bytes(hll.DENSE_SIZE - 4)
regs = hll.decode_many([abc, dense, None, bytearray(abc), memoryview(dense)])
hll.decode_many([])
for rows in (regs, regs.astype(np.int64), regs[:, ::-1], np.asfortranarray(regs), regs[::2]):
    frozen = rows.copy()
    frozen.flags.writeable = False
    for r in (rows, frozen):
        hll.estimate_many(r)
        hll.rolling_estimates(r, [7, 30], 2)
        hll.rolling_estimates(r, (1,), 9)
for values in ([abc] * 40, [dense, None, abc], [None], [], (abc, bytearray(abc))):
    hll.rolling_from_values(values, (7, 30), 29)
    hll.rolling_from_values(values, [3], 0)
    hll.rolling_from_values(values, (), 0)
assert signatures() == before, "compiled after warm_up"
print("ok")
"""
    assert python(code, dict(os.environ)).strip() == "ok"


def test_kernels_are_cached_where_numba_cache_dir_points(tmp_path: Path) -> None:
    """A second process loads the compiled kernel from the cache instead of compiling it."""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    code = """
import numpy as np
from sketches import hll
h = np.zeros(64, np.int64)
h[0], h[1], h[2] = hll.M - 3, 2, 1  # the notes' test vector
assert hll._k_count(h, hll._sigma_table(), hll._tau_table()) == 3
stats = hll._k_count.stats
print(stats.cache_path, sum(stats.cache_hits.values()), sum(stats.cache_misses.values()))
"""
    first = python(code, env).split()
    assert first[0].startswith(str(tmp_path))
    assert first[1:] == ["0", "1"]  # compiled, and written to the cache
    assert any(tmp_path.rglob("hll._k_count-*.nbi"))
    second = python(code, env).split()
    assert second[1:] == ["1", "0"]  # loaded


def test_kernels_still_run_when_no_cache_directory_is_writable(tmp_path: Path) -> None:
    """Neither the package's ``__pycache__`` nor the user's cache directory can be created (a
    file stands where each should be), and NUMBA_CACHE_DIR is unset: the module still imports
    and its kernels compile in memory, as the module's docstring promises."""
    package = tmp_path / "sketches"
    package.mkdir()
    source = Path(hll.__file__).parent
    for name in ("__init__.py", "hll.py"):
        shutil.copy(source / name, package / name)
    (package / "__pycache__").write_text("not a directory")
    blocker = tmp_path / "blocker"
    blocker.write_text("not a directory")
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    env |= {"PYTHONPATH": str(tmp_path), "XDG_CACHE_HOME": str(blocker / "cache")}
    env |= {"HOME": str(blocker), "PYTHONDONTWRITEBYTECODE": "1"}
    code = """
import numpy as np
from sketches import hll
h = np.zeros(64, np.int64)
h[0], h[1], h[2] = hll.M - 3, 2, 1
print(hll.__file__, type(hll._k_count._cache).__name__,
      hll._k_count(h, hll._sigma_table(), hll._tau_table()))
"""
    where, cache, count = python(code, env, cwd=tmp_path).split()
    assert where == str(package / "hll.py")
    assert cache == "NullCache"
    assert count == "3"
