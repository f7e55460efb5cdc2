"""Who may call the usage endpoint (contract §4): bearer JWTs, roles, orgs, and hostile tokens.

Every 200 here checks the seeded numbers, not only the status; every 401/403 checks the JSON body
and that it echoes neither the token nor the secret.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pydantic import SecretStr

from api.app import create_app
from api.auth import issue_token
from sketches.config import Settings
from sketches.keys import Scope
from sketches.periods import day_of, month_of, utc_today, week_of
from sketches.store import SketchStore

OWN = "org-a"
OTHER = "org-b"
WS = "ws-1"
# Seeded straight into each period's sketch so that dau, wau and mau all differ.
NUMBERS = {OWN: (2, 3, 4), OTHER: (5, 6, 7)}


def usage_path(org: str, ws: str = WS) -> str:
    return f"/api/v2/org/{org}/workspace/{ws}/metrics/usage"


# Fixed once per run, so that a test crossing midnight still asks for the day it seeded.
SEED_DAY = utc_today() - timedelta(days=3)


def seed_day() -> date:
    return SEED_DAY


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_json(obj: dict[str, Any]) -> str:
    return b64url(json.dumps(obj, separators=(",", ":")).encode())


def b64url_decode(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def claims(
    role: str = "admin", org_id: str | None = OWN, ttl: int = 600, **extra: Any
) -> dict[str, Any]:
    now = int(time.time())
    out: dict[str, Any] = {"sub": "member_42", "role": role, "iat": now, "exp": now + ttl}
    if org_id is not None:
        out["org_id"] = org_id
    out.update(extra)
    return out


def secret_of(settings: Settings) -> str:
    assert settings.jwt_secret is not None
    return settings.jwt_secret.get_secret_value()


@dataclass(frozen=True)
class KeyPair:
    private_pem: str
    public_pem: str


def _pems(private: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> KeyPair:
    return KeyPair(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode(),
        private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode(),
    )


@pytest.fixture(scope="module")
def rsa_keys() -> KeyPair:
    return _pems(rsa.generate_private_key(public_exponent=65537, key_size=2048))


@pytest.fixture(scope="module")
def ec_keys() -> KeyPair:
    return _pems(ec.generate_private_key(ec.SECP256R1()))


@pytest.fixture
async def seeded(store: SketchStore) -> SketchStore:
    d = seed_day()
    batch: dict[Any, set[str]] = {}
    for org, (dau, wau, mau) in NUMBERS.items():
        ws = Scope(org, WS)
        batch[(ws, day_of(d))] = {f"u{i}" for i in range(dau)}
        batch[(ws, week_of(d))] = {f"u{i}" for i in range(wau)}
        batch[(ws, month_of(d))] = {f"u{i}" for i in range(mau)}
    assert await store.add(batch) == []
    return store


@pytest.fixture
async def call(
    settings: Settings, seeded: SketchStore
) -> AsyncIterator[Callable[..., Any]]:
    """``await call(org, token=None, settings=None, headers=None)``: GET the seeded day."""
    clients: dict[int, httpx.AsyncClient] = {}

    async def _call(
        org: str,
        token: str | None = None,
        app_settings: Settings | None = None,
        headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        s = app_settings or settings
        if id(s) not in clients:
            app = create_app(s, seeded)
            clients[id(s)] = httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://t"
            )
        hdrs = dict(headers or {})
        if token is not None:
            hdrs["Authorization"] = f"Bearer {token}"
        return await clients[id(s)].get(
            usage_path(org),
            params={"end_date": seed_day().isoformat(), "period_length": 0},
            headers=hdrs,
        )

    try:
        yield _call
    finally:
        for c in clients.values():
            await c.aclose()


def assert_numbers(resp: httpx.Response, org: str) -> None:
    assert resp.status_code == 200, resp.text
    dau, wau, mau = NUMBERS[org]
    assert resp.json() == [
        {"date": seed_day().isoformat(), "dau": dau, "wau": wau, "mau": mau}
    ]


def assert_error(resp: httpx.Response, status: int, *secrets: str) -> None:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json()
    assert isinstance(body, dict)
    assert set(body) == {"detail"}
    assert isinstance(body["detail"], str)
    assert body["detail"]
    for s in secrets:
        if s:
            assert s not in resp.text
    assert "Traceback" not in resp.text
    if status == 401:
        assert resp.headers.get("www-authenticate", "").split()[0] == "Bearer"
    else:
        assert "www-authenticate" not in resp.headers


# ---------------------------------------------------------------------------------------------
# The role x org matrix

NO_TOKEN = object()
MATRIX: list[tuple[str | None, str | None, str, int]] = [
    # (role, org_id claim, org requested, expected status)
    ("superadmin", OWN, OWN, 200),
    ("superadmin", OWN, OTHER, 200),
    ("superadmin", None, OTHER, 200),
    ("admin", OWN, OWN, 200),
    ("admin", OWN, OTHER, 403),
    ("controller", OWN, OWN, 200),
    ("controller", OWN, OTHER, 403),
    ("curator", OWN, OWN, 200),
    ("curator", OWN, OTHER, 403),
    ("basic", OWN, OWN, 403),
    ("basic", OWN, OTHER, 403),
    ("owner", OWN, OWN, 403),
    ("owner", OWN, OTHER, 403),
    ("Admin", OWN, OWN, 403),
    ("", OWN, OWN, 403),
    (None, OWN, OWN, 403),  # no role claim at all
    ("admin", None, OWN, 403),
    ("controller", None, OWN, 403),
    ("curator", None, OTHER, 403),
]


@pytest.mark.parametrize(("role", "org_claim", "org", "status"), MATRIX)
async def test_role_and_org_matrix(
    call: Callable[..., Any],
    settings: Settings,
    role: str | None,
    org_claim: str | None,
    org: str,
    status: int,
) -> None:
    c = claims(role="x", org_id=org_claim)
    if role is None:
        del c["role"]
    else:
        c["role"] = role
    token = jwt.encode(c, secret_of(settings), algorithm="HS256")
    resp = await call(org, token)
    if status == 200:
        assert_numbers(resp, org)
    else:
        assert_error(resp, status, token, secret_of(settings))


@pytest.mark.parametrize("role", ["superadmin", "admin", "controller", "curator"])
async def test_issued_tokens_read_own_org(
    call: Callable[..., Any], settings: Settings, role: str
) -> None:
    token = issue_token(settings, role=role, org_id=OWN, ttl_seconds=60, now=time.time())
    assert_numbers(await call(OWN, token), OWN)


@pytest.mark.parametrize("org", [OWN, OTHER])
async def test_no_token_is_401_with_bearer_challenge(
    call: Callable[..., Any], settings: Settings, org: str
) -> None:
    resp = await call(org)
    assert_error(resp, 401, secret_of(settings))


async def test_org_claim_must_be_a_string(call: Callable[..., Any], settings: Settings) -> None:
    for bad in (1, [OWN], {"id": OWN}):
        token = jwt.encode(claims() | {"org_id": bad}, secret_of(settings), algorithm="HS256")
        assert_error(await call(OWN, token), 403, token)


# ---------------------------------------------------------------------------------------------
# Tokens that must be refused with 401


def _alg_none(s: Settings) -> str:
    header = b64url_json({"alg": "none", "typ": "JWT"})
    return f"{header}.{b64url_json(claims(role='superadmin'))}."


def _alg_none_upper(s: Settings) -> str:
    header = b64url_json({"alg": "None", "typ": "JWT"})
    return f"{header}.{b64url_json(claims(role='superadmin'))}."


def _bad_signature(s: Settings) -> str:
    return jwt.encode(claims(), "another-secret-that-is-32-bytes-long!!", algorithm="HS256")


def _truncated_signature(s: Settings) -> str:
    return jwt.encode(claims(), secret_of(s), algorithm="HS256")[:-4]


def _hs512(s: Settings) -> str:
    return jwt.encode(claims(), secret_of(s) * 2, algorithm="HS512")


def _expired(s: Settings) -> str:
    return jwt.encode(claims(ttl=-3600), secret_of(s), algorithm="HS256")


def _no_exp(s: Settings) -> str:
    c = claims()
    del c["exp"]
    return jwt.encode(c, secret_of(s), algorithm="HS256")


def _no_sub(s: Settings) -> str:
    c = claims()
    del c["sub"]
    return jwt.encode(c, secret_of(s), algorithm="HS256")


def _empty_sub(s: Settings) -> str:
    return jwt.encode(claims(sub=""), secret_of(s), algorithm="HS256")


def _numeric_sub(s: Settings) -> str:
    return jwt.encode(claims(sub=42), secret_of(s), algorithm="HS256")


def _exp_not_a_number(s: Settings) -> str:
    return jwt.encode(claims() | {"exp": "tomorrow"}, secret_of(s), algorithm="HS256")


def _exp_a_numeric_string(s: Settings) -> str:
    # PyJWT reads exp with int(): a string of digits used to pass as a date.
    return jwt.encode(claims() | {"exp": str(int(time.time()) + 600)}, secret_of(s), "HS256")


def _exp_far_in_the_future(s: Settings) -> str:
    return jwt.encode(claims() | {"exp": 10**20}, secret_of(s), algorithm="HS256")


def _exp_huge_float(s: Settings) -> str:
    return jwt.encode(claims() | {"exp": 1e308}, secret_of(s), algorithm="HS256")


def _exp_a_list(s: Settings) -> str:
    return jwt.encode(claims() | {"exp": [int(time.time()) + 600]}, secret_of(s), "HS256")


def _iat_a_string(s: Settings) -> str:
    return jwt.encode(claims() | {"iat": str(int(time.time()))}, secret_of(s), "HS256")


def _nbf_a_string(s: Settings) -> str:
    return jwt.encode(claims() | {"nbf": str(int(time.time()))}, secret_of(s), "HS256")


def _lifetime_over_the_cap(s: Settings) -> str:
    return jwt.encode(claims(ttl=s.jwt_max_lifetime_seconds + 1), secret_of(s), "HS256")


def _lifetime_over_the_cap_without_iat(s: Settings) -> str:
    c = claims(ttl=s.jwt_max_lifetime_seconds + s.jwt_leeway_seconds + 60)
    del c["iat"]
    return jwt.encode(c, secret_of(s), algorithm="HS256")


def _issued_long_ago_for_long(s: Settings) -> str:
    # Still 10 minutes to go, but issued for longer than the cap allows.
    now = int(time.time())
    return jwt.encode(claims() | {"iat": now - s.jwt_max_lifetime_seconds, "exp": now + 600},
                      secret_of(s), algorithm="HS256")


def _not_yet_valid(s: Settings) -> str:
    return jwt.encode(
        claims(nbf=int(time.time()) + 3600), secret_of(s), algorithm="HS256"
    )


def _tampered_role(s: Settings) -> str:
    token = jwt.encode(claims(role="basic"), secret_of(s), algorithm="HS256")
    header, payload, signature = token.split(".")
    body = json.loads(b64url_decode(payload))
    body["role"] = "superadmin"
    return f"{header}.{b64url_json(body)}.{signature}"


def _tampered_org(s: Settings) -> str:
    token = jwt.encode(claims(role="admin", org_id=OTHER), secret_of(s), algorithm="HS256")
    header, payload, signature = token.split(".")
    body = json.loads(b64url_decode(payload))
    body["org_id"] = OWN
    return f"{header}.{b64url_json(body)}.{signature}"


def _malformed(s: Settings) -> str:
    return "not-a-jwt"


def _two_segments(s: Settings) -> str:
    return ".".join(jwt.encode(claims(), secret_of(s), algorithm="HS256").split(".")[:2])


def _garbage_segments(s: Settings) -> str:
    return "eyJ!!.@@@.###"


def _payload_not_json(s: Settings) -> str:
    header = b64url_json({"alg": "HS256", "typ": "JWT"})
    payload = b64url(b"[1, 2")
    signing_input = f"{header}.{payload}".encode()
    sig = hmac.new(secret_of(s).encode(), signing_input, hashlib.sha256).digest()
    return f"{header}.{payload}.{b64url(sig)}"


def _payload_a_json_list(s: Settings) -> str:
    header = b64url_json({"alg": "HS256", "typ": "JWT"})
    payload = b64url(b'["sub", "role", "exp"]')
    signing_input = f"{header}.{payload}".encode()
    sig = hmac.new(secret_of(s).encode(), signing_input, hashlib.sha256).digest()
    return f"{header}.{payload}.{b64url(sig)}"


HOSTILE: dict[str, Callable[[Settings], str]] = {
    "alg_none": _alg_none,
    "alg_None": _alg_none_upper,
    "bad_signature": _bad_signature,
    "truncated_signature": _truncated_signature,
    "hs512_not_configured": _hs512,
    "expired": _expired,
    "missing_exp": _no_exp,
    "missing_sub": _no_sub,
    "empty_sub": _empty_sub,
    "numeric_sub": _numeric_sub,
    "exp_not_a_number": _exp_not_a_number,
    "exp_a_numeric_string": _exp_a_numeric_string,
    "exp_far_in_the_future": _exp_far_in_the_future,
    "exp_huge_float": _exp_huge_float,
    "exp_a_list": _exp_a_list,
    "iat_a_string": _iat_a_string,
    "nbf_a_string": _nbf_a_string,
    "lifetime_over_the_cap": _lifetime_over_the_cap,
    "lifetime_over_the_cap_without_iat": _lifetime_over_the_cap_without_iat,
    "issued_long_ago_for_long": _issued_long_ago_for_long,
    "nbf_in_future": _not_yet_valid,
    "tampered_role": _tampered_role,
    "tampered_org": _tampered_org,
    "malformed": _malformed,
    "two_segments": _two_segments,
    "garbage_segments": _garbage_segments,
    "payload_not_json": _payload_not_json,
    "payload_a_json_list": _payload_a_json_list,
}


@pytest.mark.parametrize("make", HOSTILE.values(), ids=HOSTILE.keys())
async def test_hostile_tokens_are_401(
    call: Callable[..., Any], settings: Settings, make: Callable[[Settings], str]
) -> None:
    token = make(settings)
    resp = await call(OWN, token)
    assert_error(resp, 401, token, secret_of(settings))
    # The signature (the part an attacker would want reflected) is never echoed either.
    signature = token.split(".")[-1]
    if len(signature) > 8:
        assert signature not in resp.text


@pytest.mark.parametrize(
    "authorization",
    [
        "Basic dXNlcjpwYXNzd29yZA==",
        "Bearer",
        "Bearer ",
        "Token abc.def.ghi",
        "",
    ],
)
async def test_other_authorization_schemes_are_401(
    call: Callable[..., Any], settings: Settings, authorization: str
) -> None:
    resp = await call(OWN, headers={"Authorization": authorization})
    assert_error(resp, 401, secret_of(settings))


async def test_basic_credentials_carrying_a_valid_jwt_are_still_401(
    call: Callable[..., Any], settings: Settings
) -> None:
    token = issue_token(settings, role="superadmin", org_id=OWN, ttl_seconds=60, now=time.time())
    resp = await call(OWN, headers={"Authorization": f"Basic {token}"})
    assert_error(resp, 401, token)


async def test_bearer_scheme_is_case_insensitive(
    call: Callable[..., Any], settings: Settings
) -> None:
    token = issue_token(settings, role="admin", org_id=OWN, ttl_seconds=60, now=time.time())
    assert_numbers(await call(OWN, headers={"Authorization": f"bearer {token}"}), OWN)


# ---------------------------------------------------------------------------------------------
# Token lifetime (JWT_MAX_LIFETIME_SECONDS)


async def test_a_token_of_exactly_the_longest_lifetime_is_accepted(
    call: Callable[..., Any], settings: Settings
) -> None:
    cap = settings.jwt_max_lifetime_seconds
    with_iat = jwt.encode(claims(ttl=cap), secret_of(settings), algorithm="HS256")
    assert_numbers(await call(OWN, with_iat), OWN)
    without_iat = claims(ttl=cap)
    del without_iat["iat"]
    assert_numbers(await call(OWN, jwt.encode(without_iat, secret_of(settings), "HS256")), OWN)
    floating = jwt.encode(claims() | {"exp": time.time() + 600.5}, secret_of(settings), "HS256")
    assert_numbers(await call(OWN, floating), OWN)  # a NumericDate may have a fraction
    issued = issue_token(settings, role="admin", org_id=OWN, ttl_seconds=cap, now=time.time())
    assert_numbers(await call(OWN, issued), OWN)


async def test_the_longest_lifetime_is_a_setting(
    call: Callable[..., Any], settings: Settings
) -> None:
    short = settings.model_copy(update={"jwt_max_lifetime_seconds": 300})
    token = jwt.encode(claims(ttl=600), secret_of(settings), algorithm="HS256")
    assert_numbers(await call(OWN, token), OWN)
    refused = await call(OWN, token, short)
    assert_error(refused, 401, token)
    assert "JWT_MAX_LIFETIME_SECONDS" in refused.json()["detail"]
    with pytest.raises(ValueError, match="over JWT_MAX_LIFETIME_SECONDS"):
        issue_token(short, role="admin", org_id=OWN, ttl_seconds=600, now=time.time())


# ---------------------------------------------------------------------------------------------
# Clock skew


async def test_expired_within_leeway_is_accepted(
    call: Callable[..., Any], settings: Settings
) -> None:
    s = settings.model_copy(update={"jwt_leeway_seconds": 30})
    token = jwt.encode(claims(ttl=-10), secret_of(s), algorithm="HS256")
    assert_numbers(await call(OWN, token, s), OWN)


async def test_expired_beyond_leeway_is_401(call: Callable[..., Any], settings: Settings) -> None:
    s = settings.model_copy(update={"jwt_leeway_seconds": 30})
    token = jwt.encode(claims(ttl=-120), secret_of(s), algorithm="HS256")
    assert_error(await call(OWN, token, s), 401, token)


async def test_zero_leeway_refuses_a_token_expired_10s_ago(
    call: Callable[..., Any], settings: Settings
) -> None:
    s = settings.model_copy(update={"jwt_leeway_seconds": 0})
    token = jwt.encode(claims(ttl=-10), secret_of(s), algorithm="HS256")
    assert_error(await call(OWN, token, s), 401, token)


async def test_nbf_within_leeway_is_accepted(call: Callable[..., Any], settings: Settings) -> None:
    s = settings.model_copy(update={"jwt_leeway_seconds": 30})
    token = jwt.encode(claims(nbf=int(time.time()) + 10), secret_of(s), algorithm="HS256")
    assert_numbers(await call(OWN, token, s), OWN)


# ---------------------------------------------------------------------------------------------
# Audience and issuer


@pytest.fixture
def aud_iss(settings: Settings) -> Settings:
    return settings.model_copy(
        update={"jwt_audience": "usage-metrics", "jwt_issuer": "https://idp.example"}
    )


async def test_matching_audience_and_issuer_are_accepted(
    call: Callable[..., Any], aud_iss: Settings
) -> None:
    token = jwt.encode(
        claims(aud="usage-metrics", iss="https://idp.example"), secret_of(aud_iss), "HS256"
    )
    assert_numbers(await call(OWN, token, aud_iss), OWN)
    issued = issue_token(aud_iss, role="curator", org_id=OWN, ttl_seconds=60, now=time.time())
    assert_numbers(await call(OWN, issued, aud_iss), OWN)


@pytest.mark.parametrize(
    "extra",
    [
        {"aud": "another-service", "iss": "https://idp.example"},
        {"iss": "https://idp.example"},  # no aud
        {"aud": "usage-metrics", "iss": "https://evil.example"},
        {"aud": "usage-metrics"},  # no iss
        {"aud": ["another-service"], "iss": "https://idp.example"},
    ],
    ids=["wrong_aud", "missing_aud", "wrong_iss", "missing_iss", "wrong_aud_list"],
)
async def test_wrong_or_missing_audience_or_issuer_is_401(
    call: Callable[..., Any], aud_iss: Settings, extra: dict[str, Any]
) -> None:
    token = jwt.encode(claims(**extra), secret_of(aud_iss), algorithm="HS256")
    assert_error(await call(OWN, token, aud_iss), 401, token)


async def test_audience_and_issuer_not_checked_when_not_configured(
    call: Callable[..., Any], settings: Settings
) -> None:
    token = jwt.encode(claims(aud="whatever", iss="whoever"), secret_of(settings), "HS256")
    assert_numbers(await call(OWN, token), OWN)


# ---------------------------------------------------------------------------------------------
# Asymmetric keys: the algorithm is pinned by the configured key, never taken from the token


@pytest.fixture
def rs256(settings: Settings, rsa_keys: KeyPair) -> Settings:
    return settings.model_copy(update={"jwt_public_key": SecretStr(rsa_keys.public_pem)})


@pytest.fixture
def es256(settings: Settings, ec_keys: KeyPair) -> Settings:
    return settings.model_copy(update={"jwt_public_key": SecretStr(ec_keys.public_pem)})


async def test_rs256_configured_accepts_rs256(
    call: Callable[..., Any], rs256: Settings, rsa_keys: KeyPair
) -> None:
    token = jwt.encode(claims(), rsa_keys.private_pem, algorithm="RS256")
    assert_numbers(await call(OWN, token, rs256), OWN)
    issued = issue_token(
        rs256, role="admin", org_id=OWN, ttl_seconds=60, now=time.time(),
        private_key=rsa_keys.private_pem,
    )
    assert jwt.get_unverified_header(issued)["alg"] == "RS256"
    assert_numbers(await call(OWN, issued, rs256), OWN)


async def test_hs256_signed_with_the_rs256_public_key_is_401(
    call: Callable[..., Any], rs256: Settings, rsa_keys: KeyPair
) -> None:
    """The classic confusion attack, crafted by hand (PyJWT refuses to sign it)."""
    header = b64url_json({"alg": "HS256", "typ": "JWT"})
    payload = b64url_json(claims(role="superadmin"))
    signing_input = f"{header}.{payload}".encode()
    for key in (rsa_keys.public_pem, rsa_keys.public_pem.strip()):
        sig = hmac.new(key.encode(), signing_input, hashlib.sha256).digest()
        token = f"{header}.{payload}.{b64url(sig)}"
        assert_error(await call(OWN, token, rs256), 401, token)
        assert_error(await call(OTHER, token, rs256), 401, token)


async def test_hs256_with_the_shared_secret_is_401_when_a_public_key_is_configured(
    call: Callable[..., Any], rs256: Settings
) -> None:
    token = jwt.encode(claims(), secret_of(rs256), algorithm="HS256")
    assert_error(await call(OWN, token, rs256), 401, token)


async def test_rs256_token_is_401_when_hs256_is_configured(
    call: Callable[..., Any], settings: Settings, rsa_keys: KeyPair
) -> None:
    token = jwt.encode(claims(role="superadmin"), rsa_keys.private_pem, algorithm="RS256")
    assert_error(await call(OWN, token, settings), 401, token, secret_of(settings))


async def test_rs256_token_from_another_key_is_401(
    call: Callable[..., Any], rs256: Settings
) -> None:
    other = _pems(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    token = jwt.encode(claims(), other.private_pem, algorithm="RS256")
    assert_error(await call(OWN, token, rs256), 401, token)


async def test_ps256_with_the_right_rsa_key_is_401(
    call: Callable[..., Any], rs256: Settings, rsa_keys: KeyPair
) -> None:
    token = jwt.encode(claims(), rsa_keys.private_pem, algorithm="PS256")
    assert_error(await call(OWN, token, rs256), 401, token)


async def test_es256_configured_accepts_es256(
    call: Callable[..., Any], es256: Settings, ec_keys: KeyPair
) -> None:
    token = jwt.encode(claims(role="controller"), ec_keys.private_pem, algorithm="ES256")
    assert_numbers(await call(OWN, token, es256), OWN)
    issued = issue_token(
        es256, role="curator", org_id=OWN, ttl_seconds=60, now=time.time(),
        private_key=ec_keys.private_pem,
    )
    assert jwt.get_unverified_header(issued)["alg"] == "ES256"
    assert_numbers(await call(OWN, issued, es256), OWN)


async def test_es256_configured_refuses_rs256_and_hs256(
    call: Callable[..., Any], es256: Settings, rsa_keys: KeyPair, ec_keys: KeyPair
) -> None:
    for token in (
        jwt.encode(claims(), rsa_keys.private_pem, algorithm="RS256"),
        jwt.encode(claims(), secret_of(es256), algorithm="HS256"),
    ):
        assert_error(await call(OWN, token, es256), 401, token)
    header = b64url_json({"alg": "HS256", "typ": "JWT"})
    payload = b64url_json(claims(role="superadmin"))
    sig = hmac.new(
        ec_keys.public_pem.encode(), f"{header}.{payload}".encode(), hashlib.sha256
    ).digest()
    forged = f"{header}.{payload}.{b64url(sig)}"
    assert_error(await call(OWN, forged, es256), 401, forged)


async def test_no_key_configured_refuses_everything(
    call: Callable[..., Any], settings: Settings
) -> None:
    s = settings.model_copy(update={"jwt_secret": None, "jwt_public_key": None})
    token = jwt.encode(claims(role="superadmin"), secret_of(settings), algorithm="HS256")
    assert_error(await call(OWN, token, s), 401, token)


async def test_public_key_on_one_line_with_escaped_newlines_works(
    call: Callable[..., Any], settings: Settings, rsa_keys: KeyPair
) -> None:
    one_line = rsa_keys.public_pem.strip().replace("\n", "\\n")
    assert "\n" not in one_line
    s = settings.model_copy(update={"jwt_public_key": SecretStr(one_line)})
    token = jwt.encode(claims(), rsa_keys.private_pem, algorithm="RS256")
    assert_numbers(await call(OWN, token, s), OWN)


def test_unsupported_public_key_is_refused_at_startup(settings: Settings) -> None:
    p384 = _pems(ec.generate_private_key(ec.SECP384R1()))
    with pytest.raises(ValueError, match="JWT_PUBLIC_KEY"):
        create_app(settings.model_copy(update={"jwt_public_key": SecretStr(p384.public_pem)}))
    with pytest.raises(ValueError, match="JWT_PUBLIC_KEY"):
        create_app(settings.model_copy(update={"jwt_public_key": SecretStr("not a pem")}))


async def test_a_token_is_verified_once_per_request_by_the_limiter_body_limit_and_routes(
    settings: Settings, store: SketchStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rate limiter, the body limit and the route's dependency all need the caller; the
    signature is checked once (the verdict rides in the request's state), and a refusal is
    kept just as well."""
    from api.auth import TokenVerifier

    calls: list[str] = []
    real = TokenVerifier.verify

    def counted(self: TokenVerifier, token: str) -> Any:
        calls.append(token)
        return real(self, token)

    monkeypatch.setattr(TokenVerifier, "verify", counted)
    app = create_app(settings.model_copy(update={"rate_limit_per_minute": 600}), store)
    good = issue_token(settings, role="admin", org_id="acme", ttl_seconds=600, now=time.time())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://t") as c:
        ok = await c.get("/api/v2/org/acme/workspace/w/metrics/usage",
                         headers={"Authorization": f"Bearer {good}"})
        assert ok.status_code == 200
        assert calls == [good]
        calls.clear()
        put = await c.put("/api/v2/org/acme/workspace/w/settings", json={"timezone": "UTC"},
                          headers={"Authorization": f"Bearer {good}"})
        assert put.status_code == 200, put.text
        assert calls == [good]  # limiter, body limit and route: one verification
        calls.clear()
        bad = await c.get("/api/v2/org/acme/workspace/w/metrics/usage",
                          headers={"Authorization": "Bearer not.a.token"})
        assert bad.status_code == 401
        assert calls == ["not.a.token"]
