"""The ``usage-metrics`` command: consume, api, replay, rebuild, token, demo."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import signal
import sys
import time
from collections.abc import Coroutine, Sequence
from datetime import datetime
from typing import Any, TypeVar

from pydantic import ValidationError

from sketches.config import Settings
from sketches.errors import StoreMisconfigured
from sketches.eviction import EXIT_EVICTION_REFUSED, EvictionRefused
from usage_metrics.logs import setup_logging
from usage_metrics.progress import progress_bar

log = logging.getLogger("usage_metrics")
T = TypeVar("T")

# Exit codes a supervisor can act on (README, Commands).
EXIT_INVALID_SETTINGS = 2
EXIT_STALLED = 3
# Kafka or Redis refuses this process's TLS settings or credentials: a restart cannot help.
EXIT_ACCESS_REFUSED = 4
KAFKA_COMMANDS = frozenset({"consume", "replay", "rebuild", "demo"})


def _install_stop(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)


async def _consume(settings: Settings) -> int:
    from consumer.health import serve_health
    from consumer.kafka import check_kafka_access
    from consumer.runner import ConsumerStalled, GroupConsumer
    from sketches.connection import check_store, open_store

    await check_kafka_access(settings)
    stop = asyncio.Event()
    _install_stop(stop)
    async with open_store(settings) as store:
        await check_store(store, settings)
        group = GroupConsumer(settings, store)
        health = None
        if settings.consumer_health_port is not None:
            health = await serve_health(group, settings.consumer_health_port)
        try:
            await group.run(stop)
        except ConsumerStalled as err:
            log.error("%s", err)
            return EXIT_STALLED
        finally:
            if health is not None:
                health.close()
    return 0


def _offsets_arg(text: str) -> dict[int, int]:
    from consumer.replay import parse_offsets

    try:
        return parse_offsets(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _workspace_arg(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("a workspace id is never empty (omit --workspace to "
                                         "rebuild the org's own sketches)")
    return text


def _parse_when(text: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO-8601 time: {text!r}") from None
    if moment.tzinfo is None:
        raise argparse.ArgumentTypeError("give a zone, e.g. 2026-11-01T00:00:00Z")
    return moment


async def _check_policy(settings: Settings) -> None:
    """Redis's eviction policy, before a command writes anything (``EvictionRefused``)."""
    from sketches.connection import open_store
    from sketches.eviction import check_policy

    async with open_store(settings) as store:
        await check_policy(store.client, settings.redis_allow_eviction,
                           max_backoff=settings.redis_retry_max_backoff_s,
                           where=settings.redis_url_redacted())


async def _replay(settings: Settings, args: argparse.Namespace) -> int:
    from consumer.kafka import check_kafka_access
    from consumer.replay import ReplayStart, UnreadableRange, replay
    from sketches.connection import check_store, open_store

    await check_kafka_access(settings)
    if args.from_beginning:
        start = ReplayStart("beginning")
    elif args.from_timestamp is not None:
        start = ReplayStart("timestamp", timestamp=args.from_timestamp)
    else:
        start = ReplayStart("offsets", offsets=args.from_offsets)
    await _check_policy(settings)
    try:
        with progress_bar(f"replay {settings.kafka_topic}") as report:
            async with open_store(settings) as store:
                await check_store(store, settings)
                stats = await replay(settings, store, start, progress=report)
    except UnreadableRange as err:
        log.error("%s", err)
        return 1
    sys.stdout.write(
        f"replayed {stats.messages} messages: {stats.logins} logins, {stats.filtered} filtered, "
        f"{stats.excluded} excluded, {stats.bad} bad (not re-dead-lettered)\n"
    )
    return 0


async def _rebuild(settings: Settings, org: str, workspaces: Sequence[str],
                   take_over: bool = False) -> int:
    """The selected workspaces' sketches (or, without a workspace, the org's own) rebuilt from
    the retained topic in one pass; the other scopes are not touched, and the old sketches
    answer until the new ones are complete (``consumer.rebuild``)."""
    from consumer.kafka import check_kafka_access
    from consumer.rebuild import rebuild
    from consumer.recordfilter import WrongRecordKey
    from consumer.replay import UnreadableRange
    from consumer.selection import Selection
    from sketches.connection import check_store, open_store
    from sketches.errors import RebuildInterrupted, RebuildRunning
    from sketches.keys import Scope, org_scope

    # Before a new generation is begun: a rebuild that cannot read the topic must leave the
    # store as it was.
    await check_kafka_access(settings)
    selection = Selection.of([Scope(org, w) for w in workspaces] if workspaces
                             else [org_scope(org)])
    name = selection.describe()
    await _check_policy(settings)
    try:
        async with open_store(settings) as store:
            await check_store(store, settings)
            with progress_bar(f"rebuild {settings.kafka_topic}") as report:
                stats = await rebuild(
                    settings, store, selection, progress=report,
                    on_begin=lambda _: log.info("rebuilding %s; the old sketches answer until "
                                                "the new ones are complete", name),
                    take_over=take_over,
                )
    except WrongRecordKey as err:
        log.error("%s", err)
        return EXIT_INVALID_SETTINGS
    except (RebuildRunning, RebuildInterrupted, UnreadableRange) as err:
        log.error("%s", err)
        return 1
    sys.stdout.write(
        f"rebuilt {name} from {stats.messages} messages: {stats.logins} logins "
        f"counted, {stats.excluded} excluded\n"
    )
    return 0


def _run(main: Coroutine[Any, Any, T]) -> T:
    """Run on uvloop: the consumer and the API spend much of their time in the event loop
    (socket reads of pipelines and fetches), where uvloop is several times cheaper than
    asyncio's own loop. It comes with uvicorn[standard]; without it, asyncio's loop runs."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - a minimal install
        return asyncio.run(main)
    return uvloop.run(main)


def _token(settings: Settings, args: argparse.Namespace) -> int:
    from api.auth import ROLES, issue_token

    if args.role not in ROLES:
        sys.stderr.write(f"unknown role {args.role!r}; one of {', '.join(ROLES)}\n")
        return 2
    if args.ttl <= 0:
        sys.stderr.write(f"--ttl must be a positive number of seconds, not {args.ttl}\n")
        return 2
    try:
        # Refuses what the API would refuse: a lifetime over JWT_MAX_LIFETIME_SECONDS, and an
        # HS256 token while JWT_PUBLIC_KEY is set (the API would answer 401 to it).
        token = issue_token(
            settings, role=args.role, org_id=args.org, ttl_seconds=args.ttl, now=time.time()
        )
    except ValueError as err:
        sys.stderr.write(f"usage-metrics token: {err}\n")
        return 2
    sys.stdout.write(token + "\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="usage-metrics",
        description="DAU/WAU/MAU per workspace from Kafka login events (settings: environment)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("consume", help="run the consumer in KAFKA_GROUP_ID until stopped")
    api = sub.add_parser("api", help="serve the HTTP API")
    api.add_argument("--host", default="127.0.0.1")
    api.add_argument("--port", type=int, default=8000)
    rp = sub.add_parser("replay", help="re-read the topic from a point into the store, then exit")
    where = rp.add_mutually_exclusive_group(required=True)
    where.add_argument("--from-beginning", action="store_true")
    where.add_argument("--from-timestamp", type=_parse_when, metavar="ISO")
    where.add_argument("--from-offsets", metavar="P:O,...", type=_offsets_arg)
    tok = sub.add_parser("token", help="print a signed JWT for local use")
    tok.add_argument("--role", required=True)
    tok.add_argument("--org")
    tok.add_argument("--ttl", type=int, default=3600,
                     help="seconds (default 3600; at most JWT_MAX_LIFETIME_SECONDS)")
    rb = sub.add_parser(
        "rebuild",
        help="rebuild workspaces' sketches (or, without --workspace, the org's own) from the "
        "retained topic in one pass, switching to them once complete",
    )
    rb.add_argument("--org", required=True)
    rb.add_argument("--workspace", action="append", default=[], type=_workspace_arg,
                    help="repeat for several workspaces of the org; omit to rebuild the org's "
                    "own sketches")
    rb.add_argument("--take-over", action="store_true",
                    help="replace a rebuild of the same scopes that is running or stopped "
                    "before it finished (its writes are then refused)")
    demo = sub.add_parser("demo", help="run everything locally with synthetic logins")
    demo.add_argument("--port", type=int, default=8000)
    demo.add_argument("--days", type=int, default=42, help="days of synthetic history")
    demo.add_argument(
        "--exit-when-ready", action="store_true", help="exit once the curl line is printed"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = Settings()
    except ValidationError as err:
        # Refuse to start, naming each setting and the rule, never the value (it may be secret).
        # A rule over several settings has no location: its message names them.
        problems = "; ".join(
            f"{'.'.join(str(part) for part in e['loc']).upper()}: {e['msg']}" if e["loc"]
            else e["msg"]
            for e in err.errors(include_url=False, include_input=False)
        )
        sys.stderr.write(f"usage-metrics: refusing to start, invalid settings: {problems}\n")
        return EXIT_INVALID_SETTINGS
    setup_logging(settings)
    try:
        if args.command in KAFKA_COMMANDS:
            from consumer.kafka import KafkaAccessRefused

            try:
                return _kafka_command(settings, args)
            except KafkaAccessRefused as err:
                # One line, no traceback: retrying cannot help, the settings (or the broker's
                # users and certificates) must change.
                log.error("%s", err)
                return EXIT_ACCESS_REFUSED
        return _command(settings, args)
    except StoreMisconfigured as err:
        # One line, no traceback: the message names the problem and the redacted URL.
        log.error("%s", err)
        return EXIT_ACCESS_REFUSED
    except EvictionRefused as err:
        # Redis may evict keys: a configuration error, said in one line (sketches.eviction).
        log.error("%s", err)
        return EXIT_EVICTION_REFUSED


def _command(settings: Settings, args: argparse.Namespace) -> int:
    if args.command == "api":
        import uvicorn

        from api.app import create_app

        app = create_app(settings)
        server = uvicorn.Server(uvicorn.Config(
            app, host=args.host, port=args.port, log_config=None, proxy_headers=False,
        ))
        # A refusal found after start (Redis answered late) stops the server like a SIGTERM.
        app.state.stop_server = lambda: setattr(server, "should_exit", True)
        # uvicorn re-raises the SIGTERM it handled once it has shut down gracefully, which would
        # make a clean stop look like a kill (exit -15) to a supervisor; this handler receives
        # that re-raised signal and turns it into exit 0.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        try:
            _run(server.serve())
        except SystemExit:
            # uvicorn exits 3 when the lifespan fails: ours has its own status.
            if getattr(app.state, "eviction_refusal", None) is None:
                raise
        if getattr(app.state, "eviction_refusal", None) is not None:
            return EXIT_EVICTION_REFUSED  # uvicorn logged the reason
        return 0
    if args.command == "token":
        return _token(settings, args)
    return 2


GC_THRESHOLDS = (50_000, 20, 100)
"""Young objects between collections, and how many of each generation before the next: a batch
of 100,000 records builds millions of short-lived tuples, sets and strings, and at CPython's
(700, 10, 10) they set off hundreds of young collections and, every hundred, a full one that
walks every cached key head and settings entry (at 100,000 workspaces, over a million objects)."""


def _tune_gc() -> None:
    """For the batch processes (consume, replay, rebuild): what was built at start-up (modules,
    settings, compiled scripts) is frozen out of every collection, and collections come after
    ``GC_THRESHOLDS`` allocations. Reference counting still frees almost everything at once;
    the collector only finds cycles, which a batch hardly makes."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def _kafka_command(settings: Settings, args: argparse.Namespace) -> int:
    if args.command in ("consume", "replay", "rebuild"):
        _tune_gc()
    if args.command == "consume":
        return _run(_consume(settings))
    if args.command == "replay":
        return _run(_replay(settings, args))
    if args.command == "rebuild":
        return _run(_rebuild(settings, args.org, args.workspace, args.take_over))
    from usage_metrics.demo import run_demo

    return asyncio.run(run_demo(args.port, args.days, args.exit_when_ready))


if __name__ == "__main__":
    raise SystemExit(main())
