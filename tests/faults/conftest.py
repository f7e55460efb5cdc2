"""Fixtures of the fault suite.

A test that kills, pauses or restarts a server starts its own (``own_redis``, ``own_broker``);
the session's broker and Redis are shared by every other test and are never touched. Settings are
exact mode with a fresh topic, group and key prefix (``fault_settings``), so that every count can
be compared with the oracle exactly.
"""

from __future__ import annotations

import shutil
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from sketches.config import Settings
from sketches.connection import open_store
from sketches.store import SketchStore
from tests.faults.helpers import Procs, fault_settings
from tests.support.servers import RedisServer, TansuBroker


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    handles = Procs(tmp_path)
    try:
        yield handles
    finally:
        handles.cleanup()


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A Redis of this test only, with an append-only file (``appendfsync everysec``), so that
    it can be killed and restarted on the same port and directory and keep its data."""
    server = RedisServer(appendonly=True).start()
    try:
        yield server
    finally:
        if server.proc is not None and server.proc.poll() is None:
            server.proc.send_signal(signal.SIGCONT)  # in case the test paused it
        server.stop()
        shutil.rmtree(server.directory, ignore_errors=True)


@pytest.fixture
def own_broker() -> Iterator[TansuBroker]:
    broker = TansuBroker().start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def xsettings(redis_url: str, kafka_bootstrap: str) -> Settings:
    """Exact mode on the session's servers."""
    return fault_settings(redis_url, kafka_bootstrap)


@pytest.fixture
async def xstore(xsettings: Settings) -> AsyncIterator[SketchStore]:
    async with open_store(xsettings) as store:
        yield store
