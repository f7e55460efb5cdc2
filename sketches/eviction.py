"""Redis's eviction policy, checked when a process starts, and how a full Redis is described.

Why a policy other than ``noeviction`` is refused: at ``maxmemory`` an evicting Redis deletes
keys to make room, without telling anyone. Every sketch, change-stamp ring and ``seq`` counter of
this service has an expiry, so the ``volatile-*`` policies take them as readily as the
``allkeys-*`` ones; a day's sketch goes while the stored result that shows its count stays, a
``seq`` goes while the ring it filled survives (issue 15 saw 64 of 400 workspaces lose ``seq``
under ``allkeys-lru``). "No answer shows a count the store no longer holds" cannot hold then. Under
``noeviction`` a full Redis refuses writes instead (``OOM command not allowed``): the consumer
keeps the batch uncommitted and retries until memory is freed (``consumer.writer``), and nothing
is lost.

Several managed Redis offerings default to an evicting policy, and some disable ``CONFIG``
altogether. So at start the consumer, the API, ``replay`` and ``rebuild`` read
``maxmemory-policy`` from every master (``read_policies``) and ``decide``:

- every master says ``noeviction``: go on;
- a master evicts: refuse to start, naming each such master, its policy and the fix, unless
  ``REDIS_ALLOW_EVICTION=true``: then go on with a loud warning, and the gauge
  ``usage_metrics_redis_eviction_allowed`` says 1 for as long as the process runs;
- ``CONFIG`` is refused (renamed away, or not allowed for the ACL user): say that the policy
  cannot be checked and go on with a warning.

``decide`` and the wording are pure; the I/O is in ``read_policies`` and ``read_memory``; waiting
for a Redis that does not answer yet is ``check_policy``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from prometheus_client import Gauge
from redis import exceptions as rexc
from redis.asyncio.cluster import RedisCluster

from sketches.errors import StoreUnavailable, UsageMetricsError
from sketches.store import RedisClient

log = logging.getLogger(__name__)

NOEVICTION = "noeviction"
POLICY = "maxmemory-policy"
ALLOW_SETTING = "REDIS_ALLOW_EVICTION"
EXIT_EVICTION_REFUSED = 78
"""Exit status of a command that refuses an evicting Redis: sysexits' ``EX_CONFIG``, a
configuration error that a restart cannot fix."""

# One process-wide series (prometheus-client's default registry), so that the consumer's and the
# API's /metrics both show it, once, even when both run in one process (``usage-metrics demo``).
EVICTION_ALLOWED = Gauge(
    "usage_metrics_redis_eviction_allowed",
    "1 when Redis may evict keys (a maxmemory-policy other than noeviction) and "
    "REDIS_ALLOW_EVICTION=true let the process run anyway: answers may show deleted data",
)


class Verdict(StrEnum):
    OK = "ok"
    REFUSED = "refused"
    ALLOWED = "allowed"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class NodePolicy:
    """What one master answered: its policy, or why ``CONFIG GET`` gave none."""

    node: str
    policy: str | None = None
    refusal: str | None = None


@dataclass(frozen=True)
class PolicyCheck:
    verdict: Verdict
    message: str
    nodes: tuple[NodePolicy, ...]


class EvictionRefused(UsageMetricsError):
    """Redis may evict keys and ``REDIS_ALLOW_EVICTION`` is not set: the process must not run."""

    def __init__(self, check: PolicyCheck) -> None:
        super().__init__(check.message)
        self.check = check


def _where(nodes: Sequence[NodePolicy]) -> str:
    names = ", ".join(n.node for n in nodes)
    return f"Redis at {names}" if len(nodes) == 1 else f"Redis masters {names}"


def _policies(nodes: Sequence[NodePolicy]) -> str:
    if len(nodes) == 1:
        return f"maxmemory-policy {nodes[0].policy}"
    return "maxmemory-policy " + ", ".join(f"{n.policy} on {n.node}" for n in nodes)


def decide(nodes: Sequence[NodePolicy], allow_eviction: bool) -> PolicyCheck:
    """The verdict on what the masters answered, with the message to log (or to refuse with).

    An evicting master decides, whatever the others say: one master deleting keys is enough to
    break answers of the scopes it holds. The message names only the masters at fault, each with
    its own policy, so that a cluster whose masters differ is reported node by node."""
    evicting = [n for n in nodes if n.policy is not None and n.policy != NOEVICTION]
    unknown = [n for n in nodes if n.policy is None]
    checked = tuple(nodes)
    if evicting:
        where, policies = _where(evicting), _policies(evicting)
        if allow_eviction:
            return PolicyCheck(Verdict.ALLOWED, (
                f"{where} may evict keys ({policies}) and {ALLOW_SETTING}=true: running anyway. "
                "When memory runs short Redis deletes sketches and change stamps under answers "
                "that still show them, and logins may be lost for good; set maxmemory-policy "
                "noeviction to make answers trustworthy again "
                "(usage_metrics_redis_eviction_allowed is 1)"
            ), checked)
        return PolicyCheck(Verdict.REFUSED, (
            f"refusing to start: {where} may evict keys ({policies}). When memory runs short it "
            "would delete sketches and change stamps under answers that still show them. Fix: "
            "set maxmemory-policy to noeviction (`CONFIG SET maxmemory-policy noeviction` and "
            "the same line in redis.conf, or the provider's parameter group on a managed "
            f"Redis), or set {ALLOW_SETTING}=true to run anyway and accept counts that may "
            "show deleted data or lose logins"
        ), checked)
    if unknown or not nodes:
        reasons = "; ".join(f"{n.node}: {n.refusal}" for n in unknown) or "no master answered"
        return PolicyCheck(Verdict.UNKNOWN, (
            "CONFIG is disabled here (as on some managed services): cannot check "
            f"maxmemory-policy ({reasons}); make sure it is noeviction (the provider's "
            "parameter group), or Redis may delete sketches under answers that still show them"
        ), checked)
    return PolicyCheck(Verdict.OK, f"{_where(nodes)}: maxmemory-policy {NOEVICTION}", checked)


# ------------------------------------------------------------------------------------ I/O


def node_label(client: RedisClient) -> str:
    """``host:port`` (or the socket path) of a single Redis, never its credentials."""
    pool = getattr(client, "connection_pool", None)
    kwargs: Mapping[str, Any] = pool.connection_kwargs if pool is not None else {}
    if "path" in kwargs:
        return str(kwargs["path"])
    return f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}"


def _down(err: BaseException) -> StoreUnavailable:
    return StoreUnavailable(f"{type(err).__name__}: {err}")


async def _masters(client: RedisCluster) -> list[Any]:
    try:
        await client.initialize()
        return list(client.get_primaries())
    except (rexc.RedisError, rexc.RedisClusterException, OSError) as err:
        raise _down(err) from err


async def _policy_of(client: RedisClient, node: Any, label: str) -> NodePolicy:
    try:
        if node is None:
            reply = await client.config_get(POLICY)
        else:
            reply = await client.config_get(POLICY, target_nodes=node)
    except rexc.ResponseError as err:
        # "unknown command 'CONFIG'" (renamed away), NOPERM (the ACL user may not run it): the
        # server answers, it just will not tell.
        return NodePolicy(label, refusal=f"{type(err).__name__}: {err}")
    except (rexc.RedisError, rexc.RedisClusterException, OSError) as err:
        raise _down(err) from err
    value = reply.get(POLICY) if isinstance(reply, Mapping) else None
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if not value:
        return NodePolicy(label, refusal="CONFIG GET maxmemory-policy answered nothing")
    return NodePolicy(label, policy=str(value).lower())


async def read_policies(client: RedisClient) -> list[NodePolicy]:
    """``maxmemory-policy`` of the Redis, or of every master of a cluster, each on its own.
    Raises ``StoreUnavailable`` while Redis does not answer."""
    if isinstance(client, RedisCluster):
        return [await _policy_of(client, node, str(node.name)) for node in await _masters(client)]
    return [await _policy_of(client, None, node_label(client))]


async def check_policy(
    client: RedisClient,
    allow_eviction: bool,
    *,
    max_backoff: float,
    stop: asyncio.Event | None = None,
    where: str = "",
) -> PolicyCheck | None:
    """Read and judge the policy once Redis answers, retrying with a growing backoff meanwhile
    (a Redis that is down at start is waited for, as every write is). Logs the verdict and sets
    the gauge; raises ``EvictionRefused`` for a refused one (the caller says so and exits), and
    returns None if ``stop`` is set before Redis answered. ``where`` (the redacted URL) goes
    into the log lines of the wait, so that a wrong address or password shows which."""
    backoff, attempt = 0.1, 0
    while True:
        attempt += 1
        try:
            nodes = await read_policies(client)
            break
        except StoreUnavailable as err:
            log.warning("store unavailable%s, cannot check Redis's maxmemory-policy yet "
                        "(attempt %d), retrying in %.1fs: %s", f" at {where}" if where else "",
                        attempt, backoff, err)
        if stop is None:
            await asyncio.sleep(backoff)
        else:
            try:
                await asyncio.wait_for(stop.wait(), backoff)
                return None
            except TimeoutError:
                pass
        backoff = min(backoff * 2, max_backoff)
    return judge(nodes, allow_eviction)


def judge(nodes: Sequence[NodePolicy], allow_eviction: bool) -> PolicyCheck:
    """``decide``, then log the verdict and set the gauge; ``EvictionRefused`` if refused."""
    check = decide(nodes, allow_eviction)
    EVICTION_ALLOWED.set(1 if check.verdict is Verdict.ALLOWED else 0)
    if check.verdict is Verdict.REFUSED:
        raise EvictionRefused(check)
    if check.verdict is Verdict.OK:
        log.info("%s", check.message)
    else:
        log.warning("%s", check.message)
    return check


# ------------------------------------------------------------------------- a full Redis


@dataclass(frozen=True)
class NodeMemory:
    node: str
    used: int
    maxmemory: int


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def oom_reason(memory: Sequence[NodeMemory] | None, error: str = "") -> str:
    """Why the consumer is not ready while Redis refuses writes: the masters at (or nearest to)
    their ``maxmemory``, with figures, and what happens next."""
    limited = [m for m in memory or () if m.maxmemory > 0]
    full = [m for m in limited if m.used >= m.maxmemory] or limited
    if full:
        figures = ", ".join(f"{m.node}: maxmemory {_mib(m.maxmemory)}, used {_mib(m.used)}"
                            for m in full)
    else:
        figures = f"maxmemory unknown: {error}" if error else "maxmemory unknown"
    return (f"Redis is out of memory ({figures}): ingestion paused, retrying; it resumes by "
            "itself once memory is freed or maxmemory raised")


async def read_memory(client: RedisClient) -> list[NodeMemory]:
    """``used_memory`` and ``maxmemory`` (``INFO memory``) of the Redis or of every master."""
    try:
        if isinstance(client, RedisCluster):
            out = []
            for node in await _masters(client):
                info = await client.info("memory", target_nodes=node)
                out.append(NodeMemory(str(node.name), int(info["used_memory"]),
                                      int(info["maxmemory"])))
            return out
        info = await client.info("memory")
        return [NodeMemory(node_label(client), int(info["used_memory"]),
                           int(info["maxmemory"]))]
    except (rexc.RedisError, rexc.RedisClusterException, OSError, KeyError) as err:
        raise _down(err) from err
