"""Read Redis HyperLogLog values on the client, and merge and count them in a compiled kernel.

Why this module exists
----------------------
The service keeps one HyperLogLog per workspace and day. A weekly or monthly active-user figure is
the cardinality of the union of 7 or 30 daily sketches, and a dashboard asks for that figure for
many workspaces and many days at once. Redis can answer with a multi-key ``PFCOUNT``, but that
command decodes and merges every sketch inside Redis's single thread: 30 dense sketches are 30 x
16,384 registers, and hundreds of such calls stall every other client of that Redis for their whole
duration. A HyperLogLog value, however, is an ordinary Redis string. So we ``GET`` (or ``MGET``)
each daily sketch once, which costs Redis nothing but a memcpy, and do the decoding, the unions
and the counting here, on a few hundred sketches at once, seen as rows of 16,384 registers: a
union is a register-wise maximum, a rolling 30-day union of every day is a sliding-window maximum
down the rows, and counting is a histogram per row.

How the two encodings are decoded
---------------------------------
Every value starts with a 16-byte header (``HYLL``, an encoding byte, three unused bytes and a
cached cardinality we ignore: it is only valid for the value as a whole and never for a union).

* Dense values pack 16,384 registers of 6 bits from the least significant bit up, so every 3
  bytes hold exactly 4 registers. The kernel unpacks them 3 bytes at a time. The numpy reference
  reads a 3-byte group as a little-endian integer, which holds its 4 registers at bits 0, 6, 12
  and 18; shifting and masking moves them to bits 0, 8, 16 and 24 of a uint32, whose 4 bytes are
  then exactly the 4 registers in order. So the groups of all values are one strided uint32 view
  of the joined bytes, the output array is viewed as uint32 too, and a handful of whole-array
  shifts and masks decode a few hundred sketches: no Python loop runs per register or per value.
* Sparse values are run-length opcodes of 1 byte (ZERO, VAL) or 2 bytes (XZERO, top bits ``01``).
  The kernel walks them one by one, which costs it nanoseconds per opcode (Python needs about a
  microsecond). The numpy reference cannot walk, and finds where opcodes start instead. The only
  sequential part of the format is knowing where an opcode
  starts, because the second byte of an XZERO can look like anything, including another XZERO.
  But a byte that follows a byte without the ``01`` prefix always starts an opcode, so within
  each maximal run of ``01`` bytes the opcodes start at the even offsets: XZERO first byte,
  second byte, first byte, and so on. That parity comes from one cumulative maximum over the
  concatenated bodies. The opcodes are then read at their starts, a cumulative sum of their run
  lengths places every run, and only the VAL runs (1 to 4 registers each) are written into the
  zeroed output. Runs must cover exactly 16,384 registers, as Redis requires.

Every check Redis makes before it will count a value is made here as well, and a value Redis would
refuse raises :class:`HllFormatError` instead of silently yielding registers: a wrong magic, an
unknown encoding or a dense value of the wrong length (Redis answers WRONGTYPE), and sparse runs
that do not add up to 16,384 registers (Redis answers INVALIDOBJ). We are stricter in one case: a
sparse value that ends in the middle of an XZERO opcode is refused, whereas Redis reads the string's
hidden NUL terminator as the missing byte.

Why the estimate must match Redis bit for bit
---------------------------------------------
Some figures still come from Redis (a single day's ``PFCOUNT``), others from here (rolling
unions). If the two disagreed by even one user, a dashboard would show a 7-day figure that changes
depending on which path served it, and tests could never compare the service with Redis exactly.
So :func:`estimate` repeats Redis's computation (``hllCount`` in ``src/hyperloglog.c``, Ertl's
improved estimator, used since Redis 5) operation by operation in IEEE doubles: the same order of
additions, the same loop termination for the ``sigma`` and ``tau`` series (each runs until an
iteration stops changing its value, so the number of iterations depends on rounding), and Redis's
``llroundl``, which rounds halves away from zero where Python's ``round`` would round them to even.
Redis writes the square in ``tau`` as ``pow(1 - x, 2)``, which GCC, at any optimisation level,
turns into ``(1 - x) * (1 - x)`` (``gimple_expand_builtin_pow``); we multiply as well, because
glibc's ``pow``, which Python's ``**`` calls, misses the correctly rounded square by one bit for
some arguments (about 300 of those this series visits, changing one of the 16,383 tau values). The
vectorised :func:`estimate_histograms` and the kernel perform the identical operations on each
histogram, with ``sigma`` and ``tau`` taken from tables holding all 16,385 values their argument
can take; the tests check those tables against the scalar series and every path against a real
redis-server.

The compiled kernel
-------------------
A dashboard's 730-day series of rolling 7- and 30-day users reads 760 daily sketches. With numpy,
the sliding maximum was cheap but counting was not: a histogram per union row is a scatter of
16,384 increments, which numpy can only do with one ``bincount`` call per row (1,462 of them) plus
a copy of every union, about 100 ms for a dense workspace. A loop that increments counters is
exactly what numpy cannot vectorise and a compiler handles well, so the hot path is compiled with
numba (LLVM, called on numpy arrays, no C extension to build or ship) into one pass per value:

* decode the value (dense or sparse) into a ring buffer holding the last ``max(widths)`` rows,
  and count it for the day's own estimate (for a sparse value straight from its run lengths);
* for each width, extend the sliding maximum by that row with the van Herk/Gil-Werman scheme of
  :func:`rolling_max` (three register-wise maxima per row whatever the width, loops that LLVM
  turns into vector instructions), histogram the union while it is in cache (8 bytes read as
  one word, spread over 8 counter tables so that repeated values do not wait on each other's
  stores), and run the estimator on it.

So neither the (n, 16384) register array nor any union is ever stored, and nothing is done per
row in Python. When every value is sparse, only the registers some value sets are kept (the rest
are zero in every union and go straight to the histogram's zero bin), which makes a small
workspace's query cost in proportion to its users. :func:`rolling_from_values` is that pass;
:func:`decode_many`, :func:`estimate_many` and :func:`rolling_estimates` run pieces of it.
Measured on the 2-core development machine (``python -m bench.hll_kernel``, one core): 760 dense
values to DAU and rolling 7 and 30 in 15 to 20 ms, where the numpy path took about 90 ms (70
without the DAU); 760 sparse values in about 1.3 ms instead of 30.

It is still bit for bit Redis's count. Registers and histograms are integers, and a histogram is
the same whatever order it is counted in. The estimator is the same double operations in the same
order: numba compiles without fast-math, so LLVM may neither reassociate the additions nor fuse a
multiply and an add into one rounding, and with ``error_model="numpy"`` a division by zero gives
inf as in C. The numpy implementation stays in this module as the reference, and a Hypothesis
property holds every entry point of the kernel equal to it, beside the tests against redis-server.

Numba compiles a kernel on its first call, which takes seconds (5 to 10 for all of them), so a
process calls :func:`warm_up` at start-up. Compiled code is cached on disk (``cache=True``) and a
later process loads it in milliseconds. Numba looks for a writable place in this order:
``NUMBA_CACHE_DIR`` if set, the ``__pycache__`` directory next to this file, then the user's cache
directory (``$XDG_CACHE_HOME/numba`` or ``~/.cache/numba``). A read-only installation therefore
caches per user; point ``NUMBA_CACHE_DIR`` at a writable volume to share one cache, for instance
in a container. If none is writable, numba refuses ``cache=True`` and the kernels are compiled
without a cache: everything works, but every process compiles for itself in :func:`warm_up`. The
cache is keyed by the source file's contents and the CPU, so an edited module or another machine
compiles afresh.

Registers are hashed exactly as Redis does (MurmurHash64A with seed ``0xadc83b19``) by
:func:`hash_element`, so a sketch can also be built or checked without Redis.
"""

from __future__ import annotations

import functools
import math
import struct
from collections.abc import Callable, Sequence
from typing import Any, Final, TypeVar, cast

import numba
import numpy as np
import numpy.typing as npt

__all__ = [
    "DENSE_SIZE",
    "HEADER_SIZE",
    "MAX_REGISTER",
    "HllFormatError",
    "M",
    "P",
    "Q",
    "decode",
    "decode_many",
    "estimate",
    "estimate_histograms",
    "estimate_many",
    "hash_element",
    "rolling_estimates",
    "rolling_from_values",
    "rolling_max",
    "warm_up",
]

P: Final = 14
"""Bits of the hash that select a register."""
M: Final = 1 << P
"""Registers per sketch (16,384)."""
Q: Final = 64 - P
"""Hash bits left for the run of zeros (50), so a register holds 0 to Q + 1."""
MAX_REGISTER: Final = Q + 1
"""The largest register value ``PFADD`` can write (51)."""

HEADER_SIZE: Final = 16
DENSE_SIZE: Final = HEADER_SIZE + M * 6 // 8
"""12,304 bytes: the header and 16,384 six-bit registers."""

_MAGIC: Final = b"HYLL"
_DENSE: Final = 0
_SPARSE: Final = 1
_SEED: Final = 0xADC83B19
_ALPHA_INF: Final = 0.721347520444481703680  # 0.5 / ln(2), the constant Redis uses
_BINS: Final = 64
"""Histogram bins per sketch. A 6-bit register can hold up to 63; Redis histograms a dense value
into 64 bins and then simply ignores 52..63, and so do we, so that a hand-made value counts as it
would in Redis and can never spill into the next row's bins."""
_DENSE_CHUNK: Final = 32
"""Dense values decoded per step: scratch of 2 x 512 KiB, which stays in cache."""

_MASK64: Final = (1 << 64) - 1
_MURMUR_M: Final = 0xC6A4A7935BD1E995
_MURMUR_R: Final = 47

_INT64_MIN: Final = -(1 << 63)
_TWO_63: Final = float(1 << 63)

_S = TypeVar("_S", bound=np.generic)


class HllFormatError(ValueError):
    """A value Redis itself would refuse to count (WRONGTYPE or INVALIDOBJ)."""



# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------


def decode(value: bytes) -> npt.NDArray[np.uint8]:
    """The 16,384 registers of one ``GET`` result, sparse or dense."""
    registers: npt.NDArray[np.uint8] = decode_many([value])[0]
    return registers


def decode_many(values: Sequence[bytes | None]) -> npt.NDArray[np.uint8]:
    """Registers of many ``MGET`` results as one (n, 16384) array; a missing key is all zeros,
    which is also how Redis's multi-key ``PFCOUNT`` treats it."""
    buf, starts, lengths = _pack(values)
    out = np.empty((len(values), M), dtype=np.uint8)
    status = np.zeros(3, dtype=np.int64)
    _k_decode_many(buf, starts, lengths, _IDENTITY, out, status)
    _raise_for(status, values)
    return out


def _pack(
    values: Sequence[bytes | None],
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """All values joined into one buffer, with each one's start (-1 if missing) and length: the
    one copy the kernel needs, and all the Python that runs per value."""
    n = len(values)
    try:
        lengths = np.fromiter(
            (-1 if v is None else len(v) for v in values), dtype=np.int64, count=n
        )
        joined = b"".join([v for v in values if v is not None])
    except TypeError:
        for row, value in enumerate(values):  # the same refusal, with a clearer message
            if value is not None:
                _check_header(value, row, n)
        raise
    sizes = np.maximum(lengths, 0)
    starts = np.cumsum(sizes) - sizes
    starts[lengths < 0] = -1
    return np.frombuffer(joined, dtype=np.uint8), starts, lengths


def _raise_for(status: npt.NDArray[np.int64], values: Sequence[bytes | None]) -> None:
    """Turn a kernel's refusal (``status``: code, value, registers covered) into the error the
    numpy reference raises, with the same message."""
    code, row, covered = (int(x) for x in status)
    if code == _OK:
        return
    n = len(values)
    value = values[row]
    if code == _BAD_RUNS:
        raise _runs_error(row, n, covered)
    if code == _TRUNCATED:
        raise _truncated_error(row, n)
    assert value is not None  # only present values are refused
    _check_header(value, row, n)  # raises: the kernel refused the header
    raise HllFormatError(f"{_where(row, n)}not a HyperLogLog (Redis: WRONGTYPE)")


def _where(row: int, n: int) -> str:
    return "" if n == 1 else f"value {row}: "


def _check_header(value: bytes, row: int, n: int) -> int:
    """The checks of Redis's ``isHLLObjectOrReply``; returns the encoding."""
    if not isinstance(value, bytes | bytearray | memoryview):
        raise TypeError(f"{_where(row, n)}expected bytes, got {type(value).__name__}")
    if len(value) < HEADER_SIZE:
        raise HllFormatError(
            f"{_where(row, n)}not a HyperLogLog: {len(value)} bytes, shorter than the "
            f"{HEADER_SIZE}-byte header (Redis: WRONGTYPE)"
        )
    if bytes(value[:4]) != _MAGIC:
        raise HllFormatError(
            f"{_where(row, n)}not a HyperLogLog: magic {bytes(value[:4])!r}, expected "
            f"{_MAGIC!r} (Redis: WRONGTYPE)"
        )
    encoding = value[4]
    if encoding == _DENSE:
        if len(value) != DENSE_SIZE:
            raise HllFormatError(
                f"{_where(row, n)}dense HyperLogLog of {len(value)} bytes, expected "
                f"{DENSE_SIZE} (Redis: WRONGTYPE)"
            )
    elif encoding != _SPARSE:
        raise HllFormatError(
            f"{_where(row, n)}unknown HyperLogLog encoding byte {encoding}, expected "
            f"{_DENSE} (dense) or {_SPARSE} (sparse) (Redis: WRONGTYPE)"
        )
    return int(encoding)


def _runs_error(row: int, n: int, covered: int) -> HllFormatError:
    return HllFormatError(
        f"{_where(row, n)}corrupt sparse HyperLogLog: its runs cover {covered} registers, "
        f"not {M} (Redis: INVALIDOBJ)"
    )


def _truncated_error(row: int, n: int) -> HllFormatError:
    return HllFormatError(
        f"{_where(row, n)}corrupt sparse HyperLogLog: it ends inside a 2-byte XZERO "
        f"opcode (Redis would read the string's NUL terminator as the missing byte)"
    )


# --------------------------------------------------------------------------------------------
# Estimating
# --------------------------------------------------------------------------------------------


def estimate(registers: npt.NDArray[np.integer[Any]]) -> int:
    """What ``PFCOUNT`` answers for these registers (or, for a union, multi-key ``PFCOUNT``)."""
    regs = _checked_registers(registers, ndim=1)
    histogram: list[int] = np.bincount(regs, minlength=_BINS).tolist()
    return _estimate_histogram(histogram)


def estimate_many(rows: npt.NDArray[np.integer[Any]]) -> npt.NDArray[np.int64]:
    """:func:`estimate` of every row, with the same doubles (compiled)."""
    regs = _kernel_registers(_checked_registers(rows, ndim=2))
    out = np.empty(regs.shape[0], dtype=np.int64)
    _k_estimate_rows(regs, _sigma_table(), _tau_table(), out)
    return out


def estimate_histograms(hist: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """:func:`estimate` for each row of register-value histograms (n, 64)."""
    h = hist.astype(np.float64)
    m = float(M)
    z = m * _tau_table()[hist[:, Q + 1]]
    for j in range(Q, 0, -1):
        z += h[:, j]
        z *= 0.5
    z += m * _sigma_table()[hist[:, 0]]
    with np.errstate(divide="ignore"):  # z is 0 if all registers are 51, or all above 51
        v = _ALPHA_INF * m * m / z
    return _llround_many(v)


def _checked_registers(
    a: npt.NDArray[np.integer[Any]], ndim: int
) -> npt.NDArray[np.integer[Any]]:
    """Registers as an array `bincount` accepts, refusing what would corrupt a histogram."""
    arr = np.asarray(a)
    if arr.ndim != ndim or arr.shape[-1] != M:
        want = f"({M},)" if ndim == 1 else f"(n, {M})"
        raise ValueError(f"expected registers of shape {want}, got {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"registers must be integers, got {arr.dtype}")
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= _BINS):
        raise ValueError(f"register values must lie in 0..{_BINS - 1}")
    if arr.dtype.itemsize > np.dtype(np.intp).itemsize or arr.dtype == np.uint64:
        arr = arr.astype(np.intp)
    return arr


def _estimate_histogram(h: list[int]) -> int:
    """``hllCount`` from its register histogram, in the same order of double operations."""
    m = float(M)
    z = m * _tau((m - h[Q + 1]) / m)
    for j in range(Q, 0, -1):
        z += h[j]
        z *= 0.5
    z += m * _sigma(h[0] / m)
    # z is 0 if all registers are 51, or all above 51: C divides into +inf, Python would raise.
    return _llround(_ALPHA_INF * m * m / z if z != 0.0 else math.inf)


def _sigma(x: float) -> float:
    """Redis's ``hllSigma``: the correction for empty registers."""
    if x == 1.0:
        return math.inf
    y = 1.0
    z = x
    while True:
        x *= x
        z_prime = z
        z += x * y
        y += y
        if z_prime == z:
            return z


def _tau(x: float) -> float:
    """Redis's ``hllTau``: the correction for registers at the maximum, Q + 1."""
    if x == 0.0 or x == 1.0:
        return 0.0
    y = 1.0
    z = 1.0 - x
    while True:
        x = math.sqrt(x)
        z_prime = z
        y *= 0.5
        d = 1.0 - x
        z -= d * d * y  # Redis's pow(1 - x, 2), which GCC folds into this multiplication
        if z_prime == z:
            return z / 3.0


def _llround(v: float) -> int:
    """C's ``llroundl`` as Redis uses it: halves away from zero. Redis casts the result through
    a double into a uint64 and replies with it as a signed 64-bit integer, so a value beyond the
    int64 range comes back as -2**63. That takes nearly every register at 51, which no real set
    reaches (each register gets there with odds of 2**-50 per element), but Redis answers it."""
    if not v < _TWO_63:  # also catches inf and nan
        return _INT64_MIN
    f = math.floor(v)
    return int(f) + (1 if v - f >= 0.5 else 0)  # v - f is exact for doubles


def _llround_many(v: npt.NDArray[np.float64]) -> npt.NDArray[np.int64]:
    f = np.floor(v)
    with np.errstate(invalid="ignore"):  # inf - inf, in rows that overflow anyway
        r = f + (v - f >= 0.5)
    out = np.full(v.shape, _INT64_MIN, dtype=np.int64)
    ok = r < _TWO_63  # False for inf and nan
    out[ok] = r[ok].astype(np.int64)
    return out


@functools.cache
def _sigma_table() -> npt.NDArray[np.float64]:
    """``_sigma(k / M)`` for every possible count k of empty registers, 0..M.

    The series is iterated on all arguments at once, each element leaving the loop at the very
    iteration where the scalar loop would stop, so every entry is the scalar's exact double."""
    x_all = np.arange(M + 1, dtype=np.float64) / float(M)
    table = np.empty(M + 1, dtype=np.float64)
    table[M] = math.inf
    idx = np.arange(M)
    x = x_all[:M].copy()
    y = np.ones(M)
    z = x.copy()
    while idx.size:
        x = x * x
        z_new = z + x * y
        y = y + y
        done = z_new == z
        table[idx[done]] = z_new[done]
        keep = ~done
        idx, x, y, z = idx[keep], x[keep], y[keep], z_new[keep]
    table.flags.writeable = False
    return table


@functools.cache
def _tau_table() -> npt.NDArray[np.float64]:
    """``_tau((M - k) / M)`` for every possible count k of registers at Q + 1, 0..M."""
    m = float(M)
    x_all = (m - np.arange(M + 1, dtype=np.float64)) / m
    table = np.zeros(M + 1, dtype=np.float64)  # tau is 0 at x == 1 (k = 0) and x == 0 (k = M)
    idx = np.arange(1, M)
    x = x_all[1:M].copy()
    y = np.ones(M - 1)
    z = 1.0 - x
    while idx.size:
        x = np.sqrt(x)
        y = y * 0.5
        d = 1.0 - x
        z_new = z - d * d * y
        done = z_new == z
        table[idx[done]] = z_new[done] / 3.0
        keep = ~done
        idx, x, y, z = idx[keep], x[keep], y[keep], z_new[keep]
    table.flags.writeable = False
    return table



# --------------------------------------------------------------------------------------------
# Unions over time
# --------------------------------------------------------------------------------------------


def rolling_from_values(
    values: Sequence[bytes | None], widths: Sequence[int], skip: int
) -> tuple[npt.NDArray[np.int64], dict[int, npt.NDArray[np.int64]]]:
    """Straight from ``GET`` results (one per day, oldest first; None for a missing key) to
    ``(dau, {width: estimates})`` for the days ``skip .. n-1``: ``dau[k]`` is what ``PFCOUNT``
    answers for day ``skip + k`` alone, and ``estimates[k]`` for the union of the `width` days
    ending there (fewer at the start, as with :func:`rolling_max`).

    Equal to :func:`decode_many` followed by :func:`rolling_estimates` and
    :func:`estimate_many` of the rows from `skip` on, but one pass of the kernel: a value is
    decoded into a ring of the last ``max(widths)`` rows and used at once, so the (n, 16384)
    array is never built. When every value is sparse, only the registers some value sets are
    kept (the others are 0 in every union and are added to bin 0 of every histogram)."""
    blocks = _blocks(len(values), widths, skip)
    buf, starts, lengths = _pack(values)
    colmap, columns = _IDENTITY, M
    if lengths.size:
        mark = np.zeros(M, dtype=np.uint8)
        if _k_touched(buf, starts, lengths, mark):
            touched = np.flatnonzero(mark)
            if touched.size <= M // 2:  # beyond that, compressing copies more than it saves
                colmap = np.full(M, -1, dtype=np.int64)
                colmap[touched] = np.arange(touched.size)
                columns = int(touched.size)
    rows = max(0, len(values) - skip)
    dau = np.empty(rows, dtype=np.int64)
    rolling = np.empty((blocks.size, rows), dtype=np.int64)
    status = np.zeros(3, dtype=np.int64)
    _k_rolling_values(
        buf, starts, lengths, colmap, _padded(columns), blocks, skip,
        _sigma_table(), _tau_table(), dau, rolling, status,
    )
    _raise_for(status, values)
    return dau, _by_width(widths, rolling)


def rolling_estimates(
    registers: npt.NDArray[np.uint8], widths: Sequence[int], skip: int
) -> dict[int, npt.NDArray[np.int64]]:
    """For each width, the estimate of the union of every `width` consecutive rows ending at rows
    ``skip .. n-1`` (one row per day: the rolling WAU and MAU of each day).

    Registers that are 0 in every row stay 0 in every union, so only the columns some row touches
    are merged and counted, and the untouched ones are added to each histogram's zero bin: a
    workspace with tens of users a day touches a few thousand of the 16,384 registers, and its
    query costs that much less."""
    regs = _checked_registers(registers, ndim=2)
    blocks = _blocks(regs.shape[0], widths, skip)
    touched = np.flatnonzero(regs.any(axis=0))
    if touched.size <= M // 2:  # beyond that, compressing copies more than it saves
        regs = regs[:, touched]
    regs = _kernel_registers(regs)
    out = np.empty((blocks.size, max(0, regs.shape[0] - skip)), dtype=np.int64)
    _k_rolling_registers(
        regs, _padded(regs.shape[1]), blocks, skip, _sigma_table(), _tau_table(), out
    )
    return _by_width(widths, out)


def _blocks(n: int, widths: Sequence[int], skip: int) -> npt.NDArray[np.int64]:
    """The kernel's block length for each distinct width: the width, or n if that is less (a
    window reaching past row 0 is the running maximum from row 0)."""
    for width in widths:
        if width < 1:
            raise ValueError(f"width must be at least 1, got {width}")
    if skip < 0:
        raise ValueError(f"skip must not be negative, got {skip}")
    return np.array([min(w, max(n, 1)) for w in dict.fromkeys(widths)], dtype=np.int64)


def _by_width(
    widths: Sequence[int], rows: npt.NDArray[np.int64]
) -> dict[int, npt.NDArray[np.int64]]:
    return {w: rows[i] for i, w in enumerate(dict.fromkeys(widths))}


def _padded(columns: int) -> int:
    """Row length in the kernel's buffers: a multiple of 8, so that a row is whole int64 words.
    The padding is 0 in every buffer, and the kernel takes it back out of bin 0."""
    return -(-columns // 8) * 8


def _kernel_registers(regs: npt.NDArray[np.integer[Any]]) -> npt.NDArray[np.uint8]:
    """Registers as the one array type the kernels are compiled for: C-ordered, writeable
    uint8. Any other type would compile a second version of a kernel, for seconds, mid-request.
    The values are known to lie in 0..63 here."""
    if regs.dtype == np.uint8 and regs.flags.c_contiguous and regs.flags.writeable:
        return cast("npt.NDArray[np.uint8]", regs)
    return np.array(regs, dtype=np.uint8, order="C")


def rolling_max(rows: npt.NDArray[_S], width: int) -> npt.NDArray[_S]:
    """Row i is the element-wise maximum of rows max(0, i - width + 1) .. i.

    With one sketch per day, this is the union of the last `width` days for every day at once.
    The van Herk/Gil-Werman scheme cuts the rows into blocks of `width` and takes a running
    maximum forwards (g) and backwards (h) inside each block; every window then spans at most two
    blocks, so its maximum is ``max(h[start], g[end])``: three maxima per element whatever the
    width, instead of `width` of them. The running maxima step through the `width` positions of
    all blocks at once, because ``numpy.maximum.accumulate`` along a short middle axis runs its
    inner loop `width` elements at a time and is some 30 times slower."""
    if width < 1:
        raise ValueError(f"width must be at least 1, got {width}")
    arr = np.asarray(rows)
    if arr.ndim < 1:
        raise ValueError("rolling_max needs at least one dimension")
    n = arr.shape[0]
    w = min(width, n)  # a window reaching past row 0 is the running maximum from row 0
    if w <= 1:
        return arr.copy()
    rest = arr.shape[1:]
    full = n - n % w  # rows in whole blocks
    blocks = arr[:full].reshape((full // w, w, *rest))

    # g, the forward maximum within blocks, is built in `out` (C order, so reshapes are views).
    out = np.empty_like(arr, order="C")
    g = out[:full].reshape(blocks.shape)
    g[:, 0] = blocks[:, 0]
    for j in range(1, w):
        np.maximum(g[:, j - 1], blocks[:, j], out=g[:, j])
    out[full:] = arr[full:]  # the tail block, shorter than w
    for i in range(full + 1, n):  # slices, not out[i], which is a scalar when rows are 1-D
        np.maximum(out[i - 1 : i], arr[i : i + 1], out=out[i : i + 1])

    # h, the backward maximum within blocks, is needed only at window starts 0..n-w, which all
    # lie in whole blocks (a window starting in the tail block would end past row n-1).
    h = np.empty_like(blocks, order="C")
    h[:, w - 1] = blocks[:, w - 1]
    for j in range(w - 2, -1, -1):
        np.maximum(h[:, j + 1], blocks[:, j], out=h[:, j])

    # Rows 0..w-2 are windows clipped at row 0, for which g of block 0 already is the answer.
    # Row i >= w-1 is max(h[i-w+1], g[i]).
    np.maximum(h.reshape(arr[:full].shape)[: n - w + 1], out[w - 1 :], out=out[w - 1 :])
    return out


# --------------------------------------------------------------------------------------------
# The compiled kernel
# --------------------------------------------------------------------------------------------

_OK: Final = 0
_BAD_HEADER: Final = 1
_BAD_RUNS: Final = 2
_TRUNCATED: Final = 3
"""What a kernel reports in ``status[0]`` about the first value it refuses (``status[1]``)."""

_IDENTITY: Final = np.arange(M, dtype=np.int64)
"""The column map of the uncompressed layout: register r is column r."""

_F = TypeVar("_F", bound=Callable[..., Any])


def _jit(fn: _F) -> _F:
    """Compile `fn` with numba on its first call: without the GIL (so that ``to_thread`` callers
    run in parallel), with C's float division (x / 0 is inf, as in Redis, instead of Python's
    ZeroDivisionError check) and no fast-math (every double operation stays as written), cached
    on disk when numba finds a writable directory for it, and compiled per process otherwise."""
    try:
        return cast(_F, numba.njit(cache=True, **_JIT_OPTIONS)(fn))
    except RuntimeError as err:  # raised here, at decoration, when no cache directory is writable
        if "no locator available" not in str(err):
            raise
        return cast(_F, numba.njit(**_JIT_OPTIONS)(fn))


_JIT_OPTIONS: Final[dict[str, Any]] = {"nogil": True, "error_model": "numpy"}


_U8 = npt.NDArray[np.uint8]
_I64 = npt.NDArray[np.int64]
_F64 = npt.NDArray[np.float64]


@_jit
def _k_histogram(row: _U8, lanes: _I64, hist: _I64) -> None:
    """``hist[v]``: how many bytes of `row` hold v (their low 6 bits; every caller's values are
    below 64). The row's length is a multiple of 8, and 8 bytes are read as one word whose bytes
    go to 8 separate tables: a register value repeats a lot, and increments of the same counter
    in a row would each wait for the previous store."""
    words = row.view(np.int64)
    lanes[:] = 0
    for j in range(words.shape[0]):
        x = words[j]
        lanes[x & 63] += 1
        lanes[64 + (x >> 8 & 63)] += 1
        lanes[128 + (x >> 16 & 63)] += 1
        lanes[192 + (x >> 24 & 63)] += 1
        lanes[256 + (x >> 32 & 63)] += 1
        lanes[320 + (x >> 40 & 63)] += 1
        lanes[384 + (x >> 48 & 63)] += 1
        lanes[448 + (x >> 56 & 63)] += 1
    for v in range(_BINS):
        total = 0
        for lane in range(8):
            total += lanes[lane * _BINS + v]
        hist[v] = total


@_jit
def _k_llround(v: float) -> int:
    """:func:`_llround`."""
    f = np.floor(v)
    r = f + 1.0 if v - f >= 0.5 else f
    if r < _TWO_63:  # False for inf and nan
        return int(r)
    return _INT64_MIN


@_jit
def _k_count(hist: _I64, sigma: _F64, tau: _F64) -> int:
    """:func:`estimate_histograms` of one histogram: the same doubles in the same order."""
    m = float(M)
    z = m * tau[hist[Q + 1]]
    for j in range(Q, 0, -1):
        z += hist[j]
        z *= 0.5
    z += m * sigma[hist[0]]
    return _k_llround(_ALPHA_INF * m * m / z)


@_jit
def _k_decode_value(
    buf: _U8, start: int, length: int, row: _U8, colmap: _I64, hist: _I64, lanes: _I64,
    want_hist: bool,
) -> tuple[int, int]:
    """One value's registers into `row` (register r at ``row[colmap[r]]``), and with `want_hist`
    its histogram into `hist`. Returns (status, registers its runs cover), making every check
    :func:`_check_header` and the numpy reference make, in the same order.

    A sparse value is walked opcode by opcode, which here costs nanoseconds, and its histogram
    comes from the run lengths without looking at the row. The row must be uncompressed (colmap
    the identity) for a dense value, which the callers ensure."""
    if start < 0:  # a missing key: all registers 0
        row[:] = 0
        if want_hist:
            hist[:] = 0
            hist[0] = M
        return _OK, M
    if (
        length < HEADER_SIZE
        or buf[start] != 72  # H
        or buf[start + 1] != 89  # Y
        or buf[start + 2] != 76  # L
        or buf[start + 3] != 76  # L
    ):
        return _BAD_HEADER, 0
    encoding = buf[start + 4]
    if encoding == _DENSE:
        if length != DENSE_SIZE:
            return _BAD_HEADER, 0
        p = start + HEADER_SIZE
        for r in range(0, M, 4):  # 3 bytes hold 4 registers, from the least significant bit
            b0 = int(buf[p])
            b1 = int(buf[p + 1])
            b2 = int(buf[p + 2])
            row[r] = b0 & 63
            row[r + 1] = (b0 >> 6 | b1 << 2) & 63
            row[r + 2] = (b1 >> 4 | b2 << 4) & 63
            row[r + 3] = b2 >> 2
            p += 3
        if want_hist:
            _k_histogram(row, lanes, hist)
        return _OK, M
    if encoding != _SPARSE:
        return _BAD_HEADER, 0

    row[:] = 0
    if want_hist:
        hist[:] = 0
    p = start + HEADER_SIZE
    end = start + length
    covered = 0
    nonzero = 0
    while p < end:
        op = int(buf[p])
        if op < 0x40:  # ZERO: 1 to 64 registers at 0
            run = (op & 0x3F) + 1
            p += 1
        elif op < 0x80:  # XZERO: 2 bytes, up to 16,384 registers at 0
            if p + 1 == end:
                return _TRUNCATED, covered
            run = ((op & 0x3F) << 8 | int(buf[p + 1])) + 1
            p += 2
        else:  # VAL: 1 to 4 registers at 1 to 32
            run = (op & 0x03) + 1
            value = (op >> 2 & 0x1F) + 1
            p += 1
            if covered + run <= M:  # else the value is refused below
                for r in range(covered, covered + run):
                    row[colmap[r]] = value
            if want_hist:
                hist[value] += run
            nonzero += run
        covered += run
    if covered != M:
        return _BAD_RUNS, covered
    if want_hist:
        hist[0] = M - nonzero
    return _OK, M


@_jit
def _k_decode_many(
    buf: _U8, starts: _I64, lengths: _I64, colmap: _I64, out: _U8, status: _I64
) -> None:
    """:func:`decode_many`: every value into its row of `out`; stops at the first refusal."""
    lanes = np.zeros(8 * _BINS, dtype=np.int64)
    hist = np.zeros(_BINS, dtype=np.int64)
    for i in range(starts.shape[0]):
        code, covered = _k_decode_value(
            buf, starts[i], lengths[i], out[i], colmap, hist, lanes, False
        )
        if code != _OK:
            status[0], status[1], status[2] = code, i, covered
            return


@_jit
def _k_touched(buf: _U8, starts: _I64, lengths: _I64, mark: _U8) -> bool:
    """Marks in `mark` the registers some value sets, if every value present is sparse (else
    returns False: a dense value sets most registers, and every column is kept). Only walks the
    opcodes; a value Redis would refuse is refused later, by the decoding."""
    for i in range(starts.shape[0]):
        start = starts[i]
        if start < 0:
            continue
        if lengths[i] < HEADER_SIZE or buf[start + 4] != _SPARSE:
            return False
        p = start + HEADER_SIZE
        end = start + lengths[i]
        covered = 0
        while p < end and covered < M:
            op = int(buf[p])
            if op < 0x40:
                covered += (op & 0x3F) + 1
                p += 1
            elif op < 0x80:
                if p + 1 == end:
                    break
                covered += ((op & 0x3F) << 8 | int(buf[p + 1])) + 1
                p += 2
            else:
                for r in range(covered, min(covered + (op & 0x03) + 1, M)):
                    mark[r] = 1
                covered += (op & 0x03) + 1
                p += 1
    return True


@_jit
def _k_copy(src: _U8, dst: _U8) -> None:
    """``dst[:len(src)] = src``, as a loop: numba's slice assignment takes seconds to compile."""
    for j in range(src.shape[0]):
        dst[j] = src[j]


@_jit
def _k_roll_step(
    ring: _U8, i: int, skip: int, w: int, g: _U8, back: _U8, first: int, cur: _U8,
    lanes: _I64, hist: _I64, sigma: _F64, tau: _F64, out: _I64,
) -> None:
    """Row i of one width's rolling union (block length `w`), from the ring of recent rows.

    The van Herk/Gil-Werman scheme of :func:`rolling_max`, one row at a time: `g` is the
    running maximum since the start of row i's block of `w` rows, and ``back[first + t]`` the
    maximum of rows t .. w-1 of the previous block, built when a block starts. A window that
    does not start a block spans the two, so its union is ``max(back[first + start], g)``:
    three maxima per register whatever the width, each a loop over one row that the compiler
    turns into vector instructions. The union is then histogrammed and counted while it is
    still in cache, so no union of all rows is ever stored."""
    slots = ring.shape[0]
    block = i - i % w
    if i == block and w > 1 and i >= w and i + w - 2 >= skip:
        _k_copy(ring[(i - 1) % slots], back[first + w - 1])
        for t in range(w - 2, 0, -1):
            src = ring[(i - w + t) % slots]
            above = back[first + t + 1]
            dst = back[first + t]
            for j in range(dst.shape[0]):
                dst[j] = max(above[j], src[j])
    if i < skip - skip % w:  # g is first needed from the start of row skip's block
        return
    row = ring[i % slots]
    if i == block:
        _k_copy(row, g)
    else:
        for j in range(g.shape[0]):
            g[j] = max(g[j], row[j])
    if i < skip:
        return
    start = i - w + 1
    if i < w or start == block:  # the window lies in this block (or is cut off at row 0)
        _k_histogram(g, lanes, hist)
    else:
        before = back[first + start - block + w]
        for j in range(cur.shape[0]):
            cur[j] = max(before[j], g[j])
        _k_histogram(cur, lanes, hist)
    hist[0] += M - g.shape[0]  # registers no value touches, less the padding
    out[i - skip] = _k_count(hist, sigma, tau)


@_jit
def _k_rolling_values(
    buf: _U8, starts: _I64, lengths: _I64, colmap: _I64, columns: int, blocks: _I64,
    skip: int, sigma: _F64, tau: _F64, dau: _I64, rolling: _I64, status: _I64,
) -> None:
    """:func:`rolling_from_values`: each value is decoded into a ring holding the last
    ``max(blocks)`` rows (all that the block scheme reads back), counted alone for the DAU,
    and stepped through every width."""
    n = starts.shape[0]
    slots = max(1, blocks.max()) if blocks.size else 1
    ring = np.zeros((slots, columns), dtype=np.uint8)
    g = np.zeros((blocks.size, columns), dtype=np.uint8)
    back = np.zeros((max(1, blocks.sum()), columns), dtype=np.uint8)
    cur = np.zeros(columns, dtype=np.uint8)
    lanes = np.zeros(8 * _BINS, dtype=np.int64)
    hist = np.zeros(_BINS, dtype=np.int64)
    for i in range(n):
        want = i >= skip
        code, covered = _k_decode_value(
            buf, starts[i], lengths[i], ring[i % slots], colmap, hist, lanes, want
        )
        if code != _OK:
            status[0], status[1], status[2] = code, i, covered
            return
        if want:
            dau[i - skip] = _k_count(hist, sigma, tau)
        first = 0
        for x in range(blocks.size):
            w = blocks[x]
            _k_roll_step(
                ring, i, skip, w, g[x], back, first, cur, lanes, hist, sigma, tau, rolling[x]
            )
            first += w


@_jit
def _k_rolling_registers(
    regs: _U8, columns: int, blocks: _I64, skip: int, sigma: _F64, tau: _F64, out: _I64
) -> None:
    """:func:`rolling_estimates`: :func:`_k_rolling_values` with decoded rows, which are copied
    into the ring (a row of it is padded to whole words)."""
    n = regs.shape[0]
    slots = max(1, blocks.max()) if blocks.size else 1
    ring = np.zeros((slots, columns), dtype=np.uint8)
    g = np.zeros((blocks.size, columns), dtype=np.uint8)
    back = np.zeros((max(1, blocks.sum()), columns), dtype=np.uint8)
    cur = np.zeros(columns, dtype=np.uint8)
    lanes = np.zeros(8 * _BINS, dtype=np.int64)
    hist = np.zeros(_BINS, dtype=np.int64)
    for i in range(n):
        _k_copy(regs[i], ring[i % slots])
        first = 0
        for x in range(blocks.size):
            w = blocks[x]
            _k_roll_step(ring, i, skip, w, g[x], back, first, cur, lanes, hist, sigma, tau, out[x])
            first += w


@_jit
def _k_estimate_rows(rows: _U8, sigma: _F64, tau: _F64, out: _I64) -> None:
    """:func:`estimate_many`."""
    lanes = np.zeros(8 * _BINS, dtype=np.int64)
    hist = np.zeros(_BINS, dtype=np.int64)
    for i in range(rows.shape[0]):
        _k_histogram(rows[i], lanes, hist)
        out[i] = _k_count(hist, sigma, tau)


def warm_up() -> None:
    """Compile every kernel, or load it from numba's cache, on inputs of a few bytes, so that
    no request pays for it (compiling takes seconds; loading from the cache, milliseconds).
    Meant for a process's start-up; calling it again costs next to nothing."""
    empty = _MAGIC + bytes([_SPARSE]) + bytes(11) + b"\x7f\xff"  # XZERO of all 16,384
    dense = _MAGIC + bytes(DENSE_SIZE - len(_MAGIC))
    decode_many([empty, dense, None])
    rolling_from_values([empty, None], (1, 2), 0)  # every value sparse: compressed columns
    rolling_from_values([dense, empty], (2,), 1)  # a dense value: every column
    rolling_estimates(np.zeros((2, M), dtype=np.uint8), (1, 2), 0)
    estimate_many(np.zeros((1, M), dtype=np.uint8))


# --------------------------------------------------------------------------------------------
# The numpy reference
# --------------------------------------------------------------------------------------------
# The implementation before the kernel, kept as the independent reference the tests compare the
# kernel with (and the benchmark measures it against): whole-array numpy operations, with no
# loop shared with the kernel's.


def _numpy_decode_many(values: Sequence[bytes | None]) -> npt.NDArray[np.uint8]:
    """:func:`decode_many` with numpy: the reference the kernel is tested against."""
    n = len(values)
    out = np.zeros((n, M), dtype=np.uint8)
    dense_rows: list[int] = []
    dense_values: list[bytes] = []
    sparse_rows: list[int] = []
    sparse_values: list[bytes] = []
    for row, value in enumerate(values):
        if value is None:
            continue
        if _check_header(value, row, n) == _DENSE:
            dense_rows.append(row)
            dense_values.append(value)
        else:
            sparse_rows.append(row)
            sparse_values.append(value)

    if sparse_values:
        _decode_sparse(sparse_values, sparse_rows, out)
    if dense_values:
        _decode_dense(dense_values, dense_rows, out)
    return out


def _decode_dense(values: list[bytes], rows: list[int], out: npt.NDArray[np.uint8]) -> None:
    """Unpack dense bodies into ``out[rows]``.

    Each 3-byte group is read as one little-endian uint32 starting a byte early (the early byte is
    the last header byte or the previous group's third byte, and is shifted out), so the groups
    of all values are one strided (k, 4096) uint32 view of the joined bytes, with no read past
    the end. The four 6-bit fields are then spread to the four bytes of a uint32 that is written
    straight into the uint8 output viewed as little-endian uint32. Rows go in chunks so that the
    scratch arrays stay in cache."""
    k = len(values)
    joined = b"".join(values)
    groups = np.ndarray(
        (k, M // 4), dtype="<u4", buffer=joined, offset=HEADER_SIZE - 1, strides=(DENSE_SIZE, 3)
    )
    out_words = out.view("<u4")  # (n, 4096); the bytes of each word are 4 consecutive registers
    chunk = min(_DENSE_CHUNK, k)
    word = np.empty((chunk, M // 4), dtype="<u4")
    spread = np.empty_like(word)
    direct = rows == list(range(rows[0], rows[0] + k))
    for lo in range(0, k, chunk):
        hi = min(lo + chunk, k)
        w, t = word[: hi - lo], spread[: hi - lo]
        x = out_words[rows[0] + lo : rows[0] + hi] if direct else np.empty_like(w)
        np.copyto(w, groups[lo:hi])
        # register j of the group sits at bits 8 + 6j of w and goes to bits 8j of x
        np.right_shift(w, 8, out=x)
        x &= 0x3F
        for shift, mask in ((6, 0x3F00), (4, 0x3F0000), (2, 0x3F000000)):
            np.right_shift(w, shift, out=t)
            t &= mask
            x |= t
        if not direct:
            out_words[rows[lo:hi]] = x


def _decode_sparse(values: list[bytes], rows: list[int], out: npt.NDArray[np.uint8]) -> None:
    """Expand sparse bodies into ``out[rows]``, which must be all zeros."""
    n = out.shape[0]
    k = len(values)
    lengths = np.fromiter((len(v) - HEADER_SIZE for v in values), dtype=np.intp, count=k)
    empty = np.flatnonzero(lengths == 0)
    if empty.size:
        raise _runs_error(rows[int(empty[0])], n, 0)

    data = np.frombuffer(b"".join(v[HEADER_SIZE:] for v in values), dtype=np.uint8)
    lasts = np.cumsum(lengths) - 1  # offset in `data` of the last byte of each body
    firsts = lasts - lengths + 1

    # Which bytes start an opcode. A byte after one without the XZERO prefix 01 always does, and
    # so does the first byte of a body; inside a run of 01-prefixed bytes the starts alternate.
    # `anchor` is the position just before the current run of 01 bytes.
    pos = np.arange(data.size, dtype=np.intp)
    xprefix = (data & 0xC0) == 0x40
    anchor = np.where(xprefix, -1, pos)
    anchor[firsts] = np.where(xprefix[firsts], firsts - 1, firsts)
    np.maximum.accumulate(anchor, out=anchor)
    np.subtract(pos, anchor, out=anchor)
    xzero = xprefix & (anchor & 1).astype(bool)  # at an even offset inside its run
    truncated = np.flatnonzero(xzero[lasts])
    if truncated.size:
        i = int(truncated[0])
        raise _truncated_error(rows[i], n)
    second = np.zeros(data.size, dtype=bool)
    second[1:] = xzero[:-1]
    starts = np.flatnonzero(~second)

    op = data[starts]
    runlen = _SPARSE_RUNLEN[op]
    xz = np.flatnonzero(xzero[starts])
    # no XZERO ends `data`, so its second byte is always there
    runlen[xz] = ((op[xz].astype(np.int32) & 0x3F) << 8 | data[starts[xz] + 1]) + 1

    # Registers covered by each body: the running total at its last opcode, minus the previous.
    ends = np.cumsum(runlen, dtype=np.int64)
    last_op = np.searchsorted(starts, lasts, side="right") - 1
    covered = np.diff(ends[last_op], prepend=0)
    wrong = np.flatnonzero(covered != M)
    if wrong.size:
        i = int(wrong[0])
        raise _runs_error(rows[i], n, int(covered[i]))

    # Every body covers exactly M registers, so the running total before an opcode is
    # body * M + register. Only VAL runs (1 to 4 registers) are written; the rest of `out` is
    # already zero, and most runs are a single register, so writing the 1st, 2nd, 3rd and 4th
    # register of the runs in turn beats expanding every run with numpy.repeat.
    val = np.flatnonzero(op >= 0x80)
    vop = op[val]
    first = ends[val] - _SPARSE_RUNLEN[vop]
    if rows == list(range(rows[0], rows[0] + k)):
        first += rows[0] * M
    else:
        first = np.asarray(rows, dtype=np.int64)[first >> P] * M + (first & (M - 1))
    flat = out.reshape(-1)
    value = _SPARSE_VALUE[vop]
    flat[first] = value
    for extra in range(1, 4):
        more = np.flatnonzero((vop & 0x03) >= extra)
        if not more.size:
            break
        flat[first[more] + extra] = value[more]


def _sparse_tables() -> tuple[npt.NDArray[np.int32], npt.NDArray[np.uint8]]:
    """Run length and register value for each opcode byte. For an XZERO first byte the run
    length here is wrong (its low byte is the next byte) and is replaced after the lookup."""
    op = np.arange(256)
    is_val = op >= 0x80
    runlen = np.where(is_val, (op & 0x03) + 1, (op & 0x3F) + 1).astype(np.int32)
    value = np.where(is_val, ((op >> 2) & 0x1F) + 1, 0).astype(np.uint8)
    return runlen, value


_SPARSE_RUNLEN, _SPARSE_VALUE = _sparse_tables()


def _numpy_estimate_many(rows: npt.NDArray[np.integer[Any]]) -> npt.NDArray[np.int64]:
    """:func:`estimate_many` with numpy."""
    return estimate_histograms(_histograms(_checked_registers(rows, ndim=2)))


def _numpy_rolling_estimates(
    registers: npt.NDArray[np.uint8], widths: Sequence[int], skip: int
) -> dict[int, npt.NDArray[np.int64]]:
    """For each width, the estimate of the union of every `width` consecutive rows ending at rows
    ``skip .. n-1`` (one row per day: the rolling WAU and MAU of each day).

    The rows are decoded once for all widths. Registers that are 0 in every row stay 0 in every
    union, so only the columns some row touches are merged and counted, and the untouched ones
    are added to each histogram's zero bin: a workspace with tens of users a day touches a few
    thousand of the 16,384 registers, and its query costs that much less."""
    regs = registers if registers.dtype == np.uint8 else _checked_registers(registers, ndim=2)
    if regs.ndim != 2 or regs.shape[1] != M:
        raise ValueError(f"expected registers of shape (n, {M}), got {regs.shape}")
    # uint8 needs no range check: a value above 63 could only come from a hand-made dense
    # value, which decode() reads 6 bits at a time, so it cannot occur.
    touched = np.flatnonzero(regs.any(axis=0))
    if touched.size > M // 2:  # compressing would copy more than it saves
        sub, untouched = regs, 0
    else:
        sub, untouched = np.ascontiguousarray(regs[:, touched]), M - touched.size
    out: dict[int, npt.NDArray[np.int64]] = {}
    for width in widths:
        merged = rolling_max(sub, width)[skip:]
        hist = _histograms(merged)
        hist[:, 0] += untouched
        out[width] = estimate_histograms(hist)
    return out


def _histograms(rows: npt.NDArray[np.integer[Any]]) -> npt.NDArray[np.int64]:
    """Per-row counts of each register value. One ``bincount`` per row: for 16,384 registers a
    row's counts stay in cache, which measured about 3 times faster than one big ``bincount``
    over ``value + 64 * row`` (that needs an intp copy of the whole array)."""
    n = rows.shape[0]
    hist = np.empty((n, _BINS), dtype=np.int64)
    for i in range(n):
        hist[i] = np.bincount(rows[i], minlength=_BINS)
    return hist


# --------------------------------------------------------------------------------------------
# Hashing
# --------------------------------------------------------------------------------------------


def hash_element(element: bytes) -> tuple[int, int]:
    """(register index, register value) that ``PFADD`` derives from one element."""
    h = _murmurhash64a(element, _SEED)
    index = h & (M - 1)
    rest = (h >> P) | (1 << Q)  # the forced bit caps the value at Q + 1
    return index, (rest & -rest).bit_length()  # trailing zeros + 1


def _murmurhash64a(data: bytes, seed: int) -> int:
    """MurmurHash64A as compiled into Redis (little-endian reads on every platform)."""
    n = len(data)
    h = (seed ^ (n * _MURMUR_M)) & _MASK64
    whole = n - (n & 7)
    for (k,) in struct.iter_unpack("<Q", data[:whole]):
        k = (k * _MURMUR_M) & _MASK64
        k ^= k >> _MURMUR_R
        k = (k * _MURMUR_M) & _MASK64
        h ^= k
        h = (h * _MURMUR_M) & _MASK64
    if n & 7:
        h ^= int.from_bytes(data[whole:], "little")
        h = (h * _MURMUR_M) & _MASK64
    h ^= h >> _MURMUR_R
    h = (h * _MURMUR_M) & _MASK64
    h ^= h >> _MURMUR_R
    return h
