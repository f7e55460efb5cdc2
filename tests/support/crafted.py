"""Record batches of every format and codec, built field by field, and the consumer's reader in a
child process that the tests can time out and watch die.

The batches are what producer libraries write: v2 (magic 2) with no codec, gzip, raw snappy,
Java's xerial-framed snappy, lz4 and zstd; legacy message sets (magic 0 and 1) plain or wrapped in
one compressed message. Each is built from an *inner* payload (the v2 records section, or the
legacy inner message set) and an *outer* frame, so a test can damage either level and still
send bytes whose CRC matches: a mutation behind a bad CRC only ever meets the CRC check.

``Reader`` runs ``read_fetch`` in a child process, which is what aiokafka's fetcher and
``getmany`` do with the bytes of one partition of a fetch response, with the classes that
``consumer.fetching.install`` put in the fetcher: ``MemoryRecords`` frames the batches, and
``PartitionRecords`` checks CRCs, inflates within the budget and parses every record. A child,
because a decoder that never returns holds its thread for good, and one that reads past a
buffer can kill its process: the test must see both as failures, not hang or die with them.
"""

from __future__ import annotations

import multiprocessing
import struct
import traceback
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import cramjam
from aiokafka.codec import lz4_encode, snappy_encode
from aiokafka.record.default_records import _DefaultRecordBatchBuilderPy
from aiokafka.record.legacy_records import LegacyRecordBatchBuilder
from aiokafka.record.util import calc_crc32c

# The v2 batch header (aiokafka's DefaultRecordBase.HEADER_STRUCT): where each field sits.
V2_LENGTH_AT = 8
V2_CRC_AT = 17
V2_ATTRIBUTES_AT = 21
V2_COUNT_AT = 57
V2_HEADER_BYTES = 61
# A legacy message: offset, length, crc, magic, attributes, [timestamp (magic 1)], key, value.
LEGACY_LENGTH_AT = 8
LEGACY_CRC_AT = 12
LEGACY_MAGIC_AT = 16
CODECS = {"none": 0, "gzip": 1, "snappy": 2, "xerial": 2, "lz4": 3, "zstd": 4}
TIMESTAMP = 1_796_000_000_000

# Inflated bytes one fetch may produce in the reader (CONSUMER_MAX_FETCH_INFLATED_BYTES).
READER_BUDGET = 1 << 20

Record = tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]
RECORDS: list[Record] = [
    (None, b'{"metric_type": "login", "subject": "u1", "org_id": "o", "workspace_id": "w", '
           b'"timestamp": 1796000000}', [("trace", b"t-1")]),
    (b"key-2", b'{"metric_type": "login", "subject": "u2"}' * 3, []),
    (b"k3", b"x" * 200, [("a", b"1"), ("b", b"")]),
    # The smallest legacy message there is: no key, an empty value (14 bytes in magic 0).
    (None, b"", []),
]


def compress(codec: str, data: bytes) -> bytes:
    if codec == "gzip":
        return bytes(cramjam.gzip.compress(data))
    if codec == "snappy":
        return bytes(cramjam.snappy.compress_raw(data))
    if codec == "xerial":
        # Small blocks, so that even a small payload has several block lengths to damage.
        return snappy_encode(data, xerial_compatible=True, xerial_blocksize=64)
    if codec == "lz4":
        return lz4_encode(data)
    if codec == "zstd":
        return bytes(cramjam.zstd.compress(data))
    assert codec == "none", codec
    return data


def xerial_length_fields(stream: bytes) -> list[int]:
    """Where the block lengths of a xerial stream sit (as it was built, so all valid)."""
    out, cursor = [], 16
    while cursor + 4 <= len(stream):
        out.append(cursor)
        (size,) = struct.unpack_from("!i", stream, cursor)
        if size < 0:
            break
        cursor += 4 + size
    return out


def seal_v2(batch: bytearray, *, length: bool = True) -> bytes:
    """Make a v2 batch's length field and CRC match its bytes (the length first: the CRC
    covers what follows the attributes, not the length)."""
    if length and len(batch) >= 12:
        struct.pack_into(">i", batch, V2_LENGTH_AT, len(batch) - 12)
    if len(batch) >= V2_ATTRIBUTES_AT:
        struct.pack_into(">I", batch, V2_CRC_AT, calc_crc32c(bytes(batch[V2_ATTRIBUTES_AT:])))
    return bytes(batch)


def seal_legacy(message_set: bytearray, *, length: bool = True) -> bytes:
    """Make each legacy message's CRC (and, for a single message, its length) match its bytes.
    Messages are found by their length fields, as far as those still frame something."""
    if length and len(message_set) >= LEGACY_CRC_AT:
        struct.pack_into(">i", message_set, LEGACY_LENGTH_AT, len(message_set) - 12)
    pos = 0
    while pos + LEGACY_MAGIC_AT <= len(message_set):
        (size,) = struct.unpack_from(">i", message_set, pos + LEGACY_LENGTH_AT)
        end = pos + 12 + size
        if size < 4 or end > len(message_set):
            break
        crc = zlib.crc32(bytes(message_set[pos + LEGACY_MAGIC_AT : end])) & 0xFFFFFFFF
        struct.pack_into(">I", message_set, pos + LEGACY_CRC_AT, crc)
        pos = end
    return bytes(message_set)


def legacy_length_fields(message_set: bytes, magic: int) -> list[int]:
    """Where each message's length, key length and value length sit in a legacy message set,
    as far as its length fields (perhaps damaged already) frame messages."""
    out, pos = [], 0
    key_at = 18 if magic == 0 else 26
    while pos + key_at + 4 <= len(message_set):
        (size,) = struct.unpack_from(">i", message_set, pos + LEGACY_LENGTH_AT)
        (key_len,) = struct.unpack_from(">i", message_set, pos + key_at)
        out += [pos + LEGACY_LENGTH_AT, pos + key_at, pos + key_at + 4 + max(key_len, 0)]
        if size < 14:
            break
        pos += 12 + size
    return out


@dataclass(frozen=True)
class Sample:
    """One valid batch: its inner payload, how the outer frame is made from it, and where its
    length fields sit at each level."""

    name: str
    magic: int
    codec: str
    inner: bytes
    frame: Callable[[bytes], bytes] = field(repr=False)
    inner_fields: list[int] = field(repr=False)
    # The records it holds, as the reader hands them back.
    expected: list[tuple[int, bytes | None, bytes | None, list[tuple[str, bytes]]]] = field(
        repr=False
    )

    def outer(self, inner: bytes | None = None) -> bytes:
        return self.frame(self.inner if inner is None else inner)

    def outer_fields(self, outer: bytes) -> list[int]:
        if self.magic == 2:
            fields = [V2_LENGTH_AT, V2_COUNT_AT]
            if self.codec == "xerial":
                fields += [V2_HEADER_BYTES + f
                           for f in xerial_length_fields(outer[V2_HEADER_BYTES:])]
            return fields
        if self.codec == "none":
            return legacy_length_fields(outer, self.magic)
        return legacy_length_fields(outer, self.magic)[:3]

    def reseal(self, outer: bytearray, *, length: bool) -> bytes:
        if self.magic == 2:
            return seal_v2(outer, length=length)
        return seal_legacy(outer, length=length and self.codec != "none")


def v2_sample(codec: str, records: Sequence[Record] = RECORDS, base: int = 0) -> Sample:
    builder = _DefaultRecordBatchBuilderPy(
        2, 0, is_transactional=0, producer_id=-1, producer_epoch=-1, base_sequence=-1,
        batch_size=1 << 24,
    )
    for i, (key, value, headers) in enumerate(records):
        assert builder.append(i, timestamp=TIMESTAMP + i, key=key, value=value, headers=headers)
    plain = bytes(builder.build())
    head = bytearray(plain[:V2_HEADER_BYTES])
    struct.pack_into(">q", head, 0, base)
    struct.pack_into(">h", head, V2_ATTRIBUTES_AT, CODECS[codec])

    def frame(inner: bytes) -> bytes:
        return seal_v2(bytearray(head) + compress(codec, inner))

    expected = [(base + i, k, v, list(h)) for i, (k, v, h) in enumerate(records)]
    return Sample(f"v2-{codec}", 2, codec, plain[V2_HEADER_BYTES:], frame, [], expected)


def legacy_message(magic: int, codec: int, offset: int, key: bytes | None,
                   value: bytes | None) -> bytes:
    body = struct.pack(">bb", magic, codec)
    if magic == 1:
        body += struct.pack(">q", TIMESTAMP)
    for part in (key, value):
        body += struct.pack(">i", -1) if part is None else struct.pack(">i", len(part)) + part
    crc = zlib.crc32(body) & 0xFFFFFFFF
    message = struct.pack(">I", crc) + body
    return struct.pack(">qi", offset, len(message)) + message


def legacy_sample(magic: int, codec: str, records: Sequence[Record] = RECORDS) -> Sample:
    builder = LegacyRecordBatchBuilder(magic, 0, batch_size=1 << 24)
    for i, (key, value, _) in enumerate(records):
        assert builder.append(i, timestamp=TIMESTAMP if magic else None, key=key, value=value)
    inner = bytes(builder.build())
    last = len(records) - 1

    def frame(payload: bytes) -> bytes:
        if codec == "none":
            return payload
        return legacy_message(magic, CODECS[codec], last, None, compress(codec, payload))

    expected = [(i, k, v, []) for i, (k, v, _) in enumerate(records)]
    return Sample(f"magic{magic}-{codec}", magic, codec, inner, frame,
                  legacy_length_fields(inner, magic), expected)


def every_sample() -> list[Sample]:
    """Every format with every codec a producer library writes in it (lz4 in magic 0 is an
    unsupported combination in Kafka itself; zstd exists only in v2)."""
    return [
        *(v2_sample(c) for c in ("none", "gzip", "snappy", "xerial", "lz4", "zstd")),
        *(legacy_sample(0, c) for c in ("none", "gzip", "snappy", "xerial")),
        *(legacy_sample(1, c) for c in ("none", "gzip", "snappy", "xerial", "lz4")),
    ]


# What the reader answers: ("read", records), ("unreadable", the dead letter's wording of the
# error), ("over budget", message), or ("escaped", the error and its traceback).
Verdict = tuple[str, Any]


def read_fetch(data: bytes, budget: Any) -> Verdict:
    """What ``getmany`` does with one partition's bytes of a fetch response, after
    ``consumer.fetching.install(budget)``."""
    from aiokafka.consumer import fetcher
    from aiokafka.errors import RecordTooLargeError
    from aiokafka.structs import TopicPartition

    from consumer.fetching import FetchOverBudget, describe, unreadable

    budget.start_fetch()
    tp = TopicPartition("crafted", 0)
    records = fetcher.MemoryRecords(data)
    try:
        if not records.has_next():
            if records.size_in_bytes() > 0:
                # aiokafka's fetcher: the first batch runs past what the broker sent.
                raise RecordTooLargeError(f"a batch at {tp} is larger than the fetch")
            return ("read", [])
        partition = fetcher.PartitionRecords(
            tp, records, [], 0, None, None, True, fetcher.READ_UNCOMMITTED
        )
        return ("read", [(r.offset, r.key, r.value, list(r.headers)) for r in partition])
    except FetchOverBudget as err:
        return ("over budget", str(err))
    except Exception as err:  # noqa: BLE001 - the verdict names whatever escaped
        if unreadable(err):
            return ("unreadable", describe(err))
        return ("escaped", "".join(traceback.format_exception(err)))


def serve(conn: Connection, budget_bytes: int) -> None:
    """The child: the consumer's decoders installed once, then one verdict per fetch sent."""
    from consumer.fetching import InflateBudget, install

    budget = InflateBudget(budget_bytes)
    install(budget)
    conn.send("ready")
    while True:
        try:
            data = conn.recv_bytes()
        except EOFError:
            return
        conn.send(read_fetch(data, budget))


class ReaderFailure(AssertionError):
    """The reader hung or died on a batch."""


class Reader:
    """The child process that reads fetches; restarted after it hangs or dies."""

    def __init__(self, budget_bytes: int = READER_BUDGET, deadline_s: float = 10.0) -> None:
        self.budget_bytes = budget_bytes
        # A limit on waiting, not a measure of speed: these batches take milliseconds to read,
        # and one that takes ten seconds is a decoder that never returns.
        self.deadline_s = deadline_s
        self._ctx = multiprocessing.get_context("spawn")
        self._start()

    def _start(self) -> None:
        self.conn, child = self._ctx.Pipe()
        self.proc = self._ctx.Process(target=serve, args=(child, self.budget_bytes), daemon=True)
        self.proc.start()
        child.close()
        if not self.conn.poll(120):
            raise RuntimeError("the reader process did not start")
        assert self.conn.recv() == "ready"

    def read(self, data: bytes) -> Verdict:
        self.conn.send_bytes(data)
        if not self.conn.poll(self.deadline_s):
            self.proc.kill()
            self.proc.join()
            self._start()
            raise ReaderFailure(
                f"reading {len(data)} bytes did not end within {self.deadline_s}s: {data.hex()}"
            )
        try:
            verdict: Verdict = self.conn.recv()
        except EOFError:
            self.proc.join()
            code = self.proc.exitcode
            self._start()
            raise ReaderFailure(
                f"the reader died (exit code {code}) on {len(data)} bytes: {data.hex()}"
            ) from None
        return verdict

    def close(self) -> None:
        self.conn.close()
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()


def xerial_with_block_length(value: int, records: Sequence[Record] = RECORDS) -> bytes:
    """A v2 snappy batch in xerial framing whose first block states ``value`` bytes, its CRC
    made to match: a broker that does not inflate batches at produce takes it as it is."""
    batch = bytearray(v2_sample("xerial", records).outer())
    first = V2_HEADER_BYTES + xerial_length_fields(bytes(batch[V2_HEADER_BYTES:]))[0]
    struct.pack_into(">i", batch, first, value)
    return seal_v2(batch)


def key_of_2_63_bytes() -> bytes:
    """A v2 batch of one record whose key length is 2**63 - 1: aiokafka's compiled bounds
    check overflows, and Python refuses the allocation with ``OverflowError``."""
    record = bytearray(b"\x00\x00\x00")  # attributes, timestamp delta, offset delta
    record += b"\xfe\xff\xff\xff\xff\xff\xff\xff\xff\x01"  # key length 2**63 - 1 (zigzag)
    batch = bytearray(v2_sample("none", records=[(None, b"v", [])]).outer()[:V2_HEADER_BYTES])
    batch += bytes([len(record) * 2]) + record  # the record's length (zigzag varint)
    return seal_v2(batch)
