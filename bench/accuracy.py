"""Accuracy: HLL (``PFADD``/``PFCOUNT``) against the truth for log-spaced cardinalities.

Each cardinality gets ``acc_trials`` independent sketches (distinct element names). Redis's
standard error is 1.04 / sqrt(16384) = 0.81 %: about 68 % of estimates should fall within it, 95 %
within twice it, and the root-mean-square relative error over many sketches should be about it.
The same values are also decoded and counted client-side (``sketches.hll``), which must match
``PFCOUNT`` exactly, and exact mode (``SADD``/``SCARD``) is checked to be exact.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import redis

from bench.config import BenchConfig
from bench.util import say

STANDARD_ERROR = 1.04 / math.sqrt(16384)
CHUNK = 20_000


def cardinalities(cfg: BenchConfig) -> list[int]:
    lo, hi = math.log10(cfg.acc_min), math.log10(cfg.acc_max)
    steps = max(1, round((hi - lo) * cfg.acc_per_decade))
    return sorted({round(10 ** (lo + (hi - lo) * i / steps)) for i in range(steps + 1)})


def run(cfg: BenchConfig, redis_url: str) -> dict[str, Any]:
    from sketches import hll

    started = time.perf_counter()
    client = redis.Redis.from_url(redis_url)
    rows: list[dict[str, Any]] = []
    errors_all: list[float] = []
    client_mismatch = 0
    sketches = 0
    try:
        for n in cardinalities(cfg):
            errs: list[float] = []
            for t in range(cfg.acc_trials):
                key = f"acc:{n}:{t}"
                client.delete(key)
                pipe = client.pipeline(transaction=False)
                for lo in range(0, n, CHUNK):
                    pipe.pfadd(key, *[f"{t}.{n}.{i}" for i in range(lo, min(lo + CHUNK, n))])
                pipe.pfcount(key)
                pipe.get(key)
                *_, est, raw = pipe.execute()
                client.delete(key)
                sketches += 1
                if int(hll.estimate_many(hll.decode_many([raw]))[0]) != int(est):
                    client_mismatch += 1
                errs.append((int(est) - n) / n)
            errors_all.extend(errs)
            a = np.abs(np.array(errs))
            rows.append({
                "cardinality": n, "trials": len(errs),
                "mean_error": float(np.mean(errs)), "mean_abs_error": float(a.mean()),
                "worst_abs_error": float(a.max()),
            })
        say(f"accuracy: {sketches} sketches in {time.perf_counter() - started:.1f}s")
        exact_ok = _exact_check(client, [n for n in cardinalities(cfg) if n <= 100_000][-3:])
    finally:
        client.close()
    e = np.array(errors_all)
    a = np.abs(e)
    return {
        "standard_error": STANDARD_ERROR,
        "rows": rows,
        "sketches": int(e.size),
        "rms_error": float(np.sqrt(np.mean(e**2))),
        "mean_abs_error": float(a.mean()),
        "mean_error": float(e.mean()),
        "worst_abs_error": float(a.max()),
        "worst_at": rows[int(np.argmax([r["worst_abs_error"] for r in rows]))]["cardinality"],
        "within_1se": float(np.mean(a <= STANDARD_ERROR)),
        "within_2se": float(np.mean(a <= 2 * STANDARD_ERROR)),
        "within_3se": float(np.mean(a <= 3 * STANDARD_ERROR)),
        "client_estimate_mismatches": client_mismatch,
        "exact_mode_exact": exact_ok,
        "seconds": time.perf_counter() - started,
    }


def _exact_check(client: redis.Redis, sizes: list[int]) -> bool:
    ok = True
    for n in sizes:
        key = f"acc-exact:{n}"
        pipe = client.pipeline(transaction=False)
        for lo in range(0, n, CHUNK):
            pipe.sadd(key, *[f"x.{n}.{i}" for i in range(lo, min(lo + CHUNK, n))])
        pipe.scard(key)
        pipe.delete(key)
        *_, card, _ = pipe.execute()
        ok = ok and int(card) == n
    return ok
