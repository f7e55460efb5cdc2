"""The consumer's small HTTP port: ``/healthz`` (the process answers), ``/readyz`` (joined the
group, Redis reachable and taking writes, not stalled) and ``/metrics`` (Prometheus). A few
lines of asyncio are enough here; the consumer has no web framework to carry."""

from __future__ import annotations

import asyncio
import json
import time

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from consumer.pause import REDIS_OOM
from consumer.runner import GroupConsumer
from sketches.errors import StoreUnavailable
from sketches.eviction import oom_reason, read_memory


async def _status(group: GroupConsumer, path: str) -> tuple[int, str, bytes]:
    if path == "/healthz":
        return 200, "application/json", b'{"status": "ok"}'
    if path == "/metrics":
        return 200, CONTENT_TYPE_LATEST, generate_latest()
    if path == "/readyz":
        if not group.ready:
            return 503, "application/json", b'{"detail": "not in the group yet"}'
        try:
            await group.store.ping()
        except StoreUnavailable:
            return 503, "application/json", b'{"detail": "store unavailable"}'
        if group.pause.reason == REDIS_OOM:
            # Redis answers PING but refuses writes: say so, with its figures.
            try:
                reason = oom_reason(await read_memory(group.store.client))
            except StoreUnavailable as err:
                reason = oom_reason(None, str(err))
            return 503, "application/json", json.dumps({"detail": reason}).encode()
        idle = time.monotonic() - group.last_progress
        if idle > group.settings.consumer_stall_timeout_s:
            return 503, "application/json", b'{"detail": "no progress while lagging"}'
        return 200, "application/json", b'{"status": "ready"}'
    return 404, "application/json", b'{"detail": "not found"}'


async def serve_health(group: GroupConsumer, port: int, host: str = "0.0.0.0") -> asyncio.Server:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), 5)
            parts = request.decode("latin-1").split()
            path = parts[1].split("?")[0] if len(parts) >= 2 else "/"
            status, ctype, body = await _status(group, path)
            reason = {200: "OK", 404: "Not Found", 503: "Service Unavailable"}[status]
            head = (
                f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            writer.write(head.encode() + body)
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, host, port)
