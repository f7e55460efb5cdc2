"""Settings that protect the service: credentials never in a log line."""

from __future__ import annotations

import pytest

from usage_metrics.config import Settings, redact_url


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:s3cret@cache:6379/0", "redis://:***@cache:6379/0"),
        ("redis://app:s3cret@cache:6379/0", "redis://app:***@cache:6379/0"),
        ("rediss://app:s3cret@cache/0", "rediss://app:***@cache/0"),
        ("redis://cache:6379/0?password=s3cret", "redis://cache:6379/0?password=***"),
        ("redis://cache/0?db=1&PassWord=s3cret&ssl_cert_reqs=none",
         "redis://cache/0?db=1&PassWord=***&ssl_cert_reqs=none"),
        ("redis://cache/0?pass%77ord=s3cret", "redis://cache/0?pass%77ord=***"),
        ("unix:///run/redis.sock?db=0&password=s3cret", "unix:///run/redis.sock?db=0&password=***"),
        ("redis://s3cret@cache:6379/0", "redis://***@cache:6379/0"),
        ("redis://app:s3cret@[::1]:6379/0", "redis://app:***@[::1]:6379/0"),
        ("redis://app:s3cr@t@cache:6379/0", "redis://app:***@cache:6379/0"),
        ("redis://cache:6379/0", "redis://cache:6379/0"),
    ],
)
def test_redis_credentials_are_redacted_in_every_url_form(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    assert "s3cr" not in redact_url(url)
    settings = Settings(redis_url=url, _env_file=None)
    assert settings.redis_url_redacted() == shown
    assert "s3cr" not in repr(settings)
