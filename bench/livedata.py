"""Pure helpers of the live and backfill sections (``bench.live``, ``bench.liveprod``).

- The live producer's subjects are a fixed, seeded sequence, so that the benchmark process can
  tell, from an offset alone, how many distinct subjects the messages before it hold: that is
  what a live answer's "today" DAU must reach. It is generated in fixed-size blocks, each from
  its own seed, so that any prefix is the same whoever generates it and however far.
- The history of each workspace follows ``bench.querydata``'s model (an engagement per member,
  weekday factor, team growth), drawn day by day so that years of it never sit in memory at once.
- The memory check sorts a workspace's keys into sketches, stored results and the rest by name.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, timedelta

import numpy as np

from sketches.keys import Scope
from usage_metrics.synth import WEEKDAY_FACTOR

# A live login is a member seen before (history or earlier today) or, with this probability, a
# subject new today: today's DAU keeps growing through the run, so an answer that misses recent
# batches shows as a count below what the store held.
NEW_SHARE = 0.2
BLOCK = 4096
MEAN_ENGAGEMENT = 1.2 / (1.2 + 2.5)

SKETCH = "sketch"
STORED = "stored"
OTHER = "other"


def live_block(block: int, population: int, seed: int) -> np.ndarray:
    """Subjects ``block * BLOCK`` to ``(block + 1) * BLOCK - 1`` of the live stream as integers:
    ``k < population`` is member k of the workspace's population, ``population + i`` the subject
    new at message i."""
    rng = np.random.default_rng([seed, block])
    new = rng.random(BLOCK) < NEW_SHARE
    old = rng.integers(0, population, size=BLOCK)
    index = np.arange(block * BLOCK, (block + 1) * BLOCK, dtype=np.int64)
    return np.where(new, population + index, old)


def live_codes(n: int, population: int, seed: int) -> np.ndarray:
    """The first ``n`` subjects of the live stream (see ``live_block``)."""
    blocks = [live_block(b, population, seed) for b in range((n + BLOCK - 1) // BLOCK)]
    if not blocks:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate(blocks)[:n]


def subject_name(code: int, population: int) -> str:
    return f"member_{code}" if code < population else f"live_{code - population}"


def distinct_prefix(codes: np.ndarray) -> np.ndarray:
    """``out[k]`` = distinct values among ``codes[:k]`` (so ``out`` has one more element)."""
    out = np.zeros(len(codes) + 1, dtype=np.int64)
    if len(codes):
        _, first = np.unique(codes, return_index=True)
        flags = np.zeros(len(codes), dtype=np.int64)
        flags[first] = 1
        out[1:] = np.cumsum(flags)
    return out


def within(value: int | None, lower: int, upper: int, tolerance: float) -> bool:
    """Whether an answer lies between what the store surely held when the request began
    (``lower``) and what it could hold when the answer arrived (``upper``), widened by the
    relative ``tolerance`` of an estimate (0 for exact mode)."""
    got = value or 0
    return lower * (1 - tolerance) <= got <= upper * (1 + tolerance)


def partition_of(ws: Scope, partitions: int) -> int:
    """The partition a keyed producer sends this workspace's messages to (key ``org/ws``, the
    key ``bench.ingest`` uses)."""
    return zlib.crc32(message_key(ws)) % partitions


def message_key(ws: Scope) -> bytes:
    return f"{ws.org_id}/{ws.workspace_id}".encode()


def login_json(subject: str, ws: Scope, timestamp: str) -> bytes:
    return (f'{{"metric_type":"login","subject":"{subject}","org_id":"{ws.org_id}",'
            f'"workspace_id":"{ws.workspace_id}","timestamp":"{timestamp}"}}').encode()


@dataclass(frozen=True)
class HistoryWorkspace:
    ws: Scope
    cls: str  # "dense", "small" or "warmup"
    dau: int
    population: int


def plan(count: int, dense_dau: tuple[int, ...], seed: int) -> list[HistoryWorkspace]:
    """``count`` measured workspaces (the dense ones first, the densest first of all, then small
    ones of 10-100 active users a day) and one small warm-up workspace that no figure uses."""
    rng = np.random.default_rng(seed)
    out: list[HistoryWorkspace] = []
    dense = sorted(dense_dau, reverse=True)[:count]
    for j, dau in enumerate(dense):
        out.append(HistoryWorkspace(Scope("org-dense", f"dense-{j}-{dau}"), "dense", dau,
                                    int(dau / MEAN_ENGAGEMENT) + 1))
    for i in range(count - len(dense)):
        dau = int(10 + 90 * rng.random() ** 2)
        out.append(HistoryWorkspace(Scope(f"org-{i % 5}", f"small-{i:03d}"), "small", dau,
                                    int(dau / MEAN_ENGAGEMENT) + 1))
    out.append(HistoryWorkspace(Scope("org-warm", "warmup"), "warmup", 20, 60))
    return out


_MEAN_WEEKDAY = sum(WEEKDAY_FACTOR) / len(WEEKDAY_FACTOR)


def day_factor(d: date, i: int, days: int) -> float:
    """Weekday factor x team growth, scaled so that a workspace's mean DAU is its planned one."""
    return WEEKDAY_FACTOR[d.weekday()] / _MEAN_WEEKDAY * (0.6 + 0.4 * (i + 1) / days) / 0.8


def history(
    spaces: list[HistoryWorkspace],
    first: date,
    days: int,
    partitions: int,
    seed: int,
    chunk_days: int = 20,
) -> Iterator[tuple[list[bytes], list[bytes], list[int], int]]:
    """Chunks of ``chunk_days`` days of logins (values, keys, partitions, day count), in time
    order within each chunk, one login per active member per day (``member_<k>``)."""
    rng = np.random.default_rng(seed)
    engagement = [rng.beta(1.2, 2.5, size=w.population) for w in spaces]
    names = [[f"member_{k}" for k in range(w.population)] for w in spaces]
    keys = [message_key(w.ws) for w in spaces]
    parts = [partition_of(w.ws, partitions) for w in spaces]
    clock = [f"T{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}Z" for s in range(86_400)]
    for lo in range(0, days, chunk_days):
        stamps: list[int] = []
        values: list[bytes] = []
        ws_index: list[int] = []
        for i in range(lo, min(lo + chunk_days, days)):
            d = first + timedelta(days=i)
            factor = day_factor(d, i, days)
            text = d.isoformat()
            for n, w in enumerate(spaces):
                active = np.flatnonzero(rng.random(w.population) < engagement[n] * factor)
                secs = rng.integers(7 * 3600, 20 * 3600, size=active.size)
                for k, s in zip(active.tolist(), secs.tolist(), strict=True):
                    values.append(login_json(names[n][k], w.ws, text + clock[s]))
                    stamps.append(i * 86_400 + s)
                    ws_index.append(n)
        order = np.argsort(np.asarray(stamps, dtype=np.int64), kind="stable").tolist()
        yield ([values[j] for j in order], [keys[ws_index[j]] for j in order],
               [parts[ws_index[j]] for j in order], min(chunk_days, days - lo))


def key_kind(key: str, workspace_prefix: str) -> str:
    """Sketch key, stored result (its bookkeeping: the meta hash, and stored results) or
    something else (settings) for a key of one workspace's hash tag."""
    rest = key[len(workspace_prefix):].split(":")
    if len(rest) >= 2 and rest[0] in ("hll", "set"):
        if rest[1] in ("meta", "result"):
            return STORED
        if len(rest) >= 3 and len(rest[1]) == 1 and rest[1].isalpha():
            return SKETCH
    return OTHER


def hash_tag(key: str, prefix: str) -> str | None:
    """The ``{...}`` hash tag right after the prefix, or None for keys without one."""
    head = f"{prefix}:{{"
    if not key.startswith(head):
        return None
    end = key.find("}", len(head))
    return key[len(head) - 1: end + 1] if end > 0 else None
