"""Settings for the cluster tests."""

from __future__ import annotations

from typing import Any

from pydantic import SecretStr

from sketches.config import Settings


def replaced(settings: Settings, **changes: Any) -> Settings:
    """``settings`` with some fields changed, built anew: ``model_copy`` would carry over the
    cached ``keyspace`` of the original (and with it the old key prefix)."""
    values = {**settings.model_dump(), **changes}
    return Settings(**values, _env_file=None)


def on_cluster(settings: Settings, url: str) -> Settings:
    """The same settings, with the store on the Redis Cluster that ``url`` names a node of."""
    return replaced(settings, redis_url=SecretStr(url), redis_cluster=True)
