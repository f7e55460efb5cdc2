"""Settings that protect the service: credentials never in a log line, no weak JWT secret."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sketches.config import Settings, redact_url


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:s3cret@cache:6379/0", "redis://:***@cache:6379/0"),
        ("redis://app:s3cret@cache:6379/0", "redis://app:***@cache:6379/0"),
        ("rediss://app:s3cret@cache/0", "rediss://app:***@cache/0"),
        ("redis://cache:6379/0?password=s3cret", "redis://cache:6379/0?password=***"),
        # What follows a secret in the query is hidden too: a raw '&' in the secret would make
        # its tail look like parameters (tests/test_redis_url.py).
        ("rediss://cache/0?db=1&password=s3cret&ssl_cert_reqs=none",
         "rediss://cache/0?db=1&password=***&***"),
        ("rediss://cache/0?ssl_cert_reqs=none&ssl_password=s3cret",
         "rediss://cache/0?ssl_cert_reqs=none&ssl_password=***"),
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


@pytest.mark.parametrize(("secret", "ok"), [("x" * 31, False), ("x" * 32, True),
                                            ("é" * 16, True), ("", False)])
def test_a_jwt_secret_shorter_than_32_bytes_is_refused(secret: str, ok: bool) -> None:
    if ok:
        assert Settings(jwt_secret=secret, _env_file=None).jwt_secret is not None
    else:
        with pytest.raises(ValueError, match="at least 32 bytes") as refused:
            Settings(jwt_secret=secret, _env_file=None)
        if secret:
            assert secret not in str(refused.value)


def test_every_command_refuses_to_start_with_a_short_secret_and_never_prints_it(
    tmp_path: Path,
) -> None:
    secret = "short-but-secret-" + "q" * 10
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JWT_", "REDIS_", "KAFKA_"))}
    for command in (["token", "--role", "admin", "--org", "acme"], ["api"], ["consume"]):
        done = subprocess.run(
            [sys.executable, "-m", "usage_metrics.cli", *command], cwd=tmp_path,
            env={**env, "JWT_SECRET": secret}, capture_output=True, text=True, timeout=60,
        )
        assert done.returncode == 2, (command, done.stderr[-2000:])
        assert "JWT_SECRET must be at least 32 bytes" in done.stderr
        assert secret not in done.stdout + done.stderr
