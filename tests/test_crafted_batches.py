"""Crafted record batches (issue 16), read by the consumer's own reader.

A validating broker refuses most of these at produce; a non-validating Kafka-compatible broker, a
mirror or a broker bug delivers them anyway. Whatever a batch holds, reading it must end, and end
in its records or in a data error that the consumer dead-letters (``consumer.fetching.
unreadable``): never in a loop that holds the event loop for good, a dead process, or an
exception the consumer does not know as the batch's, which makes it exit, restart at the same
offset and exit again.

The reader runs in a child process (``tests.support.crafted.Reader``) so that a hang or a crash
is a failed example rather than a stuck or dead test run; the bound on time is in the code
(``consumer.fetching``), the child only notices when it is missing. End to end, through the real
broker and ``usage-metrics consume``: ``tests/test_unreadable_records.py``.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

import cramjam
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.crafted import (
    READER_BUDGET,
    V2_ATTRIBUTES_AT,
    V2_HEADER_BYTES,
    V2_LENGTH_AT,
    Reader,
    Sample,
    every_sample,
    key_of_2_63_bytes,
    legacy_message,
    legacy_sample,
    seal_legacy,
    seal_v2,
    v2_sample,
    xerial_with_block_length,
)

SAMPLES = every_sample()
# Values a damaged length field takes: the ones that stop, reverse or overrun a cursor.
INT32_EDGES = [-(2**31), -13, -12, -5, -4, -1, 0, 1, 13, 14, 2**31 - 1]


@pytest.fixture(scope="module")
def reader() -> Iterator[Reader]:
    r = Reader()
    try:
        yield r
    finally:
        r.close()


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda s: s.name)
def test_every_format_and_codec_reads_back_exactly(reader: Reader, sample: Sample) -> None:
    """The guards refuse nothing a producer library writes: each batch's records come back as
    they were sent, through the budgeted decoders and the framing checks."""
    assert reader.read(sample.outer()) == ("read", sample.expected)


def test_several_batches_in_one_fetch_read_back_in_order(reader: Reader) -> None:
    first = v2_sample("zstd")
    second = v2_sample("xerial", base=len(first.expected))
    assert reader.read(first.outer() + second.outer()) == (
        "read", first.expected + second.expected
    )


def mutate(data: st.DataObject, buf: bytes, fields: list[int], level: str) -> bytes:
    """Up to three edits: a bit flip, a byte set to a varint's edge, one of the batch's own
    32-bit length fields (or any 4 bytes) set to an edge value, or a cut."""
    out = bytearray(buf)
    for _ in range(data.draw(st.integers(0, 3), label=f"{level} edits")):
        if not out:
            break
        ops = ["flip", "byte", "field", "field", "int32", "cut"]
        op = data.draw(st.sampled_from(ops), label=level)
        if op == "cut":
            out = out[: data.draw(st.integers(0, len(out) - 1), label="cut at")]
            continue
        known = [f for f in fields if f < len(out)]
        if op == "field" and known:
            pos = data.draw(st.sampled_from(known), label="field at")
        else:
            pos = data.draw(st.integers(0, len(out) - 1), label="at")
        if op == "flip":
            out[pos] ^= data.draw(st.integers(1, 255), label="xor")
        elif op == "byte":
            out[pos] = data.draw(st.sampled_from([0x00, 0x01, 0x7F, 0x80, 0xFF]), label="byte")
        else:
            edges = [*INT32_EDGES, len(out) - pos - 4, len(out) - pos - 3, len(out) - pos - 16]
            value = data.draw(st.sampled_from(edges), label="int32")
            out[pos : pos + 4] = struct.pack(">i", value)
    return bytes(out)


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda s: s.name)
@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_batches_of_every_codec_never_hang_kill_the_reader_or_escape(
    reader: Reader, sample: Sample, data: st.DataObject
) -> None:
    """The mutation fuzzer: real batches of every format and codec, damaged inside the
    compressed payload (then compressed again, so the damage reaches the parser) and in their
    frame, with their CRC and length recomputed or left as damaged."""
    inner = mutate(data, sample.inner, sample.inner_fields, "inner")
    outer = sample.outer(inner)
    outer = mutate(data, outer, sample.outer_fields(outer), "outer")
    seal = data.draw(st.sampled_from(["length and crc", "crc", "crc", "as damaged"]))
    if seal != "as damaged":
        outer = sample.reseal(bytearray(outer), length=seal == "length and crc")
    verdict, detail = reader.read(outer)
    assert verdict in ("read", "unreadable", "over budget"), detail


@pytest.mark.parametrize("value", [-4, -1, -16, -(2**31)], ids=lambda v: f"length{v}")
def test_a_negative_xerial_block_length_is_a_malformed_batch(reader: Reader, value: int) -> None:
    """At -4 the old decoder's cursor never moved, below it went backwards: it looped for
    ever on the event loop (issue 16, "snappy that never ends")."""
    verdict, detail = reader.read(xerial_with_block_length(value))
    assert verdict == "unreadable", detail
    assert detail.startswith("MalformedBatch: a snappy (xerial) block"), detail


def test_a_xerial_block_running_past_the_end_is_a_malformed_batch(reader: Reader) -> None:
    """A last block whose length runs past the stream, while the bytes that are there make a
    valid block: read as it stands, the block was cut to what is there and inflated."""
    head = v2_sample("none")
    block = bytes(cramjam.snappy.compress_raw(head.inner))
    stream = bytes(snappy_stream_header()) + struct.pack("!i", len(block) + 100) + block
    batch = bytearray(head.outer()[:V2_HEADER_BYTES]) + stream
    struct.pack_into(">h", batch, V2_ATTRIBUTES_AT, 2)
    verdict, detail = reader.read(seal_v2(batch))
    assert verdict == "unreadable", detail
    assert f"states {len(block) + 100} bytes, {len(block)} follow" in detail, detail


def snappy_stream_header() -> bytes:
    return b"\x82SNAPPY\x00" + struct.pack("!ii", 1, 1)


def test_a_xerial_stream_cut_inside_a_block_length_is_a_malformed_batch(reader: Reader) -> None:
    head = v2_sample("none")
    block = bytes(cramjam.snappy.compress_raw(head.inner))
    stream = snappy_stream_header() + struct.pack("!i", len(block)) + block + b"\x00\x00"
    batch = bytearray(head.outer()[:V2_HEADER_BYTES]) + stream
    struct.pack_into(">h", batch, V2_ATTRIBUTES_AT, 2)
    verdict, detail = reader.read(seal_v2(batch))
    assert verdict == "unreadable", detail
    assert "ends inside a block length" in detail, detail


@pytest.mark.parametrize("length", [14, 20, 48])
def test_a_v2_batch_too_short_for_its_header_is_a_malformed_batch(
    reader: Reader, length: int
) -> None:
    """aiokafka's compiled framing lets a batch of 14 bytes through and its v2 parser then reads
    a 49-byte header: past the end of the fetched bytes, for a batch at their end."""
    batch = bytearray(v2_sample("none").outer()[: 12 + length])
    struct.pack_into(">i", batch, V2_LENGTH_AT, length)
    verdict, detail = reader.read(bytes(batch))
    assert verdict == "unreadable", detail
    assert detail.startswith(f"MalformedBatch: a v2 batch at byte 0 of the fetch states {length} "
                             "bytes"), detail


def test_a_short_legacy_message_after_a_v2_batch_is_a_malformed_batch(reader: Reader) -> None:
    """aiokafka's compiled framing takes every batch's format from the first one's magic byte:
    this 14-byte message would be parsed as a v2 header of 49."""
    first = v2_sample("none")
    short = legacy_message(0, 0, 4, None, b"")
    verdict, detail = reader.read(first.outer() + short)
    assert verdict == "unreadable", detail
    assert f"a v2 batch at byte {len(first.outer())} of the fetch states 14 bytes" in detail


@pytest.mark.parametrize("length", [-12, -1, 0, 13])
def test_a_batch_stating_fewer_bytes_than_any_message_is_a_malformed_batch(
    reader: Reader, length: int
) -> None:
    batch = bytearray(legacy_sample(1, "gzip").outer())
    struct.pack_into(">i", batch, 8, length)
    verdict, detail = reader.read(bytes(batch))
    assert verdict == "unreadable", detail
    assert detail.startswith(f"MalformedBatch: a batch at byte 0 of the fetch states {length} "
                             "bytes"), detail


@pytest.mark.parametrize("codec", [5, 6, 7])
def test_an_unknown_v2_codec_is_an_unreadable_batch(reader: Reader, codec: int) -> None:
    """aiokafka's ``UnsupportedCodecError`` was not a data error: the consumer exited, restarted
    at the same offset and exited again."""
    batch = bytearray(v2_sample("gzip").outer())
    struct.pack_into(">h", batch, V2_ATTRIBUTES_AT, codec)
    verdict, detail = reader.read(seal_v2(batch))
    assert verdict == "unreadable", detail
    assert detail.startswith("UnsupportedCodecError"), detail


@pytest.mark.parametrize(("magic", "codec"), [(0, 3), (0, 4), (1, 4), (1, 5), (1, 7)])
def test_an_unknown_legacy_codec_is_an_unreadable_batch(
    reader: Reader, magic: int, codec: int
) -> None:
    inner = legacy_sample(magic, "none").inner
    verdict, detail = reader.read(legacy_message(magic, codec, 2, None, inner))
    assert verdict == "unreadable", detail
    assert detail.startswith("UnsupportedCodecError"), detail


@pytest.mark.parametrize("codec", ["gzip", "snappy", "xerial", "lz4"])
@pytest.mark.parametrize("length", [-12, -13, -100, 0, 13, 10_000])
def test_legacy_inner_lengths_that_go_nowhere_are_a_malformed_batch(
    reader: Reader, codec: str, length: int
) -> None:
    """aiokafka's compiled reader walks the inner message set's lengths to find its last offset:
    at -12 it never moved, below it went backwards, past the end it read past the buffer."""
    sample = legacy_sample(1, codec)
    inner = bytearray(sample.inner)
    struct.pack_into(">i", inner, 8, length)
    verdict, detail = reader.read(sample.outer(bytes(inner)))
    assert verdict == "unreadable", detail
    assert detail.startswith("MalformedBatch: a compressed legacy message at byte 0 states "
                             f"{length} bytes"), detail


def test_a_legacy_message_set_cut_inside_a_header_is_a_malformed_batch(reader: Reader) -> None:
    sample = legacy_sample(1, "gzip")
    verdict, detail = reader.read(sample.outer(sample.inner + b"\x00" * 11))
    assert verdict == "unreadable", detail
    assert "ends inside a message header" in detail, detail


def test_a_key_claiming_two_to_the_63_bytes_is_an_unreadable_batch(reader: Reader) -> None:
    """The compiled parser's bounds check overflows and Python refuses the allocation with
    ``OverflowError``: not a data error before, so the consumer exited."""
    verdict, detail = reader.read(key_of_2_63_bytes())
    assert verdict == "unreadable", detail
    assert detail.startswith("OverflowError"), detail


def test_a_batch_longer_than_the_fetch_is_an_unreadable_batch(reader: Reader) -> None:
    """The first batch states more bytes than the broker sent: aiokafka raises
    ``RecordTooLargeError`` (a broker sends the first batch whole, so only a broken one does
    this), and the consumer skips it rather than exit."""
    batch = bytearray(v2_sample("none").outer())
    struct.pack_into(">i", batch, V2_LENGTH_AT, len(batch))
    verdict, detail = reader.read(bytes(batch))
    assert verdict == "unreadable", detail
    assert detail.startswith("RecordTooLargeError"), detail


def zeros_batch(size: int, base: int = 0) -> bytes:
    return v2_sample("zstd", records=[(None, b"\x00" * size, [])], base=base).outer()


def zeros_batch_of(codec: str, size: int, base: int = 0) -> bytes:
    return v2_sample(codec, records=[(None, b"\x00" * size, [])], base=base).outer()


@pytest.mark.parametrize("codec", ["gzip", "snappy", "xerial", "lz4", "zstd"])
def test_batches_that_fit_only_apart_ask_for_fewer_records_and_each_reads_alone(
    reader: Reader, codec: str
) -> None:
    """Over what is left of the fetch's budget is not a verdict on the bytes: it passes through
    as ``FetchOverBudget`` (the consumer fetches fewer records), never as a data error."""
    size = READER_BUDGET * 6 // 10
    first, second = zeros_batch_of(codec, size), zeros_batch_of(codec, size, base=1)
    verdict, detail = reader.read(first + second)
    assert verdict == "over budget", detail
    for batch, offset in ((first, 0), (second, 1)):
        verdict, records = reader.read(batch)
        assert verdict == "read", records
        assert [(r[0], len(r[2])) for r in records] == [(offset, size)]


def exactly(codec: str, inflated: int) -> bytes:
    """A one-record batch whose records section inflates to exactly ``inflated`` bytes."""
    value = inflated - len(v2_sample("none", records=[(None, b"", [])]).inner)
    for _ in range(4):  # the record's length fields grow with the value
        sample = v2_sample(codec, records=[(None, b"\x00" * value, [])])
        value += inflated - len(sample.inner)
    assert len(sample.inner) == inflated
    return sample.outer()


@pytest.mark.parametrize("codec", ["gzip", "snappy", "xerial", "lz4", "zstd"])
def test_the_budget_is_exact_a_batch_of_it_reads_one_byte_more_does_not(
    reader: Reader, codec: str
) -> None:
    verdict, records = reader.read(exactly(codec, READER_BUDGET))
    assert verdict == "read", records
    verdict, detail = reader.read(exactly(codec, READER_BUDGET + 1))
    assert verdict == "unreadable", detail
    assert detail.startswith("BatchTooLarge"), detail


@pytest.mark.parametrize("codec", ["gzip", "snappy", "xerial", "lz4"])
def test_a_legacy_message_over_the_whole_budget_is_an_unreadable_batch(
    reader: Reader, codec: str
) -> None:
    inner = legacy_sample(1, "none", records=[(None, b"\x00" * (READER_BUDGET + 1), [])]).inner
    verdict, detail = reader.read(legacy_sample(1, codec).outer(inner))
    assert verdict == "unreadable", detail
    assert detail.startswith("BatchTooLarge"), detail


def test_a_legacy_message_with_a_damaged_crc_is_an_unreadable_batch(reader: Reader) -> None:
    message = bytearray(legacy_sample(1, "gzip").outer())
    message[-1] ^= 0xFF
    verdict, detail = reader.read(bytes(message))
    assert verdict == "unreadable", detail
    assert detail.startswith("CorruptRecordException"), detail
    assert reader.read(seal_legacy(message))[0] in ("read", "unreadable")
