"""``python -m bench.hll_kernel [--runs N]``: the compiled HLL kernel against the numpy path.

One full recompute of a workspace's rolling series is what a dashboard's 730-day request costs:
760 daily values (730 days plus the 30 that feed the first window) decoded, each day's own
estimate (DAU), and the rolling 7- and 30-day unions of every reported day counted. An
incremental recompute of the last week reads 36 values. Both are timed here on one core, with
no Redis and no event loop: the values are built in memory exactly as ``PFADD`` would leave them
(elements hashed with Redis's MurmurHash64A, sparse or dense as Redis would choose).

* numpy: the implementation before the kernel, still in ``sketches.hll`` as the reference:
  ``_numpy_decode_many``, ``_numpy_rolling_estimates`` and, for the DAU, ``_numpy_estimate_many``.
* kernel: ``hll.rolling_from_values``, which returns the same three series.

Each figure is the median of ``--runs`` timed runs after one untimed run; both paths must
return identical series, or the script stops. The machine is shared, so figures vary by some
10 to 20 % between runs of the script: compare the columns of one table.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import numpy.typing as npt

from sketches import hll

WIDTHS = (7, 30)
SKIP = max(WIDTHS) - 1
DAYS = 730 + SKIP + 1
_SPARSE_HEADER = b"HYLL\x01\x00\x00\x00" + bytes(7) + b"\x80"
_DENSE_HEADER = b"HYLL\x00\x00\x00\x00" + bytes(7) + b"\x80"
_SPARSE_MAX_BYTES = 3000  # Redis's default hll-sparse-max-bytes
_SPARSE_MAX_VALUE = 32


@dataclass(frozen=True)
class Case:
    name: str
    values: list[bytes | None]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=15, help="timed runs per figure")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    hll.warm_up()
    print(f"warm_up: {(time.perf_counter() - started) * 1000:.0f} ms (compiles, or loads cache)")

    rng = np.random.default_rng(20240601)
    large = workspace(rng, DAYS, pool=100_000, per_day=lambda: 30_000)
    fresh = fresh_users(rng, DAYS, per_day=30_000)
    small = workspace(rng, DAYS, pool=300, per_day=lambda: int(rng.integers(10, 101)))
    cases = [
        Case("760 dense (30k a day of 100k users)", large),
        Case("760 dense (30k new users every day)", fresh),
        Case("760 sparse (10-100 a day of 300 users)", small),
        Case("36 dense (last week, 30k a day)", large[-36:]),
        Case("36 sparse (last week, 10-100 a day)", small[-36:]),
    ]

    print()
    print("| values | numpy, rolling only | numpy, rolling + DAU | kernel, rolling + DAU "
          "| speed-up |\n|---|---:|---:|---:|---:|")
    for case in cases:
        check_equal(case.values)
        rolling = median_ms(partial(numpy_path, case.values, dau=False), args.runs)
        with_dau = median_ms(partial(numpy_path, case.values, dau=True), args.runs)
        kernel = median_ms(partial(hll.rolling_from_values, case.values, WIDTHS, SKIP), args.runs)
        print(f"| {case.name} | {rolling:.2f} ms | {with_dau:.2f} ms | {kernel:.2f} ms "
              f"| x{with_dau / kernel:.1f} |")
    regs = hll.decode_many(large)[SKIP:]
    numpy_dau = median_ms(partial(hll._numpy_estimate_many, regs), args.runs)
    kernel_dau = median_ms(partial(hll.estimate_many, regs), args.runs)
    print(f"\nDAU alone, estimate_many of {len(regs)} decoded dense days: numpy "
          f"{numpy_dau:.2f} ms, kernel {kernel_dau:.2f} ms (x{numpy_dau / kernel_dau:.1f}).")
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"\nwidths {WIDTHS}, skip {SKIP}; median of {args.runs} runs on one core; "
          f"load average at the end {load} on {os.cpu_count()} cores.")


def numpy_path(values: list[bytes | None], dau: bool) -> None:
    regs = hll._numpy_decode_many(values)
    hll._numpy_rolling_estimates(regs, WIDTHS, SKIP)
    if dau:
        hll._numpy_estimate_many(regs[SKIP:])


def check_equal(values: list[bytes | None]) -> None:
    """Both paths must give the same series, or their times mean nothing."""
    regs = hll._numpy_decode_many(values)
    want = hll._numpy_rolling_estimates(regs, WIDTHS, SKIP)
    dau, got = hll.rolling_from_values(values, WIDTHS, SKIP)
    if dau.tolist() != hll._numpy_estimate_many(regs[SKIP:]).tolist() or any(
        got[w].tolist() != want[w].tolist() for w in WIDTHS
    ):
        raise SystemExit("the kernel and the numpy path disagree")


def median_ms(fn: Callable[[], object], runs: int) -> float:
    fn()  # untimed: first-touch page faults, lazily built tables
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return float(np.median(times)) * 1000


# ------------------------------------------------------------------------------------------------
# Data: what PFADD would have written
# ------------------------------------------------------------------------------------------------


def workspace(
    rng: np.random.Generator, days: int, pool: int, per_day: Callable[[], int]
) -> list[bytes | None]:
    """One value per day: `per_day()` distinct users drawn from users 0..pool-1."""
    pairs = [hll.hash_element(f"user-{i}".encode()) for i in range(pool)]  # as Redis hashes
    index = np.array([p[0] for p in pairs], dtype=np.int64)
    value = np.array([p[1] for p in pairs], dtype=np.uint8)
    out: list[bytes | None] = []
    for _ in range(days):
        users = rng.choice(pool, per_day(), replace=False)
        regs = np.zeros(hll.M, dtype=np.uint8)
        np.maximum.at(regs, index[users], value[users])
        out.append(encode(regs))
    return out


def fresh_users(rng: np.random.Generator, days: int, per_day: int) -> list[bytes | None]:
    """One value per day of `per_day` users never seen before (no union ever saturates): each
    user's register and value drawn from the distribution of a hash, which is what hashing
    23 million distinct names would give, at a fraction of the time."""
    out: list[bytes | None] = []
    for _ in range(days):
        regs = np.zeros(hll.M, dtype=np.uint8)
        value = np.minimum(rng.geometric(0.5, per_day), hll.MAX_REGISTER).astype(np.uint8)
        np.maximum.at(regs, rng.integers(0, hll.M, per_day), value)
        out.append(encode(regs))
    return out


def encode(regs: npt.NDArray[np.uint8]) -> bytes:
    """Sparse as Redis writes it, unless Redis would have turned the sketch dense: a value
    above 32, or more than ``hll-sparse-max-bytes``."""
    if int(regs.max()) <= _SPARSE_MAX_VALUE:
        sparse = encode_sparse(regs)
        if len(sparse) <= _SPARSE_MAX_BYTES:
            return sparse
    word = regs.astype(np.uint32).reshape(-1, 4)
    packed = word[:, 0] | word[:, 1] << 6 | word[:, 2] << 12 | word[:, 3] << 18
    body = np.stack([packed & 0xFF, packed >> 8 & 0xFF, packed >> 16], axis=1).astype(np.uint8)
    return _DENSE_HEADER + body.tobytes()


def encode_sparse(regs: npt.NDArray[np.uint8]) -> bytes:
    """ZERO runs up to 64 registers, XZERO beyond, VAL runs of up to 4 equal registers."""
    out = bytearray(_SPARSE_HEADER)
    pos = 0
    for start in np.flatnonzero(regs).tolist():
        if start < pos:  # already in the previous VAL run
            continue
        _zeros(out, start - pos)
        value = int(regs[start])
        end = start + 1
        while end < hll.M and end - start < 4 and regs[end] == value:
            end += 1
        out.append(0x80 | (value - 1) << 2 | (end - start - 1))
        pos = end
    _zeros(out, hll.M - pos)
    return bytes(out)


def _zeros(out: bytearray, n: int) -> None:
    while n > 0:
        run = min(n, hll.M)
        if run > 64:
            out += bytes([0x40 | (run - 1) >> 8, (run - 1) & 0xFF])
        else:
            out.append(run - 1)
        n -= run


if __name__ == "__main__":
    main()
