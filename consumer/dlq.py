"""The dead-letter topic: bad messages leave the stream with their original bytes and a reason.

A dead letter keeps the source's key and value byte for byte, so that once the producer is fixed
the message can be sent back as it was. What went wrong and where it came from travel as
headers, which every Kafka tool shows:

``dlq.reason``, ``dlq.source.topic``, ``dlq.source.partition``, ``dlq.source.offset``,
``dlq.source.timestamp`` (plus the source message's own headers, kept).

Dead letters are sent, and acknowledged by the broker, before the batch's offsets are committed,
so a crash can duplicate a dead letter but never lose one.

A dead letter may be larger than the dead-letter topic allows where the source topic took it
(a compressed multi-megabyte value, or a value near the limit that the ``dlq.*`` headers push
over it). The broker refuses it with ``MESSAGE_SIZE_TOO_LARGE``; it is then sent once in each
smaller form until one is taken: its first 64 KiB with its key and its own headers cut, and
``dlq.truncated.original_size``; then the ``dlq.*`` headers alone. If even that is refused, the
loss is logged with the source offset and counted
(``usage_metrics_dead_letters_undeliverable_total``); the consumer goes on.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from aiokafka import AIOKafkaProducer
from aiokafka.errors import MessageSizeTooLargeError, RecordListTooLargeError

from consumer import metrics
from consumer.batch import Record

log = logging.getLogger(__name__)

REASON_HEADER = "dlq.reason"
ORIGINAL_SIZE_HEADER = "dlq.truncated.original_size"
# The producer may send values up to this size; compose.yaml gives the dead-letter topic the same
# max.message.bytes. A dead letter the broker (or this client) still refuses is sent again in
# smaller forms, each at most once: a dead letter that can never be delivered must not stop the
# consumer, which would only be restarted by its stall watchdog to fail on it again.
MAX_DLQ_REQUEST_BYTES = 8 * 1024 * 1024
TRUNCATED_PREFIX_BYTES = 64 * 1024
TRUNCATED_KEY_BYTES = 1024
# Of the source's own headers, a truncated dead letter keeps each value's first KiB, and the
# headers in order while they fit in 8 KiB.
TRUNCATED_HEADER_VALUE_BYTES = 1024
TRUNCATED_HEADERS_BYTES = 8 * 1024
MAX_REASON_BYTES = 2048
# What the broker answers when a batch is larger than the topic's max.message.bytes (10), or a
# request than its limits (18); aiokafka raises the first itself over max_request_size.
REFUSED_AS_TOO_LARGE = (MessageSizeTooLargeError, RecordListTooLargeError)

Headers = list[tuple[str, bytes]]


def _dlq_headers(record: Record, reason: str) -> Headers:
    return [
        (REASON_HEADER, reason.encode("utf-8", "replace")[:MAX_REASON_BYTES]),
        ("dlq.source.topic", record.topic.encode()),
        ("dlq.source.partition", str(record.partition).encode()),
        ("dlq.source.offset", str(record.offset).encode()),
        ("dlq.source.timestamp", str(record.timestamp).encode()),
    ]


def _source_headers(record: Record) -> Headers:
    return [(k, v) for k, v in (record.headers or ()) if not k.startswith("dlq.")]


def dead_letter_headers(record: Record, reason: str) -> Headers:
    return [*_source_headers(record), *_dlq_headers(record, reason)]


def _original_size(record: Record) -> Headers:
    return [(ORIGINAL_SIZE_HEADER, str(len(record.value or b"")).encode())]


def _truncated_headers(record: Record) -> Headers:
    kept: Headers = []
    room = TRUNCATED_HEADERS_BYTES
    for key, value in _source_headers(record):
        cut = (key.encode("utf-8", "replace")[:256].decode("utf-8", "ignore"),
               (value or b"")[:TRUNCATED_HEADER_VALUE_BYTES])
        size = len(cut[0]) + len(cut[1])
        if size > room:
            break
        kept.append(cut)
        room -= size
    return kept


def forms(record: Record, reason: str) -> list[tuple[str, bytes | None, bytes | None, Headers]]:
    """The forms of one dead letter, largest first: as it came; its first 64 KiB, with its key
    and headers cut; only the ``dlq.*`` headers, with an empty value."""
    value, key = record.value, record.key
    dlq = _dlq_headers(record, reason)
    return [
        ("whole", value, key, [*_source_headers(record), *dlq]),
        ("truncated", (value or b"")[:TRUNCATED_PREFIX_BYTES],
         (key or b"")[:TRUNCATED_KEY_BYTES] or None,
         [*_truncated_headers(record), *dlq, *_original_size(record)]),
        ("headers only", b"", None, [*dlq, *_original_size(record)]),
    ]


class DeadLetters:
    def __init__(self, producer: AIOKafkaProducer, topic: str) -> None:
        self.producer = producer
        self.topic = topic
        self.undeliverable = 0

    async def send(self, dead: Sequence[tuple[Record, str]]) -> None:
        """Send every dead letter and wait for all acknowledgements. A dead letter refused as
        too large is sent again, alone, in its next smaller form; one that no form gets
        delivered is logged and counted, never retried: the batch goes on. Any other failure
        raises, and the caller retries the whole batch's dead letters (at least once)."""
        if not dead:
            return
        pending: list[tuple[Record, str, asyncio.Future[object] | None]] = []
        for record, reason in dead:
            log.warning(
                "dead-lettering message: %s",
                reason,
                extra={
                    "topic": record.topic,
                    "partition": record.partition,
                    "offset": record.offset,
                },
            )
            pending.append((record, reason, await self._submit(*forms(record, reason)[0][1:])))
        for record, reason, fut in pending:
            try:
                if fut is None:
                    raise MessageSizeTooLargeError("over the producer's max_request_size")
                await fut
            except REFUSED_AS_TOO_LARGE as err:
                # A whole batch is refused for one record too large, so a small dead letter
                # may have been refused for a neighbour: each is tried again alone.
                await self._send_smaller(record, reason, err)

    async def _submit(
        self, value: bytes | None, key: bytes | None, headers: Headers
    ) -> asyncio.Future[object] | None:
        """The acknowledgement to wait for, or None when this client refuses the record itself
        (larger than max_request_size)."""
        try:
            fut: asyncio.Future[object] = await self.producer.send(
                self.topic, value=value, key=key, headers=headers
            )
        except REFUSED_AS_TOO_LARGE:
            return None
        return fut

    async def _send_smaller(self, record: Record, reason: str, first: Exception) -> None:
        where = {"topic": record.topic, "partition": record.partition, "offset": record.offset}
        refusal: Exception = first
        for name, value, key, headers in forms(record, reason):
            if name == "whole" and len(record.value or b"") > TRUNCATED_PREFIX_BYTES:
                continue  # refused for its own size: no point in sending it again
            fut = await self._submit(value, key, headers)
            try:
                if fut is None:
                    raise MessageSizeTooLargeError("over the producer's max_request_size")
                await fut
            except REFUSED_AS_TOO_LARGE as err:
                refusal = err
                continue
            if name != "whole":
                log.error(
                    "dead letter of %d bytes refused as too large (%s); sent %s",
                    len(record.value or b""), type(refusal).__name__, name, extra=where,
                )
            return
        self.undeliverable += 1
        metrics.DEAD_LETTERS_UNDELIVERABLE.inc()
        log.error(
            "dead letter refused as too large in every form, even without a value (%s): "
            "raise the dead-letter topic's max.message.bytes; the message is only in the source "
            "topic, at this offset",
            type(refusal).__name__, extra=where,
        )
