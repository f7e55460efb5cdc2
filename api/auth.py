"""Who may read what: bearer JWTs, roles mapped to permissions by the server, tenants by org.

The algorithm comes from the configuration, never from the token's header: an ``HS256`` secret
accepts only ``HS256``; a PEM public key accepts only the algorithm of its key type (``RS256`` for
RSA, ``ES256`` for P-256). That closes ``alg: none`` and the classic confusion attack (an HS256
token signed with the server's RS256 public key).

Roles never carry permissions themselves: the token says who the caller is, this table says what
that role may do, so a role the table does not know gets nothing.

A token's lifetime is capped by ``JWT_MAX_LIFETIME_SECONDS`` (issue 16): ``exp - iat``, or
``exp - now`` when the token has no ``iat``, may not exceed it. Without the cap one leaked token
with ``exp=10**20`` was a key for ever. The time claims must be JSON numbers: PyJWT reads them
with ``int()``, so ``"exp": "99999999999"`` (a string) used to pass.

``verify`` is total: whatever bytes a caller sends as a token, the answer is a principal or
``Unauthenticated``/``Forbidden``, never another exception, because the rate limiter calls it
before the request is charged (a failure there would be a 500 for free).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Collection, MutableMapping
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from sketches.config import Settings

READ_METRICS = "workspace_metrics:read"
WRITE_SETTINGS = "workspace_settings:write"
# An org's own settings (its timezone and week start) shape every org-level number, not one
# workspace's: a permission of its own, so that a deployment can grant one without the other.
WRITE_ORG_SETTINGS = "org_settings:write"

ROLE_PERMISSIONS: dict[str, frozenset[str]] = {
    "superadmin": frozenset({READ_METRICS, WRITE_SETTINGS, WRITE_ORG_SETTINGS}),
    "admin": frozenset({READ_METRICS, WRITE_SETTINGS, WRITE_ORG_SETTINGS}),
    "controller": frozenset({READ_METRICS}),
    "curator": frozenset({READ_METRICS}),
    "basic": frozenset(),
}
ROLES = tuple(ROLE_PERMISSIONS)


class Unauthenticated(Exception):
    """No usable token: 401."""


class Forbidden(Exception):
    """A valid token that may not do this: 403."""


@dataclass(frozen=True, slots=True)
class Principal:
    subject: str
    role: str
    org_id: str | None

    def require(self, permission: str, org_id: str) -> None:
        self.require_any((permission,), org_id)

    def require_any(self, permissions: Collection[str], org_id: str) -> None:
        """Any one of ``permissions`` will do, in ``org_id`` (any org for a superadmin)."""
        if not ROLE_PERMISSIONS.get(self.role, frozenset()) & set(permissions):
            raise Forbidden(
                f"role {self.role!r} lacks the permission {' or '.join(sorted(permissions))}"
            )
        if self.role == "superadmin":
            return
        if self.org_id is None:
            raise Forbidden("the token names no org_id")
        if self.org_id != org_id:
            raise Forbidden("the token's org may not read another org")


_VERDICT = "usage_metrics.token_verdict"


def caller_of(scope: MutableMapping[str, Any], verifier: TokenVerifier) -> Principal | None:
    """The principal of a request's bearer token, or None without a token that verifies: for
    the middlewares (rate limiter, body limit), which see the raw ASGI scope."""
    for name, value in scope.get("headers", ()):
        if name.lower() != b"authorization":
            continue
        scheme, _, token = value.decode("latin-1").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        try:
            return verify_once(scope, verifier, token.strip())
        except (Unauthenticated, Forbidden):
            return None
    return None


def verify_once(
    scope: MutableMapping[str, Any], verifier: TokenVerifier, token: str
) -> Principal:
    """The token's principal, verified at most once per request.

    The rate limiter (to pick the caller's bucket), the body limit and the routes' dependency
    all need it; a signature check costs more than the rest of a request served from the
    response cache. The verdict, principal or refusal, is kept in the request's ASGI state
    beside the token it is for."""
    state = scope.setdefault("state", {})
    kept: tuple[str, Principal | Exception] | None = state.get(_VERDICT)
    if kept is None or kept[0] != token:
        verdict: Principal | Exception
        try:
            verdict = verifier.verify(token)
        except (Unauthenticated, Forbidden) as err:
            verdict = err
        kept = (token, verdict)
        state[_VERDICT] = kept
    if isinstance(kept[1], Exception):
        raise kept[1]
    return kept[1]


TIME_CLAIMS = ("exp", "iat", "nbf")


def _is_number(value: object) -> bool:
    """A JSON number that can be a NumericDate (RFC 7519, 2): not a string, not a boolean (a
    ``bool`` is an ``int`` to Python), not NaN or infinite."""
    return (
        isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    )


class TokenVerifier:
    def __init__(self, settings: Settings, clock: Callable[[], float] = time.time) -> None:
        self.audience = settings.jwt_audience
        self.issuer = settings.jwt_issuer
        self.leeway = settings.jwt_leeway_seconds
        self.max_lifetime = settings.jwt_max_lifetime_seconds
        self.clock = clock
        self.key: Any = None
        self.algorithm: str | None = None
        if settings.jwt_public_key is not None:
            text = settings.jwt_public_key.get_secret_value().strip()
            if "\n" not in text and "\\n" in text:
                # A PEM squeezed onto one line of an env file or a container spec.
                text = text.replace("\\n", "\n")
            try:
                public = load_pem_public_key(text.encode())
            except ValueError as err:
                raise ValueError("JWT_PUBLIC_KEY is not a PEM public key") from err
            if isinstance(public, rsa.RSAPublicKey):
                self.algorithm = "RS256"
            elif isinstance(public, ec.EllipticCurvePublicKey) and public.curve.name == "secp256r1":
                self.algorithm = "ES256"
            else:
                raise ValueError("JWT_PUBLIC_KEY must be an RSA or P-256 EC public key (PEM)")
            self.key = public
        elif settings.jwt_secret is not None:
            self.algorithm = "HS256"
            self.key = settings.jwt_secret.get_secret_value()

    def verify(self, token: str) -> Principal:
        if self.algorithm is None:
            raise Unauthenticated("the server has no JWT key configured")
        try:
            claims = jwt.decode(
                token,
                self.key,
                algorithms=[self.algorithm],
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway,
                options={
                    "require": ["exp", "sub"],
                    "verify_aud": self.audience is not None,
                    "verify_iss": self.issuer is not None,
                },
            )
        except jwt.PyJWTError as err:
            raise Unauthenticated(f"invalid token: {err}") from err
        except Exception as err:  # any bytes a caller sends get a verdict, never a 500
            raise Unauthenticated("invalid token: malformed") from err
        self._check_lifetime(claims)
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub:
            raise Unauthenticated("invalid token: 'sub' must be a non-empty string")
        role = claims.get("role")
        org = claims.get("org_id")
        if not isinstance(role, str) or role not in ROLE_PERMISSIONS:
            raise Forbidden(f"unknown role {role!r}")
        if org is not None and not isinstance(org, str):
            raise Forbidden("'org_id' must be a string")
        return Principal(subject=sub, role=role, org_id=org)

    def _check_lifetime(self, claims: dict[str, Any]) -> None:
        for name in TIME_CLAIMS:
            if name in claims and not _is_number(claims[name]):
                raise Unauthenticated(f"invalid token: '{name}' must be a number of seconds")
        exp = float(claims["exp"])
        if "iat" in claims:
            lifetime, slack = exp - float(claims["iat"]), 0
        else:  # measured from now, so the issuer's clock may be ahead by the leeway
            lifetime, slack = exp - self.clock(), self.leeway
        if lifetime > self.max_lifetime + slack:
            raise Unauthenticated(
                f"invalid token: lifetime over JWT_MAX_LIFETIME_SECONDS ({self.max_lifetime} s)"
            )


def issue_token(
    settings: Settings,
    *,
    role: str,
    org_id: str | None,
    ttl_seconds: int,
    subject: str = "local-user",
    now: float,
    private_key: str | None = None,
) -> str:
    """A token for local use (``usage-metrics token``, the demo, tests), signed with the
    configured secret, or with ``private_key`` when the server is configured with a public key.

    Refuses (``ValueError``) what the API would refuse: a lifetime over
    ``JWT_MAX_LIFETIME_SECONDS``, or an HS256 token for a server that verifies with
    ``JWT_PUBLIC_KEY`` (it accepts only its key type's algorithm, never ``JWT_SECRET``)."""
    if ttl_seconds > settings.jwt_max_lifetime_seconds:
        raise ValueError(
            f"a lifetime of {ttl_seconds} s is over JWT_MAX_LIFETIME_SECONDS "
            f"({settings.jwt_max_lifetime_seconds} s): the API would refuse the token"
        )
    claims: dict[str, Any] = {
        "sub": subject,
        "role": role,
        "iat": int(now),
        "exp": int(now) + ttl_seconds,
    }
    if org_id is not None:
        claims["org_id"] = org_id
    if settings.jwt_audience:
        claims["aud"] = settings.jwt_audience
    if settings.jwt_issuer:
        claims["iss"] = settings.jwt_issuer
    if private_key is not None:
        verifier = TokenVerifier(settings)
        return jwt.encode(claims, private_key, algorithm=verifier.algorithm or "RS256")
    if settings.jwt_public_key is not None:
        raise ValueError(
            "JWT_PUBLIC_KEY is set, so the API accepts only tokens signed with its private key "
            "(RS256/ES256), never with JWT_SECRET; sign tokens where that key is kept (your "
            "identity provider), or unset JWT_PUBLIC_KEY to use JWT_SECRET"
        )
    if settings.jwt_secret is None:
        raise ValueError("set JWT_SECRET to sign tokens")
    return jwt.encode(claims, settings.jwt_secret.get_secret_value(), algorithm="HS256")
