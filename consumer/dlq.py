"""The dead-letter topic: bad messages leave the stream with their original bytes and a reason.

A dead letter keeps the source's key and value byte for byte, so that once the producer is fixed
the message can be sent back as it was. What went wrong and where it came from travel as
headers, which every Kafka tool shows:

``dlq.reason``, ``dlq.source.topic``, ``dlq.source.partition``, ``dlq.source.offset``,
``dlq.source.timestamp`` (plus the source message's own headers, kept).

Dead letters are sent, and acknowledged by the broker, before the batch's offsets are committed,
so a crash can duplicate a dead letter but never lose one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from aiokafka import AIOKafkaProducer
from aiokafka.errors import MessageSizeTooLargeError

from consumer.batch import Record

log = logging.getLogger(__name__)

REASON_HEADER = "dlq.reason"
# The producer may send values up to this size (the DLQ topic's max.message.bytes must allow it;
# compose.yaml sets it). Anything the broker still refuses is cut to this prefix, with a header
# saying so: a dead letter that can never be delivered would stop the consumer for good.
MAX_DLQ_REQUEST_BYTES = 8 * 1024 * 1024
TRUNCATED_PREFIX_BYTES = 64 * 1024


def dead_letter_headers(record: Record, reason: str) -> list[tuple[str, bytes]]:
    return [
        *[(k, v) for k, v in (record.headers or ()) if not k.startswith("dlq.")],
        (REASON_HEADER, reason.encode("utf-8", "replace")),
        ("dlq.source.topic", record.topic.encode()),
        ("dlq.source.partition", str(record.partition).encode()),
        ("dlq.source.offset", str(record.offset).encode()),
        ("dlq.source.timestamp", str(record.timestamp).encode()),
    ]


class DeadLetters:
    def __init__(self, producer: AIOKafkaProducer, topic: str) -> None:
        self.producer = producer
        self.topic = topic

    async def send(self, dead: Sequence[tuple[Record, str]]) -> None:
        """Send every dead letter and wait for all acknowledgements."""
        if not dead:
            return
        futures = []
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
            futures.append(await self._send_one(record, reason))
        await asyncio.gather(*futures)

    async def _send_one(self, record: Record, reason: str) -> asyncio.Future[object]:
        headers = dead_letter_headers(record, reason)
        try:
            fut: asyncio.Future[object] = await self.producer.send(
                self.topic, value=record.value, key=record.key, headers=headers
            )
            return fut
        except MessageSizeTooLargeError:
            size = len(record.value or b"")
            log.error(
                "dead letter of %d bytes is too large for the topic; sending its first %d bytes",
                size,
                TRUNCATED_PREFIX_BYTES,
                extra={"topic": record.topic, "partition": record.partition,
                       "offset": record.offset},
            )
            headers.append(("dlq.truncated.original_size", str(size).encode()))
            cut: asyncio.Future[object] = await self.producer.send(
                self.topic,
                value=(record.value or b"")[:TRUNCATED_PREFIX_BYTES],
                key=(record.key or b"")[:1024] or None,
                headers=headers,
            )
            return cut
