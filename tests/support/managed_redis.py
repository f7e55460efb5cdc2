"""Redis as managed providers serve it: TLS only, with an ACL user; or a unix socket only.

Real ``redis-server`` processes (Debian's build has TLS), never fakes:

- ``TlsRedisServer``: ``--port 0 --tls-port P``, so nothing but TLS is accepted, and client
  certificates required (``--tls-auth-clients yes``, as some providers offer), so that the
  URL's ``ssl_certfile``, ``ssl_keyfile`` and ``ssl_password`` are exercised too.
- ``UnixRedisServer``: ``--port 0 --unixsocket PATH``.
- ``TlsRedisCluster``: three TLS-only masters, ``--tls-cluster yes``: ``CLUSTER SLOTS`` names
  the TLS ports, and the bus is encrypted too.

Each has an admin password for set-up (``requirepass``) and an ACL user, ``app``, whose password
holds every character a URL reserves, so that the tests' URLs must percent-encode it as a user
would. The certificates are made here with ``cryptography``: a CA, a server certificate that
names ``localhost`` and ``127.0.0.1`` (the server listens on ``127.0.0.2`` too, a host name
mismatch), a client
certificate whose key is encrypted, and a second CA that signed none of them.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import redis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.support.servers import RedisServer, free_port

ADMIN_PASSWORD = "admin-password-for-set-up"
APP_USER = "app"
# Every character a URL reserves, a space, a percent sign and a non-ASCII letter.
APP_PASSWORD = "p@ss/w#rd?&=+:% é[]"
KEY_PASSWORD = "client-key-passphrase"


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey, password: str | None = None) -> None:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password.encode()) if password
        else serialization.NoEncryption()
    )
    path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    ))
    path.chmod(0o600)


def _cert(
    subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name,
    issuer_key: ec.EllipticCurvePrivateKey, *, ca: bool, usage: list[x509.ObjectIdentifier],
    names: list[x509.GeneralName] | None = None,
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(digital_signature=True, content_commitment=False,
                          key_encipherment=False, data_encipherment=False, key_agreement=False,
                          key_cert_sign=True, crl_sign=True, encipher_only=False,
                          decipher_only=False),
            critical=True,
        ).add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
        )
    else:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
    if usage:
        builder = builder.add_extension(x509.ExtendedKeyUsage(usage), critical=False)
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


@dataclass
class TlsFiles:
    """PEM files of one test PKI."""

    directory: Path
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path  # encrypted with KEY_PASSWORD
    other_ca: Path  # a CA that signed nothing here

    @classmethod
    def make(cls, directory: Path) -> TlsFiles:
        directory.mkdir(parents=True, exist_ok=True)
        ca_key = _key()
        ca = _cert("usage-metrics test CA", ca_key, _name("usage-metrics test CA"), ca_key,
                   ca=True, usage=[])
        server_key, client_key, other_key = _key(), _key(), _key()
        # The server's certificate is its client certificate on the cluster bus, too. It names
        # localhost and 127.0.0.1 (where cluster nodes are found), not 127.0.0.2.
        server = _cert("localhost", server_key, ca.subject, ca_key, ca=False,
                       usage=[ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
                       names=[x509.DNSName("localhost"),
                              x509.IPAddress(ipaddress.IPv4Address("127.0.0.1"))])
        client = _cert(APP_USER, client_key, ca.subject, ca_key, ca=False,
                       usage=[ExtendedKeyUsageOID.CLIENT_AUTH])
        other = _cert("another CA", other_key, _name("another CA"), other_key, ca=True,
                      usage=[])
        files = cls(
            directory=directory, ca=directory / "ca.pem",
            server_cert=directory / "server.pem", server_key=directory / "server.key",
            client_cert=directory / "client.pem", client_key=directory / "client.key",
            other_ca=directory / "other-ca.pem",
        )
        for path, cert in ((files.ca, ca), (files.server_cert, server),
                           (files.client_cert, client), (files.other_ca, other)):
            path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(files.server_key, server_key)
        _write_key(files.client_key, client_key, KEY_PASSWORD)
        return files


def add_app_user(client: redis.Redis) -> None:
    """``app`` with every permission, set with ACL SETUSER: its password is one argument there,
    where a configuration line would split it at the space."""
    client.execute_command("ACL", "SETUSER", APP_USER, "reset", "on", f">{APP_PASSWORD}",
                           "~*", "&*", "+@all")


def app_userinfo() -> str:
    return f"{APP_USER}:{quote(APP_PASSWORD, safe='')}"


@dataclass
class TlsRedisServer(RedisServer):
    """TLS only (``--port 0``), client certificates required."""

    tls: TlsFiles | None = None
    extra_listen: list[str] = field(default_factory=list)

    @property
    def files(self) -> TlsFiles:
        assert self.tls is not None
        return self.tls

    def listen_args(self) -> list[str]:
        f = self.files
        return [
            "--port", "0", "--tls-port", str(self.port), "--bind", "127.0.0.1", "127.0.0.2",
            "--tls-cert-file", str(f.server_cert), "--tls-key-file", str(f.server_key),
            "--tls-ca-cert-file", str(f.ca), "--tls-auth-clients", "yes",
            "--requirepass", ADMIN_PASSWORD, *self.extra_listen,
        ]

    def admin_client(self, timeout: float = 0.2) -> redis.Redis:
        f = self.files
        return redis.Redis(
            host="localhost", port=self.port, password=ADMIN_PASSWORD, ssl=True,
            ssl_ca_certs=str(f.ca), ssl_certfile=str(f.client_cert),
            ssl_keyfile=str(f.client_key), ssl_password=KEY_PASSWORD,
            socket_connect_timeout=timeout,
        )

    def start(self) -> TlsRedisServer:
        super().start()
        with self.admin_client(2.0) as admin:
            add_app_user(admin)
        return self

    def app_url(self, *, host: str = "localhost", ca: Path | None = None,
                userinfo: str | None = None, **params: str) -> str:
        """``rediss://app:<encoded>@localhost:P/0?ssl_ca_certs=...&ssl_certfile=...``: every
        TLS parameter a client certificate needs, and any others given."""
        f = self.files
        query = {
            "ssl_ca_certs": str(ca or f.ca), "ssl_certfile": str(f.client_cert),
            "ssl_keyfile": str(f.client_key), "ssl_password": KEY_PASSWORD, **params,
        }
        qs = "&".join(f"{k}={quote(v, safe='/')}" for k, v in query.items() if v != "")
        who = app_userinfo() if userinfo is None else userinfo
        return f"rediss://{who}@{host}:{self.port}/0?{qs}"


@dataclass
class UnixRedisServer(RedisServer):
    """A unix socket only (``--port 0``)."""

    @property
    def socket(self) -> Path:
        return self.directory / "redis.sock"

    def listen_args(self) -> list[str]:
        return ["--port", "0", "--unixsocket", str(self.socket), "--unixsocketperm", "700",
                "--requirepass", ADMIN_PASSWORD]

    def admin_client(self, timeout: float = 0.2) -> redis.Redis:
        return redis.Redis(unix_socket_path=str(self.socket), password=ADMIN_PASSWORD,
                           socket_connect_timeout=timeout)

    def start(self) -> UnixRedisServer:
        super().start()
        with self.admin_client(2.0) as admin:
            add_app_user(admin)
        return self

    def app_url(self, form: str = "userinfo") -> str:
        """``unix://app:<encoded>@/dir/redis.sock`` (``userinfo``), or the user and password
        in the query (``query``: ``?username=app&password=<encoded>``)."""
        if form == "userinfo":
            return f"unix://{app_userinfo()}@{self.socket}"
        return (f"unix://{self.socket}?db=0&username={APP_USER}"
                f"&password={quote(APP_PASSWORD, safe='')}")


def redis_cli_bin() -> str:
    path = shutil.which("redis-cli")
    if path is None:
        raise RuntimeError("redis-cli is not installed; `make test` installs redis (apt-get)")
    return path


@dataclass
class TlsRedisCluster:
    """Three TLS-only masters, no replicas; the cluster bus over TLS as well."""

    tls: TlsFiles
    masters: int = 3
    nodes: list[TlsRedisServer] = field(default_factory=list)

    def start(self) -> TlsRedisCluster:
        self.nodes = []
        for _ in range(self.masters):
            node = TlsRedisServer(tls=self.tls)
            node.extra_listen = [
                "--tls-cluster", "yes", "--cluster-enabled", "yes",
                "--cluster-config-file", str(node.directory / "nodes.conf"),
                "--cluster-node-timeout", "3000", "--cluster-port", str(free_port()),
            ]
            self.nodes.append(node)
        try:
            for node in self.nodes:
                node.start()
            f = self.tls
            out = subprocess.run(
                [redis_cli_bin(), "--tls", "--cacert", str(f.ca), "--cert", str(f.client_cert),
                 "--key", str(self._plain_client_key()), "--no-auth-warning",
                 "-a", ADMIN_PASSWORD, "--cluster", "create",
                 *(f"127.0.0.1:{n.port}" for n in self.nodes),
                 "--cluster-replicas", "0", "--cluster-yes"],
                capture_output=True, text=True, timeout=30, check=False,
            )
            if out.returncode != 0:
                raise RuntimeError(f"redis-cli --cluster create failed:\n{out.stdout}{out.stderr}")
            self.wait_ok()
        except BaseException:
            self.stop()
            raise
        return self

    def _plain_client_key(self) -> Path:
        """redis-cli cannot read an encrypted key: the same key, decrypted, for set-up only."""
        path = self.tls.directory / "client-plain.key"
        if not path.exists():
            key = serialization.load_pem_private_key(
                self.tls.client_key.read_bytes(), KEY_PASSWORD.encode()
            )
            assert isinstance(key, ec.EllipticCurvePrivateKey)
            _write_key(path, key)
        return path

    def wait_ok(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            try:
                states = []
                for node in self.nodes:
                    with node.admin_client(2.0) as c:
                        states.append(c.execute_command("CLUSTER INFO").get("cluster_state"))
                if all(s == "ok" for s in states):
                    return
                last = f"states {states}"
            except redis.exceptions.RedisError as err:
                last = str(err)
            time.sleep(0.1)
        raise TimeoutError(f"TLS Redis Cluster not ok after {timeout}s: {last}")

    def url(self, **params: str) -> str:
        """A node's URL: RedisCluster takes no ``ssl_password``, so the decrypted key."""
        node = self.nodes[0]
        return node.app_url(ssl_keyfile=str(self._plain_client_key()), ssl_password="",
                            **params)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
            shutil.rmtree(node.directory, ignore_errors=True)


def make_tls_files() -> TlsFiles:
    return TlsFiles.make(Path(tempfile.mkdtemp(prefix="um-tls-")))
