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

aiokafka's decoders are module globals, so the limit is process-wide; the last ``install`` wins
(every consumer of a process reads the same settings).
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Callable
from importlib import import_module

import cramjam
from aiokafka.errors import CorruptRecordException

from sketches.errors import UsageMetricsError

# What aiokafka hands its decoders: a slice of the fetched bytes.
Payload = bytes | bytearray | memoryview


class BatchTooLarge(UsageMetricsError):
    """A compressed batch inflates beyond the whole budget of one fetch: it is never read."""


class FetchOverBudget(UsageMetricsError):
    """A batch does not fit in what is left of this fetch's budget: fetch fewer records."""


# What decoding a record or a batch raises when the bytes themselves are bad: a header key that
# is not UTF-8, a CRC that does not match, a batch over the budget or not decompressible, a
# batch or record cut short. Only these make the consumer skip records; anything else (a bug, a
# broker or group failure) is raised as before, and a supervisor restarts the consumer.
DATA_ERRORS: tuple[type[BaseException], ...] = (
    UnicodeError, CorruptRecordException, BatchTooLarge, cramjam.DecompressionError,
    struct.error, EOFError,
)


def unreadable(err: BaseException) -> bool:
    """Whether ``getmany`` raised because of what a record holds (``DATA_ERRORS``)."""
    return isinstance(err, DATA_ERRORS)


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
        blocks: list[bytes] = []
        if data[:8] == b"\x82SNAPPY\x00":
            cursor = 16
            while cursor < len(data):
                (size,) = struct.unpack_from("!i", data, cursor)
                blocks.append(data[cursor + 4 : cursor + 4 + size])
                cursor += 4 + size
        else:
            blocks.append(data)
        total = sum(int(cramjam.snappy.decompress_raw_len(b)) for b in blocks)
        room = self._room()
        if total > room:
            raise self._refuse("snappy", room)
        self.spent += total
        return b"".join(bytes(cramjam.snappy.decompress_raw(b)) for b in blocks)


_RECORD_MODULES = (
    "aiokafka.record.default_records",
    "aiokafka.record.legacy_records",
    "aiokafka.record._crecords.default_records",
    "aiokafka.record._crecords.legacy_records",
)


def install(budget: InflateBudget) -> None:
    """Make aiokafka's record parsers (pure Python and compiled) decompress within ``budget``."""
    decoders: dict[str, Callable[[Payload], bytes]] = {
        "gzip_decode": budget.gzip,
        "snappy_decode": budget.snappy,
        "lz4_decode": budget.lz4,
        "zstd_decode": budget.zstd,
    }
    for name in _RECORD_MODULES:
        try:
            module = import_module(name)
        except ImportError:  # the compiled extension is optional in aiokafka
            continue
        for attr, decoder in decoders.items():
            if hasattr(module, attr):
                setattr(module, attr, decoder)
