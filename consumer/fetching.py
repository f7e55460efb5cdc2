"""What aiokafka cannot hand over, and how much memory one fetch may take.

Two kinds of record stop aiokafka itself, before the consumer sees them (measured with aiokafka
0.14, ``tests/test_unreadable_records.py``):

- **A header key that is not UTF-8** (Kafka header keys are bytes; a C or Go producer can write
  any). aiokafka decodes keys strictly while it iterates a batch, so ``getmany`` raises
  ``UnicodeDecodeError``, and keeps raising it: the position never moves past the record, and
  the good records fetched before it in the same call are dropped and fetched again, in vain.
  The same holds for a batch whose CRC does not match (``CorruptRecordException``).
- **A compressed batch that inflates far beyond the fetch size.** aiokafka decompresses a whole
  batch in memory, whatever its size: 1 MB of zstd can hold 32 GB of zeros. ``install`` replaces
  aiokafka's four decoders with ones that decompress into a buffer no larger than what is left of
  ``CONSUMER_MAX_FETCH_INFLATED_BYTES`` for the current fetch, so a fetch never inflates more than
  that; a batch that alone exceeds it raises ``BatchTooLarge``, one that exceeds what is left
  raises ``FetchOverBudget`` (the consumer then asks for fewer records).

Neither record can be dead-lettered with its bytes: aiokafka never returns them. The consumer
(``consumer.runner``) finds the partition and offset it is stuck at, skips the smallest range of
offsets past which fetching works again, sends one dead letter without a value that names the
range and the error, logs it, and records the new offset in the store. Records that shared a
batch with the unreadable one and came after it are skipped with it; the dead letter says how
many offsets the range spans.

**Crafted batches** (issue 16): a non-validating Kafka-compatible broker, a mirror or a broker bug
can deliver a batch no producer library writes: a codec number that does not exist, a snappy
(xerial) block length that is negative or runs past the end, a record whose key claims 2^63
bytes, a legacy (magic 0/1) compressed message set whose inner lengths go nowhere. Two rules
make such a batch cost one dead letter and nothing more:

- **Any error while reading a fetched partition's records is a data error.** ``install`` swaps
  aiokafka's ``PartitionRecords`` (the iterator behind ``getmany`` that checks CRCs, inflates and
  parses batches) for one that turns every exception it raises into ``UnreadableBatch``, with
  the original as its cause: ``UnsupportedCodecError``, ``OverflowError`` and whatever else
  aiokafka's parsers raise on bytes they were never meant to meet are skipped like a bad CRC,
  never raised to the loop, where they would make the consumer exit and restart at the same
  offset for ever. ``FetchOverBudget`` alone passes through: it says "fewer records", not "bad
  bytes".
- **Decoding a batch takes time bounded by its size and the budget.** Every decompression writes
  into a buffer no larger than the budget; every loop over a batch's framing moves forward by
  at least one length field: a xerial block length that is negative or runs past the end, and a
  legacy message set whose inner lengths do not tile it exactly, are refused before anything
  loops over them (aiokafka's own loops over those lengths never end on such values, inside
  compiled code that holds the event loop: no heartbeat, no ``/healthz``, no watchdog; on
  negative ones its compiled legacy reader also read before its buffer and killed the process).
  A batch too short for its own header is refused before aiokafka's compiled parser reads the
  header past its end (``GuardedMemoryRecords``).

aiokafka's decoders and iterator are module globals, so the limit is process-wide; the last
``install`` wins (every consumer of a process reads the same settings).
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Callable
from importlib import import_module

import cramjam
from aiokafka.consumer import fetcher
from aiokafka.errors import RecordTooLargeError
from aiokafka.record.memory_records import MemoryRecords as _MemoryRecords

from sketches.errors import UsageMetricsError

# What aiokafka hands its decoders: a slice of the fetched bytes.
Payload = bytes | bytearray | memoryview


class BatchTooLarge(UsageMetricsError):
    """A compressed batch inflates beyond the whole budget of one fetch: it is never read."""


class FetchOverBudget(UsageMetricsError):
    """A batch does not fit in what is left of this fetch's budget: fetch fewer records."""


class MalformedBatch(UsageMetricsError):
    """A batch's own framing is broken: a stated length that is negative or runs past the end."""


class UnreadableBatch(UsageMetricsError):
    """Reading the records of a fetched partition failed: the bytes, not the broker or the group.
    The original error is the cause, and the message starts with its name."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.cause = cause


# What ``getmany`` raises because of what a batch holds: any error while its records are read
# (``UnreadableBatch``, once ``install`` has run), and aiokafka's verdict on a fetch whose first
# batch states a length past the bytes the broker sent (a broker always sends whole batches, so
# only a broken one does that). Only these make the consumer skip records; anything else (a
# bug, a broker or group failure) is raised as before, and a supervisor restarts the consumer.
DATA_ERRORS: tuple[type[BaseException], ...] = (UnreadableBatch, RecordTooLargeError)


def unreadable(err: BaseException) -> bool:
    """Whether ``getmany`` raised because of what a record holds (``DATA_ERRORS``)."""
    return isinstance(err, DATA_ERRORS)


def describe(err: BaseException) -> str:
    """The error as a dead letter names it: the original error's name and message."""
    if isinstance(err, UnreadableBatch):
        return str(err)
    return f"{type(err).__name__}: {err}"


class InflateBudget:
    """Decompressed bytes one fetch may still produce."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.spent = 0
        # One output buffer for every batch, mapped lazily: its pages cost memory only as far
        # as the largest batch seen has written.
        self._buffer: mmap.mmap | None = None

    def start_fetch(self) -> None:
        self.spent = 0

    def _room(self) -> int:
        return max(0, self.limit - self.spent)

    def _refuse(self, codec: str, room: int) -> UsageMetricsError:
        if room < self.limit:
            return FetchOverBudget(
                f"a {codec} batch does not fit in the {room} bytes left of this fetch"
            )
        return BatchTooLarge(
            f"a {codec} batch inflates beyond {self.limit} bytes "
            "(CONSUMER_MAX_FETCH_INFLATED_BYTES)"
        )

    def _inflate(self, codec: str, payload: Payload) -> bytes:
        room = self._room()
        module = {"gzip": cramjam.gzip, "lz4": cramjam.lz4, "zstd": cramjam.zstd}[codec]
        if self._buffer is None:
            self._buffer = mmap.mmap(-1, self.limit + 1)
        # The output buffer bounds the memory: cramjam raises rather than write past its end.
        with memoryview(self._buffer) as view:
            try:
                size = int(module.decompress_into(bytes(payload), view[: room + 1]))
            except cramjam.DecompressionError as err:
                if "whole buffer" in str(err):
                    raise self._refuse(codec, room) from err
                raise
            if size > room:
                raise self._refuse(codec, room)
            self.spent += size
            return bytes(view[:size])

    def gzip(self, payload: Payload) -> bytes:
        return self._inflate("gzip", payload)

    def lz4(self, payload: Payload) -> bytes:
        return self._inflate("lz4", payload)

    def zstd(self, payload: Payload) -> bytes:
        return self._inflate("zstd", payload)

    def snappy(self, payload: Payload) -> bytes:
        """Raw snappy, or Java's xerial framing of raw blocks: each block states its length, so
        the budget is checked before anything is inflated."""
        data = bytes(payload)
        blocks = _xerial_blocks(data) if data[:8] == XERIAL_MAGIC else [data]
        total = sum(int(cramjam.snappy.decompress_raw_len(b)) for b in blocks)
        room = self._room()
        if total > room:
            raise self._refuse("snappy", room)
        self.spent += total
        return b"".join(bytes(cramjam.snappy.decompress_raw(b)) for b in blocks)

    def legacy(self, codec: str) -> Callable[[Payload], bytes]:
        """The decoder of a legacy (magic 0/1) compressed message: inflate within the budget,
        then check that the inner message set's lengths tile it."""
        inflate = {"gzip": self.gzip, "snappy": self.snappy, "lz4": self.lz4}[codec]

        def decode(payload: Payload) -> bytes:
            return _checked_message_set(inflate(payload))

        return decode


# Java's xerial snappy stream: an 8-byte magic, version and compatible version (int32 each), then
# blocks, each an int32 length and that many bytes of raw snappy.
XERIAL_MAGIC = b"\x82SNAPPY\x00"
XERIAL_HEADER_BYTES = 16


def _xerial_blocks(data: bytes) -> list[bytes]:
    """The blocks of a xerial stream. A length that is negative, or larger than what follows,
    is refused: read as it stands, a negative length moves the cursor back (or, at -4, not at
    all) and the loop never ends."""
    blocks: list[bytes] = []
    cursor = XERIAL_HEADER_BYTES
    end = len(data)
    while cursor < end:
        if end - cursor < 4:
            raise MalformedBatch(
                f"a snappy (xerial) stream ends inside a block length at byte {cursor}"
            )
        (size,) = struct.unpack_from("!i", data, cursor)
        start = cursor + 4
        if size < 0 or size > end - start:
            raise MalformedBatch(
                f"a snappy (xerial) block at byte {cursor} states {size} bytes, "
                f"{end - start} follow"
            )
        blocks.append(data[start : start + size])
        cursor = start + size
    return blocks


# A legacy message set: offset (int64), length (int32), then a message of that many bytes, which
# is at least its CRC, magic, attributes, key length and value length (Kafka's
# RECORD_OVERHEAD_V0).
LEGACY_LOG_OVERHEAD = 12
LEGACY_MIN_MESSAGE = 14


def _checked_message_set(data: bytes) -> bytes:
    """``data`` if its length fields tile it exactly with messages of at least the minimum size.
    aiokafka walks these lengths to find the last offset, in compiled code that trusts them: a
    length of -12 never moves, a negative one moves back, one past the end reads past the
    buffer."""
    pos, end = 0, len(data)
    while pos < end:
        if end - pos < LEGACY_LOG_OVERHEAD:
            raise MalformedBatch(
                f"a compressed legacy message set ends inside a message header at byte {pos}"
            )
        (length,) = struct.unpack_from(">i", data, pos + 8)
        if length < LEGACY_MIN_MESSAGE or length > end - pos - LEGACY_LOG_OVERHEAD:
            raise MalformedBatch(
                f"a compressed legacy message at byte {pos} states {length} bytes, "
                f"{end - pos - LEGACY_LOG_OVERHEAD} follow (at least {LEGACY_MIN_MESSAGE})"
            )
        pos += LEGACY_LOG_OVERHEAD + length
    return data


# Bytes after a batch's offset and length fields that its header parser reads: aiokafka's
# compiled v2 parser reads the whole 49-byte rest of the v2 header (up to the record count)
# without checking the batch's length; its legacy parser checks its own bounds.
V2_HEADER_REST = 49
LEGACY_MIN_BATCH = LEGACY_MIN_MESSAGE


class GuardedMemoryRecords:
    """aiokafka's framing of one partition's bytes of a fetch into batches, with each batch's
    stated length checked against what its header parser reads before that parser runs.
    aiokafka's compiled framing checks only that a batch holds a legacy message's 14 bytes,
    then reads a v2 header of 49: past the end of the fetched bytes, for a batch at their end.
    The compiled framing also takes the format of every batch from the first batch's magic
    byte, so a batch is held to the v2 minimum if either says v2."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._records = _MemoryRecords(data)
        self._pos = 0
        self._first_v2 = len(data) > 16 and data[16] >= 2

    def size_in_bytes(self) -> int:
        return int(self._records.size_in_bytes())

    def has_next(self) -> bool:
        return bool(self._records.has_next())

    def next_batch(self) -> object:
        if self._records.has_next():
            pos, data = self._pos, self._data
            (length,) = struct.unpack_from(">i", data, pos + 8)
            if length < LEGACY_MIN_BATCH:
                raise MalformedBatch(
                    f"a batch at byte {pos} of the fetch states {length} bytes "
                    f"(at least {LEGACY_MIN_BATCH})"
                )
            if (data[pos + 16] >= 2 or self._first_v2) and length < V2_HEADER_REST:
                raise MalformedBatch(
                    f"a v2 batch at byte {pos} of the fetch states {length} bytes, its header "
                    f"alone takes {V2_HEADER_REST}"
                )
            self._pos = pos + 12 + length
        return self._records.next_batch()


class GuardedPartitionRecords(fetcher.PartitionRecords):  # type: ignore[misc]
    """aiokafka's iterator over one fetched partition's batches and records, whose every error
    is the batch's (``UnreadableBatch``), except the budget's request for fewer records."""

    def __next__(self) -> object:
        try:
            return super().__next__()
        except (StopIteration, FetchOverBudget):
            raise
        except Exception as err:
            raise UnreadableBatch(err) from err


_DEFAULT_RECORD_MODULES = (
    "aiokafka.record.default_records",
    "aiokafka.record._crecords.default_records",
)
_LEGACY_RECORD_MODULES = (
    "aiokafka.record.legacy_records",
    "aiokafka.record._crecords.legacy_records",
)


def install(budget: InflateBudget) -> None:
    """Make aiokafka's record parsers (pure Python and compiled) decompress within ``budget``,
    refuse broken framing, and report every error of a batch as ``UnreadableBatch``."""
    default: dict[str, Callable[[Payload], bytes]] = {
        "gzip_decode": budget.gzip,
        "snappy_decode": budget.snappy,
        "lz4_decode": budget.lz4,
        "zstd_decode": budget.zstd,
    }
    legacy: dict[str, Callable[[Payload], bytes]] = {
        "gzip_decode": budget.legacy("gzip"),
        "snappy_decode": budget.legacy("snappy"),
        "lz4_decode": budget.legacy("lz4"),
    }
    for names, decoders in ((_DEFAULT_RECORD_MODULES, default), (_LEGACY_RECORD_MODULES, legacy)):
        for name in names:
            try:
                module = import_module(name)
            except ImportError:  # the compiled extension is optional in aiokafka
                continue
            for attr, decoder in decoders.items():
                if hasattr(module, attr):
                    setattr(module, attr, decoder)
    fetcher.PartitionRecords = GuardedPartitionRecords
    fetcher.MemoryRecords = GuardedMemoryRecords
