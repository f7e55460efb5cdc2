"""``REDIS_URL``: refusing a URL redis-py would misread, and showing one without its secrets.

redis-py reads the URL with ``urllib.parse``: a password holding a raw ``/``, ``?`` or ``#`` ends
the host part early, so part of the password is taken for the port, the database or a fragment,
and redis-py's own error then prints that part (``Port could not be cast to integer value as
'...'``). A parameter it does not know reaches the connection class as a keyword argument and
fails the first command, long after start-up. Both are configuration errors, so the settings
refuse such a URL at once (``url_problem``), with a message that quotes nothing from the URL but
redis-py's own parameter names (and a file path), and nothing at all of a query parameter that
follows a secret: a raw ``&`` in a password turns its tail into "parameters".

Nothing here opens a connection: the checks parse the URL as redis-py does
(``redis.asyncio.connection.parse_url``) and build, without connecting, the connection object
redis-py would build from it.
"""

from __future__ import annotations

import inspect
import os
import re
from typing import Any
from urllib.parse import unquote_plus, urlsplit

from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import (
    URL_QUERY_ARGUMENT_PARSERS,
    Connection,
    SSLConnection,
    parse_url,
)
from redis.exceptions import RedisError

SCHEMES = ("redis://", "rediss://", "unix://")

# Query parameters whose values are credentials: redis-py's own (``password``, ``ssl_password``,
# the key file's passphrase) and names other clients use, which are hidden in logs all the same.
SECRET_QUERY_KEYS = frozenset({"password", "pass", "pwd", "secret", "token", "ssl_password"})

# Parameters that name files redis-py opens when it first connects (``ssl_ca_path``: a directory).
FILE_PARAMETERS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile")
DIRECTORY_PARAMETERS = ("ssl_ca_path",)

# Keyword arguments of the connection pool itself rather than of each connection.
POOL_PARAMETERS = frozenset({"max_connections"})

PERCENT_ENCODE = (
    "percent-encode reserved characters in the user name, the password and query values "
    "(in Python: urllib.parse.quote(password, safe=''); '/' is %2F, '?' %3F, '#' %23, "
    "'@' %40, '&' %26, '%' %25, '+' %2B)"
)
QUERY_UNREADABLE = (
    "REDIS_URL's query holds a secret (password or ssl_password) followed by a parameter that "
    "redis-py does not take, that has no value or an invalid one, or that names a missing "
    "file; none of it is shown here, in case it is part of that secret: " + PERCENT_ENCODE
)
CERT_REQS = ("none", "optional", "required")

_UNEXPECTED = re.compile(r"unexpected keyword argument '(\w+)'")
_INVALID = re.compile(r"Invalid value for '(\w+)' in connection URL")


def is_secret_name(name: str) -> bool:
    key = unquote_plus(name).strip().lower()
    return key in SECRET_QUERY_KEYS or any(w in key for w in ("password", "secret", "token"))


def _pairs(query: str) -> list[tuple[str, str, str]]:
    return [pair.partition("=") for pair in query.split("&") if pair]


def _split_reliably(url: str) -> bool:
    """Whether ``urlsplit`` finds the user info, host, path and query where the writer meant
    them: no control character (urllib drops tabs and line breaks silently), no ``#`` (a
    fragment is never part of a Redis URL, so one means a raw ``#`` in a secret), and no ``@``
    after the host (the end of a user info whose password holds a raw ``/`` or ``?``)."""
    if any(ord(c) < 32 or ord(c) == 127 for c in url) or "#" in url:
        return False
    try:
        parts = urlsplit(url)
    except ValueError:
        return False
    return "@" not in parts.path and "@" not in parts.query


def redact_url(url: str) -> str:
    """``url`` with every credential replaced by ``***``, whatever the form: a password in the
    user info (``redis://:pw@h``, ``redis://user:pw@h``), user info alone (``redis://pw@h``,
    which some clients read as a password), or a query parameter (``?password=pw``,
    ``?ssl_password=pw``). The query after a secret is hidden too (``&***``): a raw ``&`` in the
    secret would make its tail look like parameters. A URL that cannot be split where its writer
    meant (see ``_split_reliably``) is shown as its scheme alone. The host is kept as written (an
    IPv6 address keeps its brackets)."""
    if not _split_reliably(url):
        scheme, sep, _ = url.partition("://")
        ok = sep and scheme.isascii() and scheme.isalpha() and len(scheme) <= 8
        return f"{scheme}://***" if ok else "***"
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user, colon, _ = userinfo.partition(":")
        netloc = f"{user}:***@{host}" if colon else f"***@{host}"
    pairs = [pair for pair in parts.query.split("&") if pair]
    shown: list[str] = []
    for i, pair in enumerate(pairs):
        name = pair.partition("=")[0]
        if is_secret_name(name):
            shown.append(f"{name}=***")
            if i + 1 < len(pairs):
                shown.append("***")
            break
        shown.append(pair)
    query = "&".join(shown)
    # Rebuilt by hand: urlunsplit would drop the '//' of an empty netloc (unix:///path).
    out = f"{parts.scheme}://{netloc}{parts.path}" if parts.scheme else f"{netloc}{parts.path}"
    return f"{out}?{query}" if query else out


class _Query:
    """The URL's query pairs as the writer may have meant them. A pair after a secret may be
    the secret's own tail (a raw ``&`` in it), so nothing of those is ever named; the pairs
    before the first secret are the writer's parameters and may be."""

    def __init__(self, query: str) -> None:
        self.pairs = _pairs(query)
        self.trusted: list[tuple[str, str, str]] = []
        self.first_secret: str | None = None
        for name, sep, value in self.pairs:
            if is_secret_name(name):
                self.first_secret = unquote_plus(name).strip().lower()
                break
            self.trusted.append((unquote_plus(name), sep, value))
        self.trusted_names = frozenset(name for name, _, _ in self.trusted)

    def may_name(self, *names: str) -> bool:
        return self.first_secret is None or all(n in self.trusted_names for n in names)


def url_problem(url: str, cluster: bool = False) -> str | None:
    """Why redis-py could not use ``url`` as written (``cluster``: with ``RedisCluster``), in a
    sentence that shows nothing of the URL but redis-py's parameter names (and a file path
    given before any secret); ``None`` if it can.

    Checked in the order the damage of a raw reserved character shows: control characters,
    scheme, ``#``, the split, ``@`` after the host, the port; then the query as redis-py parses
    it, and the connection (or cluster client) redis-py would build from it, without connecting.
    """
    if any(ord(c) < 32 or ord(c) == 127 for c in url):
        return "REDIS_URL holds a control character (a tab or a line break?): " + PERCENT_ENCODE
    try:
        url.encode()
    except UnicodeEncodeError:
        return "REDIS_URL holds bytes that are not UTF-8 (a lone surrogate): " + PERCENT_ENCODE
    if not url.lower().startswith(SCHEMES):
        return ("REDIS_URL must start with redis:// (TCP), rediss:// (TLS) or unix:// "
                "(a socket)")
    if "#" in url:
        return "REDIS_URL holds a raw '#', which would cut it short: " + PERCENT_ENCODE
    try:
        parts = urlsplit(url)
    except ValueError:
        return ("REDIS_URL cannot be split into user, host and port (a raw '[' or ']', or a "
                "character that normalizes to a reserved one?): " + PERCENT_ENCODE)
    if "@" in parts.path or "@" in parts.query:
        return ("REDIS_URL has an '@' after its host: the password (or user name) holds a raw "
                "'/' or '?', or a socket path or query value holds an '@': " + PERCENT_ENCODE)
    try:
        parts.port  # noqa: B018 - urllib parses the port when it is read
    except ValueError:
        return ("REDIS_URL's port is not a number from 0 to 65535 (a password holding a raw "
                "reserved character?): " + PERCENT_ENCODE)
    query = _Query(parts.query)
    if any(not sep for _, sep, _ in query.trusted):
        return "REDIS_URL has a query parameter without '=': " + PERCENT_ENCODE
    if any(not sep for _, sep, _ in query.pairs):
        return QUERY_UNREADABLE
    try:
        kwargs: dict[str, Any] = dict(parse_url(url))
    except ValueError as err:
        m = _INVALID.search(str(err))
        if m is None or m.group(1) not in URL_QUERY_ARGUMENT_PARSERS:
            unread = "REDIS_URL cannot be read by redis-py"
            return QUERY_UNREADABLE if query.first_secret else unread
        if not query.may_name(m.group(1)):
            return QUERY_UNREADABLE
        return f"REDIS_URL has an invalid value for {m.group(1)!r}"
    cert_reqs = kwargs.get("ssl_cert_reqs")
    if cert_reqs is not None and cert_reqs not in CERT_REQS:
        if not query.may_name("ssl_cert_reqs"):
            return QUERY_UNREADABLE
        return "REDIS_URL's ssl_cert_reqs must be none, optional or required"
    problem = _cluster_problem(kwargs, query) if cluster else _single_problem(kwargs, query)
    return problem or _files_problem(kwargs, query)


def _unknown(names: list[str], kwargs: dict[str, Any], query: _Query, where: str) -> str:
    if not names or not query.may_name(*names):
        return QUERY_UNREADABLE
    named = ", ".join(repr(n) for n in names)
    tls = kwargs.get("connection_class") is SSLConnection
    if all(n.startswith("ssl_") for n in names) and not tls:
        return f"REDIS_URL has TLS parameters ({named}) but its scheme is not rediss://"
    return (f"{where} does not take {named} (redis-py's from_url takes ssl_ca_certs, "
            "ssl_certfile, ssl_keyfile, ssl_cert_reqs, ssl_check_hostname, ssl_password, "
            "socket_timeout, db, ...)")


def _single_problem(kwargs: dict[str, Any], query: _Query) -> str | None:
    """The connection redis-py's pool would make from these arguments, made and dropped (no
    socket is opened): an argument its class does not take fails here, not at the first
    command."""
    conn_kwargs = {k: v for k, v in kwargs.items() if k not in POOL_PARAMETERS}
    connection_class = conn_kwargs.pop("connection_class", Connection)
    try:
        connection_class(**conn_kwargs)
    except TypeError as err:
        m = _UNEXPECTED.search(str(err))
        return _unknown([m.group(1)] if m else [], kwargs, query, "redis-py's connection")
    except (RedisError, ValueError):
        if query.first_secret:
            return QUERY_UNREADABLE
        return "REDIS_URL has a parameter of an invalid value"
    return None


def _cluster_problem(kwargs: dict[str, Any], query: _Query) -> str | None:
    """``RedisCluster.from_url`` passes the URL's arguments to ``RedisCluster`` itself, whose
    signature has no catch-all: check them against it."""
    if "path" in kwargs:
        return ("REDIS_CLUSTER=true: a Redis Cluster is reached over redis:// or rediss://, "
                "not a unix socket")
    if kwargs.get("db"):
        return "REDIS_CLUSTER=true: a Redis Cluster has database 0 only (REDIS_URL's path)"
    if "ssl_password" in kwargs:
        if query.first_secret != "ssl_password":
            return QUERY_UNREADABLE
        return ("REDIS_CLUSTER=true: redis-py's RedisCluster takes no ssl_password: give the "
                "client key decrypted, in a file readable by this user only")
    args = dict(kwargs)
    if args.pop("connection_class", None) is SSLConnection:
        args["ssl"] = True
    accepted = inspect.signature(RedisCluster.__init__).parameters
    unknown = sorted(set(args) - set(accepted))
    if unknown:
        return _unknown(unknown, kwargs, query, "REDIS_CLUSTER=true: redis-py's RedisCluster")
    return None


def _files_problem(kwargs: dict[str, Any], query: _Query) -> str | None:
    for name in FILE_PARAMETERS + DIRECTORY_PARAMETERS:
        path = kwargs.get(name)
        if path is None:
            continue
        ok = os.path.isdir(path) if name in DIRECTORY_PARAMETERS else os.path.isfile(path)
        if not ok or not os.access(path, os.R_OK):
            if not query.may_name(name):
                return QUERY_UNREADABLE
            kind = "directory" if name in DIRECTORY_PARAMETERS else "file"
            return f"REDIS_URL's {name} names no readable {kind}: {path!r}"
    return None
