"""A Redis Cluster over TLS only, with an ACL user (tests/support/managed_redis.py): three
TLS-only masters, the cluster bus over TLS too, so CLUSTER SLOTS names TLS ports. The store and
the API reach every master through ``rediss://``; an untrusted CA is one clear error."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator

import httpx
import pytest
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import SSLConnection

from api.app import create_app
from api.auth import issue_token
from sketches.config import Settings
from sketches.connection import check_store, open_store
from sketches.errors import StoreMisconfigured
from sketches.keys import Scope
from sketches.periods import periods_holding, utc_today
from tests.conftest import unique
from tests.support.managed_redis import APP_PASSWORD, TlsRedisCluster, make_tls_files

pytestmark = pytest.mark.xdist_group("cluster")

SECRET = "cluster-tls-test-secret-of-32-bytes!!"


@pytest.fixture(scope="module")
def tls_cluster() -> Iterator[TlsRedisCluster]:
    files = make_tls_files()
    cluster = TlsRedisCluster(tls=files).start()
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(files.directory, ignore_errors=True)


def on(url: str) -> Settings:
    return Settings(redis_url=url, redis_cluster=True, redis_key_prefix=unique("ct"),
                    sketch_mode="hll", jwt_secret=SECRET, _env_file=None)


async def test_every_master_is_reached_over_tls_as_the_acl_user(
    tls_cluster: TlsRedisCluster,
) -> None:
    settings = on(tls_cluster.url())
    today = utc_today()
    scopes = [Scope("acme", f"ws-{i}") for i in range(12)]  # hash tags over every master
    async with open_store(settings) as store:
        await check_store(store, settings)
        client = store.client
        assert isinstance(client, RedisCluster)
        masters = client.get_primaries()
        assert len(masters) == 3
        assert {n.port for n in masters} == {n.port for n in tls_cluster.nodes}  # TLS ports
        for node in masters:
            assert issubclass(node.connection_class, SSLConnection)
        whoami = await client.execute_command("ACL WHOAMI", target_nodes=RedisCluster.PRIMARIES)
        assert set(whoami.values()) == {"app"}
        slots = {client.keyslot(settings.keyspace.sketch(s, periods_holding(today)[0]))
                 for s in scopes}
        assert {client.nodes_manager.get_node_from_slot(s).port for s in slots} == {
            n.port for n in masters}
        await store.add_by_day(
            {(s, today): [f"u{j}" for j in range(i + 1)] for i, s in enumerate(scopes)},
            dict.fromkeys(scopes, "monday"),
        )
        for i, s in enumerate(scopes):
            assert await store.counts(s, [periods_holding(today)[0]]) == [i + 1]

    app = create_app(settings, store=None)
    token = issue_token(settings, role="admin", org_id="acme", ttl_seconds=600, now=time.time())
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as http:
            got = await http.get("/api/v2/org/acme/workspace/ws-4/metrics/usage"
                                 "?period_length=0&metrics=dau",
                                 headers={"Authorization": f"Bearer {token}"})
    assert got.status_code == 200, got.text
    assert got.json()[-1]["dau"] == 5


async def test_an_untrusted_ca_is_one_clear_error_on_the_cluster(
    tls_cluster: TlsRedisCluster,
) -> None:
    settings = on(tls_cluster.url(ssl_ca_certs=str(tls_cluster.tls.other_ca)))
    async with open_store(settings) as store:
        with pytest.raises(StoreMisconfigured) as refused:
            await check_store(store, settings)
    assert "the server's TLS certificate is not trusted" in str(refused.value)
    assert APP_PASSWORD not in str(refused.value)
