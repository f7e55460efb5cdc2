"""``usage-metrics token`` prints only tokens the API accepts, or says clearly why it cannot.

Each case runs the real command in a process of its own, with its settings in the environment
and an empty working directory (no ``.env``), as a person runs it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import SecretStr

from api.auth import TokenVerifier
from sketches.config import Settings

SECRET = "token-command-secret-at-least-32-bytes!"


def run(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("JWT_", "REDIS_", "KAFKA_"))}
    return subprocess.run(
        [sys.executable, "-m", "usage_metrics.cli", "token", *args], cwd=tmp_path,
        env={**base, "JWT_SECRET": SECRET, **env}, capture_output=True, text=True, timeout=60,
    )


def public_pem() -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def test_with_a_public_key_configured_it_refuses_to_sign_with_the_secret(tmp_path: Path) -> None:
    """The API then accepts only ES256/RS256 tokens of its key pair: an HS256 token from
    JWT_SECRET would be refused (401), so none is printed."""
    done = run(tmp_path, "--role", "admin", "--org", "acme", JWT_PUBLIC_KEY=public_pem())
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    assert "JWT_PUBLIC_KEY is set" in done.stderr
    assert "never with JWT_SECRET" in done.stderr
    assert "Traceback" not in done.stderr
    assert SECRET not in done.stderr


def test_a_ttl_over_the_longest_lifetime_is_refused_and_one_within_it_is_accepted(
    tmp_path: Path,
) -> None:
    over = run(tmp_path, "--role", "admin", "--org", "acme", "--ttl", "601",
               JWT_MAX_LIFETIME_SECONDS="600")
    assert over.returncode == 2, over.stderr
    assert over.stdout == ""
    assert "over JWT_MAX_LIFETIME_SECONDS (600 s)" in over.stderr
    assert "Traceback" not in over.stderr
    default_cap = run(tmp_path, "--role", "admin", "--org", "acme", "--ttl", "86401")
    assert default_cap.returncode == 2, default_cap.stderr

    fine = run(tmp_path, "--role", "admin", "--org", "acme", "--ttl", "600",
               JWT_MAX_LIFETIME_SECONDS="600")
    assert fine.returncode == 0, fine.stderr
    settings = Settings(jwt_secret=SecretStr(SECRET), jwt_max_lifetime_seconds=600,
                        _env_file=None)
    principal = TokenVerifier(settings).verify(fine.stdout.strip())
    assert (principal.role, principal.org_id) == ("admin", "acme")


def test_a_ttl_that_is_not_positive_is_refused(tmp_path: Path) -> None:
    done = run(tmp_path, "--role", "admin", "--ttl", "0")
    assert done.returncode == 2
    assert "--ttl must be a positive number of seconds" in done.stderr
