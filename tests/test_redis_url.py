"""REDIS_URL: a URL redis-py would misread is refused at start-up, and no password is ever shown,
neither in the redacted form the logs carry nor in any error (sketches/redis_url.py)."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import quote

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from pydantic import SecretStr, ValidationError
from redis.asyncio.connection import parse_url

from sketches.config import Settings
from sketches.connection import make_redis
from sketches.errors import StoreMisconfigured
from sketches.redis_url import redact_url, url_problem


def settings_error(url: str, cluster: bool = False) -> str | None:
    """What the settings say about ``url``: the whole text a user sees, or None if accepted."""
    try:
        Settings(redis_url=url, redis_cluster=cluster, _env_file=None)
    except ValidationError as err:
        return str(err)
    return None


def client_error(url: str, cluster: bool = False) -> str:
    """What building a client says about a URL the settings refused, when a caller skipped
    validation (``model_construct``)."""
    unchecked = Settings.model_construct(redis_url=SecretStr(url), redis_cluster=cluster)
    with pytest.raises(StoreMisconfigured) as refused:
        make_redis(unchecked)
    return str(refused.value)


# ------------------------------------------------------------------ the holes of issue 16


@pytest.mark.parametrize(
    ("password", "shown"),
    [
        ("ab#cd", "holds a raw '#'"),
        ("ab/cd", "'@' after its host"),
        ("ab?cd", "'@' after its host"),
        ("12/34", "'@' after its host"),
    ],
)
def test_a_password_holding_a_raw_reserved_character_is_refused_without_showing_it(
    password: str, shown: str
) -> None:
    url = f"redis://app:{password}@cache.internal:6379/0"
    head = password[:2]
    if password[2] != "#" and head.isalpha():
        # The hole: redis-py's own error quotes what it took for the port, part of the password.
        leak = f"Port could not be cast to integer value as '{head}'"
        with pytest.raises(ValueError, match=leak):
            parse_url(url)
    elif password[2] != "#":
        # Worse: a password starting with digits is read as a port, silently.
        assert (parse_url(url)["host"], parse_url(url)["port"]) == ("app", int(head))
    error = settings_error(url)
    assert error is not None
    assert shown in error
    assert "percent-encode" in error
    assert "urllib.parse.quote(password, safe='')" in error
    for part in (password, *re.split(r"[#/?]", password)):
        assert part not in error
        assert part not in client_error(url)
        assert part not in redact_url(url)
    # Percent-encoded, the same password is accepted, and redis-py reads it back exactly.
    encoded = f"redis://app:{quote(password, safe='')}@cache.internal:6379/0"
    assert settings_error(encoded) is None
    assert parse_url(encoded)["password"] == password


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("rediss://cache:6380/0?ssl_cert_reqs=required&ssl_password=k3yp4ss",
         "rediss://cache:6380/0?ssl_cert_reqs=required&ssl_password=***"),
        ("rediss://app:s3cr3t@cache:6380/0?ssl_password=k3yp4ss&ssl_ca_certs=/ca.pem",
         "rediss://app:***@cache:6380/0?ssl_password=***&***"),
        ("redis://app:s3cr#t@cache:6379/0", "redis://***"),
        ("redis://app:s3c/r3t@cache:6379/0", "redis://***"),
        ("redis://app:s3c?r3t@cache:6379/0", "redis://***"),
        ("redis://cache:6379/0?password=s3c&r3t", "redis://cache:6379/0?password=***&***"),
        ("redis://cache:6379/0?password=s3c#r3t", "redis://***"),
        ("unix://app:s3c/r3t@/run/redis.sock", "unix://***"),
        ("redis://app:s3c\nr3t@cache:6379/0", "redis://***"),
        ("redis://app:s3c[r3t@cache:6379/0", "redis://***"),
        ("ftp\n://app:s3cr3t@cache", "***"),
        # Not a name redis-py reads (the settings refuse it), hidden all the same.
        ("redis://cache/0?PassWord=s3cr3t&db=1", "redis://cache/0?PassWord=***&***"),
    ],
)
def test_redaction_holds_for_ssl_password_and_raw_reserved_characters(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    for part in ("s3c", "r3t", "k3yp4ss"):
        assert part not in redact_url(url)


# ------------------------------------------------------------------ the property


def mask(password: str) -> str:
    """The password with every ASCII letter and digit replaced: what may not show through."""
    return "".join("x" if c.isascii() and c.isalnum() else c for c in password)


def encode(password: str) -> str:
    return quote(password, safe="", errors="surrogatepass")


USERINFO_FORMS = [
    lambda p: f"redis://app:{p}@cache.internal:6379/0",
    lambda p: f"redis://:{p}@cache.internal:6379/0",
    lambda p: f"rediss://app:{encode(p)}@cache.internal:6380/0?ssl_cert_reqs=required",
    lambda p: f"unix://app:{p}@/run/redis/redis.sock",
]
QUERY_FORMS = [
    lambda p: f"redis://cache.internal:6379/0?db=0&password={p}",
    lambda p: f"redis://cache.internal:6379/0?password={encode(p)}&socket_timeout=3",
    lambda p: f"rediss://app@cache.internal:6380/0?ssl_cert_reqs=none&ssl_password={p}",
    lambda p: f"unix:///run/redis/redis.sock?password={p}&db=1",
]
# Any character: reserved ones, controls, surrogates, non-ASCII that normalizes to ASCII.
passwords = st.text(st.characters(codec=None, exclude_categories=()), min_size=1, max_size=24)


@given(passwords, st.sampled_from(range(len(USERINFO_FORMS) + len(QUERY_FORMS))), st.booleans())
@example("ab#cd", 0, False)
@example("ab/cd", 0, False)
@example("ab?cd", 0, False)
@example("a&db=1&b", 4, False)
@example("a&ssl_ca_certs=/no/such", 4, False)
@example("k3y&ssl_check_hostname=maybe", 6, False)
@example("p:w@rd", 1, True)
def test_no_password_shows_in_the_redacted_url_or_in_any_error(
    password: str, form: int, cluster: bool
) -> None:
    forms = USERINFO_FORMS + QUERY_FORMS
    build = forms[form]
    url, masked_url = build(password), build(mask(password))

    # The redacted form never depends on the password's letters and digits, and never holds it.
    redacted, redacted_masked = redact_url(url), redact_url(masked_url)
    assert redacted == redacted_masked
    assert password not in redacted or password in redact_url(build(""))

    error, error_masked = settings_error(url, cluster), settings_error(masked_url, cluster)
    if error is not None:
        assert password not in error or password in (error_masked or "")
        assert client_error(url, cluster) == url_problem(url, cluster)
        assert password not in client_error(url, cluster) or password in (error_masked or "")
    if form < len(USERINFO_FORMS):
        # Whether and why a URL is refused depends on the reserved characters alone.
        assert error == error_masked
    elif error is not None and error_masked is not None:
        # A raw '&' in a query secret turns its tail into "parameters": the error still says
        # nothing that depends on them.
        assert error == error_masked


@given(st.text(st.characters(codec="utf-8"), min_size=1, max_size=40))
def test_any_password_percent_encoded_is_accepted_and_read_back_exactly(password: str) -> None:
    forms = (lambda p: f"rediss://app:{p}@cache.internal:6380/0",
             lambda p: f"redis://cache.internal/0?password={p}&db=0",
             lambda p: f"unix://app:{p}@/run/redis.sock")
    for build in forms:
        url = build(quote(password, safe=""))
        assert settings_error(url) is None, url
        assert parse_url(url)["password"] == password
        assert redact_url(url) == redact_url(build("x"))


# ------------------------------------------------------------------ what else is refused


@pytest.mark.parametrize(
    ("url", "cluster", "says"),
    [
        ("http://cache:6379/0", False, "must start with redis:// (TCP), rediss:// (TLS)"),
        # redis-py would cut the password at the '#' (a fragment) and go on with "ab".
        ("redis://cache:6379/0?password=ab#cd", False, "holds a raw '#'"),
        # urllib drops tabs and line breaks silently: the password would lose them.
        ("redis://app:ab\ncd@cache:6379/0", False, "holds a control character"),
        ("redis://app:ab\tcd@cache:6379/0", False, "holds a control character"),
        ("rediss://cache:6379/0?ssl_ca_cert=/ca.pem", False,
         "redis-py's connection does not take 'ssl_ca_cert'"),
        ("redis://cache:6379/0?ssl_ca_certs=/ca.pem", False,
         "TLS parameters ('ssl_ca_certs') but its scheme is not rediss://"),
        # Named before the secret, where it cannot be part of it; not after.
        ("rediss://cache:6379/0?ssl_ca_cert=/ca.pem&password=x", False,
         "does not take 'ssl_ca_cert'"),
        ("rediss://cache:6379/0?password=x&ssl_ca_cert=/ca.pem", False, "none of it is shown"),
        ("rediss://cache:6380/0?ssl_cert_reqs=sometimes", False,
         "ssl_cert_reqs must be none, optional or required"),
        ("redis://cache:6379/0?socket_timeout=soon", False,
         "invalid value for 'socket_timeout'"),
        ("redis://cache:6379/0?db", False, "a query parameter without '='"),
        ("redis://cache:99999/0", False, "port is not a number from 0 to 65535"),
        ("unix:///run/redis.sock", True, "not a unix socket"),
        ("redis://cache:6379/3", True, "database 0 only"),
        ("rediss://cache:6380/0?ssl_password=k", True, "takes no ssl_password"),
        ("rediss://cache:6380/0?ssl_ca_path=/etc/ssl/certs", True,
         "RedisCluster does not take 'ssl_ca_path'"),
        ("rediss://cache:6380/0?password=x&ssl_password=k", True, "none of it is shown"),
        ("rediss://cache:6380/0?ssl_ca_certs=/no/such/ca.pem", False,
         "ssl_ca_certs names no readable file: '/no/such/ca.pem'"),
        ("rediss://cache:6380/0?ssl_keyfile=/no/such/key.pem&ssl_password=k", False,
         "ssl_keyfile names no readable file: '/no/such/key.pem'"),
        ("rediss://cache:6380/0?ssl_password=k&ssl_keyfile=/no/such/key.pem", False,
         "none of it is shown"),
    ],
)
def test_urls_redis_py_cannot_use_are_refused_at_start_up(
    url: str, cluster: bool, says: str
) -> None:
    error = settings_error(url, cluster)
    assert error is not None
    assert says in error, error
    assert client_error(url, cluster) == url_problem(url, cluster)


@pytest.mark.parametrize(
    ("url", "cluster"),
    [
        ("redis://localhost:6379/0", False),
        ("REDISS://app:pw@cache:6380/0?ssl_cert_reqs=none&ssl_check_hostname=false", False),
        ("rediss://cache:6380/0?ssl_ca_path=/etc/ssl/certs&ssl_min_version=771", False),
        ("rediss://app:pw@cache:6380/0?ssl_cert_reqs=optional&socket_timeout=3", True),
        ("unix:///run/redis.sock?db=2&username=app&password=pw&client_name=um", False),
        ("redis://[::1]:6379/0?max_connections=20", False),
    ],
)
def test_urls_redis_py_takes_are_accepted(url: str, cluster: bool) -> None:
    assert settings_error(url, cluster) is None


def test_a_readable_ca_file_is_accepted(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    assert settings_error(f"rediss://cache:6380/0?ssl_ca_certs={ca}") is None
