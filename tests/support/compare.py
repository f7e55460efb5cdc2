"""Comparing the service's rows with the oracle's: equal in exact mode, within 3 % in HLL mode.

HyperLogLog's error is relative, so the tolerance is 3 % of the true count; below 34 users that
is less than one, and a single register collision (two users hashing to one register) may still
cost one user, so the tolerance never drops below 1 in HLL mode.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def close(got: int | None, want: int | None, mode: str) -> bool:
    if want is None or got is None:
        return got is want
    if mode == "exact":
        return got == want
    return abs(got - want) <= max(1.0, 0.03 * want)


def assert_rows_match(
    got: Sequence[Mapping[str, Any]], want: Sequence[Mapping[str, Any]], mode: str
) -> None:
    assert [r["date"] for r in got] == [r["date"] for r in want]
    for g, w in zip(got, want, strict=True):
        for metric in ("dau", "wau", "mau"):
            assert close(g[metric], w[metric], mode), (g["date"], metric, g[metric], w[metric])


def rows_as_dicts(rows: Sequence[Any]) -> list[dict[str, Any]]:
    return [
        {"date": r.date.isoformat(), "dau": r.dau, "wau": r.wau, "mau": r.mau} for r in rows
    ]
