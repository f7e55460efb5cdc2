"""One exception root, so that callers can tell the service's own failures from bugs.

Adapters map these to their world: the API turns ``StoreUnavailable`` into a 503 and
``CorruptSketch`` into a clear per-workspace error; the consumer retries ``StoreUnavailable``
without committing, dead-letters ``BadMessage`` and logs ``CorruptSketch`` with the key.
"""

from __future__ import annotations


class UsageMetricsError(Exception):
    """Root of every error this service raises on purpose."""


class StoreUnavailable(UsageMetricsError):
    """Redis did not answer (refused, timed out, loading, read-only replica, cluster down)."""


class StoreOutOfMemory(StoreUnavailable):
    """Redis refused a write at ``maxmemory`` (``OOM command not allowed``, policy
    ``noeviction``). Unavailable for writes, so every caller that waits for Redis waits for this
    too; reads still work. Its own class so that readiness and metrics can say why."""


class CorruptSketch(UsageMetricsError):
    """A key holds something that is not a sketch of this mode (wrong type or a damaged value)."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"unreadable sketch at {key!r}: {reason}")
        self.key = key
        self.reason = reason


class BadMessage(UsageMetricsError):
    """A Kafka message that can never be counted; it goes to the dead-letter topic."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class QueryBusy(UsageMetricsError):
    """This process already runs as many heavy recomputes as it may: try again shortly."""


class StoreMisconfigured(UsageMetricsError):
    """Redis cannot be used as configured, and retrying will not change that: ``REDIS_URL`` is
    unusable, the server's TLS certificate is not trusted, or it refuses the credentials. The
    message says which, and never holds a secret."""


class RebuildRunning(UsageMetricsError):
    """A scope's rebuild is already under way (or one stopped before it finished); starting
    another would mix two generations. ``take_over`` replaces it."""


class RebuildInterrupted(UsageMetricsError):
    """A rebuild's generation is no longer the one being filled (cancelled, or taken over by
    another rebuild): its writes and its switch are refused, and the live sketches stay."""
