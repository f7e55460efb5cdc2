"""Session servers and per-test isolation.

One broker and one Redis serve the whole session (started here, or named by
``KAFKA_BOOTSTRAP_SERVERS``/``REDIS_URL``). Each test gets a fresh topic, a fresh consumer group and
a fresh Redis key prefix, so tests never see each other's data and nothing is ever flushed: a
Redis named by ``REDIS_URL`` may hold somebody else's keys.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
import redis.asyncio as aioredis
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings

from sketches.config import Settings
from sketches.connection import open_store
from sketches.store import SketchStore
from tests.support.servers import RedisServer, TansuBroker

# Two busy cores make generation slow now and then: wall-clock health checks and deadlines would
# turn load into flaky failures. CI runs derandomized so a failure reproduces exactly.
hypothesis_settings.register_profile(
    "default", deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
hypothesis_settings.register_profile(
    "ci", deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
hypothesis_settings.load_profile("ci" if os.environ.get("CI") else "default")


def _docker_answers() -> bool:
    """testcontainers needs a Docker engine; these machines have only the client."""
    if not os.path.exists("/var/run/docker.sock") and not os.environ.get("DOCKER_HOST"):
        return False
    try:
        import docker  # type: ignore[import-untyped]

        docker.from_env().ping()
        return True
    except Exception:  # noqa: BLE001 - any failure means: no engine to use
        return False


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    env = os.environ.get("REDIS_URL")
    if env:
        yield env
        return
    if _docker_answers():
        from testcontainers.redis import RedisContainer

        with RedisContainer("redis:7.4") as container:
            host = container.get_container_host_ip()
            yield f"redis://{host}:{container.get_exposed_port(6379)}/0"
        return
    server = RedisServer().start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    env = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if env:
        yield env
        return
    if _docker_answers():
        from testcontainers.kafka import KafkaContainer

        with KafkaContainer().with_kraft() as container:
            yield container.get_bootstrap_server()
        return
    broker = TansuBroker().start()
    try:
        yield broker.bootstrap
    finally:
        broker.stop()


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:10]}"


async def create_topics(bootstrap: str, *topics: str, partitions: int = 1) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(t, num_partitions=partitions, replication_factor=1) for t in topics]
        )
    finally:
        await admin.close()


@pytest.fixture
def key_prefix() -> str:
    return unique("t")


@pytest.fixture(params=["hll", "exact"])
def sketch_mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def settings(
    redis_url: str, kafka_bootstrap: str, key_prefix: str, sketch_mode: str
) -> Settings:
    return Settings(
        redis_url=redis_url,
        kafka_bootstrap_servers=kafka_bootstrap,
        kafka_topic=unique("metrics"),
        kafka_dlq_topic=unique("dlq"),
        kafka_group_id=unique("group"),
        redis_key_prefix=key_prefix,
        sketch_mode=sketch_mode,
        jwt_secret="test-secret-at-least-32-bytes-long!!",
        consumer_fetch_timeout_ms=100,
        consumer_session_timeout_ms=6000,
        consumer_heartbeat_interval_ms=500,
        _env_file=None,
    )


@pytest.fixture
async def topics(settings: Settings) -> tuple[str, str]:
    """The settings' topic (2 partitions) and its dead-letter topic, created fresh."""
    await create_topics(settings.kafka_bootstrap_servers, settings.kafka_topic, partitions=2)
    await create_topics(settings.kafka_bootstrap_servers, settings.kafka_dlq_topic)
    return settings.kafka_topic, settings.kafka_dlq_topic


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def store(settings: Settings) -> AsyncIterator[SketchStore]:
    async with open_store(settings) as s:
        yield s
