"""Kafka security settings (issue 16): what is refused at start-up, and what every client gets.

No server here: the connections themselves are tested against Tansu (and a TLS proxy) in
tests/test_kafka_security.py. The accepted SASL paths (PLAIN, SCRAM) are tested here against
the arguments aiokafka's clients receive, because no user can be created on the test broker
(see tests/support/kafka_security.py).
"""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from consumer.kafka import (
    kafka_client_args,
    make_admin_client,
    make_dlq_producer,
    make_kafka_consumer,
    make_producer,
)
from sketches.config import Settings, kafka_key_password
from tests.support.kafka_security import CLIENT_KEY_PASSWORD, Pki

PASSWORD = "pw-Sup3r-s3cret-value"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki.create(tmp_path_factory.mktemp("pki"))


def kafka(**kw: Any) -> Settings:
    return Settings(_env_file=None, **kw)


def sasl(protocol: str = "SASL_SSL", mechanism: str = "SCRAM-SHA-512", **kw: Any) -> Settings:
    return kafka(kafka_security_protocol=protocol, kafka_sasl_mechanism=mechanism,
                 kafka_sasl_username="svc-usage", kafka_sasl_password=PASSWORD, **kw)


# Each: settings that must be refused, and what the refusal must name.
REFUSED: dict[str, tuple[Callable[[Pki], dict[str, Any]], list[str]]] = {
    "sasl without anything": (
        lambda p: {"kafka_security_protocol": "SASL_SSL"},
        ["KAFKA_SECURITY_PROTOCOL=SASL_SSL needs", "KAFKA_SASL_MECHANISM",
         "KAFKA_SASL_USERNAME", "KAFKA_SASL_PASSWORD"],
    ),
    "sasl without password": (
        lambda p: {"kafka_security_protocol": "SASL_PLAINTEXT",
                   "kafka_sasl_mechanism": "PLAIN", "kafka_sasl_username": "u"},
        ["needs KAFKA_SASL_PASSWORD"],
    ),
    "sasl with an empty password": (
        lambda p: {"kafka_security_protocol": "SASL_PLAINTEXT", "kafka_sasl_mechanism": "PLAIN",
                   "kafka_sasl_username": "u", "kafka_sasl_password": ""},
        ["needs KAFKA_SASL_PASSWORD"],
    ),
    "sasl with an empty username": (
        lambda p: {"kafka_security_protocol": "SASL_SSL", "kafka_sasl_mechanism": "PLAIN",
                   "kafka_sasl_username": "", "kafka_sasl_password": PASSWORD},
        ["needs KAFKA_SASL_USERNAME"],
    ),
    "sasl without mechanism": (
        lambda p: {"kafka_security_protocol": "SASL_SSL", "kafka_sasl_username": "u",
                   "kafka_sasl_password": PASSWORD},
        ["needs KAFKA_SASL_MECHANISM"],
    ),
    "credentials that SSL ignores": (
        lambda p: {"kafka_security_protocol": "SSL", "kafka_sasl_mechanism": "PLAIN",
                   "kafka_sasl_username": "u", "kafka_sasl_password": PASSWORD},
        ["KAFKA_SASL_MECHANISM, KAFKA_SASL_USERNAME, KAFKA_SASL_PASSWORD set but "
         "KAFKA_SECURITY_PROTOCOL=SSL does not use SASL (use SASL_SSL)"],
    ),
    "a password that PLAINTEXT ignores": (
        lambda p: {"kafka_sasl_password": PASSWORD},
        ["KAFKA_SASL_PASSWORD set but KAFKA_SECURITY_PROTOCOL=PLAINTEXT does not use SASL"],
    ),
    "a CA that PLAINTEXT ignores": (
        lambda p: {"kafka_ssl_cafile": p.ca},
        ["KAFKA_SSL_CAFILE set but KAFKA_SECURITY_PROTOCOL=PLAINTEXT does not use TLS"],
    ),
    "a CA that SASL_PLAINTEXT ignores": (
        lambda p: {"kafka_security_protocol": "SASL_PLAINTEXT", "kafka_sasl_mechanism": "PLAIN",
                   "kafka_sasl_username": "u", "kafka_sasl_password": PASSWORD,
                   "kafka_ssl_cafile": p.ca},
        ["KAFKA_SSL_CAFILE set but KAFKA_SECURITY_PROTOCOL=SASL_PLAINTEXT does not use TLS "
         "(use SASL_SSL)"],
    ),
    "a key password that PLAINTEXT ignores": (
        lambda p: {"kafka_ssl_key_password": "x"},
        ["KAFKA_SSL_KEY_PASSWORD set but"],
    ),
    "a key without its certificate": (
        lambda p: {"kafka_security_protocol": "SSL", "kafka_ssl_keyfile": p.client_key},
        ["KAFKA_SSL_KEYFILE needs KAFKA_SSL_CERTFILE"],
    ),
    "a key password without a certificate": (
        lambda p: {"kafka_security_protocol": "SSL", "kafka_ssl_key_password": "x"},
        ["KAFKA_SSL_KEY_PASSWORD needs KAFKA_SSL_CERTFILE"],
    ),
    "a CA file that does not exist": (
        lambda p: {"kafka_security_protocol": "SSL", "kafka_ssl_cafile": p.directory / "nope"},
        ["kafka_ssl_cafile", "no such file", "nope"],
    ),
    "a certificate file that does not exist": (
        lambda p: {"kafka_security_protocol": "SSL", "kafka_ssl_certfile": p.directory / "no"},
        ["kafka_ssl_certfile", "no such file"],
    ),
    "a key file that is a directory": (
        lambda p: {"kafka_security_protocol": "SSL", "kafka_ssl_certfile": p.client_cert,
                   "kafka_ssl_keyfile": p.directory},
        ["kafka_ssl_keyfile", "no such file"],
    ),
    "a CA file that is not PEM": (
        lambda p: {"kafka_security_protocol": "SSL", "kafka_ssl_cafile": p.client_key},
        ["KAFKA_SSL_CAFILE holds no PEM CA certificate"],
    ),
    "a key of another certificate": (
        lambda p: {"kafka_security_protocol": "SSL", "kafka_ssl_certfile": p.client_cert,
                   "kafka_ssl_keyfile": p.rogue_client_key},
        ["KAFKA_SSL_CERTFILE", "KAFKA_SSL_KEYFILE", "do not load"],
    ),
    "an encrypted key without its password": (
        lambda p: {"kafka_security_protocol": "SSL", "kafka_ssl_certfile": p.client_cert,
                   "kafka_ssl_keyfile": p.client_key},
        ["do not load", "KAFKA_SSL_KEY_PASSWORD"],
    ),
    "an encrypted key with a wrong password": (
        lambda p: {"kafka_security_protocol": "SSL", "kafka_ssl_certfile": p.client_cert,
                   "kafka_ssl_keyfile": p.client_key, "kafka_ssl_key_password": PASSWORD},
        ["do not load", "KAFKA_SSL_KEY_PASSWORD"],
    ),
    "a certificate without a key": (
        lambda p: {"kafka_security_protocol": "SSL", "kafka_ssl_certfile": p.client_cert},
        ["KAFKA_SSL_CERTFILE", "the key in", "do not load"],
    ),
    "an unknown protocol": (
        lambda p: {"kafka_security_protocol": "TLS"},
        ["kafka_security_protocol"],
    ),
    "an unsupported mechanism": (
        lambda p: {"kafka_security_protocol": "SASL_SSL", "kafka_sasl_mechanism": "GSSAPI",
                   "kafka_sasl_username": "u", "kafka_sasl_password": PASSWORD},
        ["kafka_sasl_mechanism"],
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_inconsistent_or_unusable_kafka_security_is_refused_naming_the_settings(
    pki: Pki, case: str
) -> None:
    make, expected = REFUSED[case]
    with pytest.raises(ValidationError) as refused:
        kafka(**make(pki))
    text = str(refused.value)
    for fragment in expected:
        assert fragment in text, text
    assert PASSWORD not in text
    assert CLIENT_KEY_PASSWORD not in text


def test_an_unset_key_password_is_empty_never_none_so_openssl_cannot_prompt(pki: Pki) -> None:
    # With None, OpenSSL would ask for an encrypted key's password on the terminal.
    assert kafka_key_password(kafka()) == ""
    settings = kafka(kafka_security_protocol="SSL", kafka_ssl_certfile=pki.client_cert,
                     kafka_ssl_keyfile=pki.client_key, kafka_ssl_key_password=CLIENT_KEY_PASSWORD)
    assert kafka_key_password(settings) == CLIENT_KEY_PASSWORD


def ca_subjects(context: ssl.SSLContext) -> list[str]:
    return [dict(rdn[0] for rdn in c["subject"]).get("commonName", "")
            for c in context.get_ca_certs()]


def test_provider_shaped_settings_give_aiokafka_what_each_needs(pki: Pki) -> None:
    plain = kafka_client_args(kafka(kafka_bootstrap_servers="k:9092"))
    assert plain == {"bootstrap_servers": "k:9092", "security_protocol": "PLAINTEXT"}

    # Confluent Cloud: SASL_SSL + PLAIN with an API key and secret, the system trust store.
    confluent = kafka_client_args(sasl(mechanism="PLAIN"))
    assert confluent["security_protocol"] == "SASL_SSL"
    assert confluent["sasl_mechanism"] == "PLAIN"
    assert confluent["sasl_plain_username"] == "svc-usage"
    assert confluent["sasl_plain_password"] == PASSWORD
    context = confluent["ssl_context"]
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname
    assert "usage-metrics test CA" not in ca_subjects(context)

    # MSK / Redpanda Cloud: SASL_SSL + SCRAM; Aiven's SCRAM with its own CA.
    for mechanism in ("SCRAM-SHA-512", "SCRAM-SHA-256"):
        args = kafka_client_args(sasl(mechanism=mechanism, kafka_ssl_cafile=pki.ca))
        assert args["sasl_mechanism"] == mechanism
        assert args["sasl_plain_password"] == PASSWORD
        assert ca_subjects(args["ssl_context"]) == ["usage-metrics test CA"]

    # SASL_PLAINTEXT: credentials, no TLS.
    args = kafka_client_args(sasl(protocol="SASL_PLAINTEXT", mechanism="SCRAM-SHA-256"))
    assert "ssl_context" not in args
    assert args["sasl_mechanism"] == "SCRAM-SHA-256"

    # Aiven with client certificates: SSL, its CA, a certificate and an encrypted key.
    args = kafka_client_args(kafka(
        kafka_security_protocol="SSL", kafka_ssl_cafile=pki.ca, kafka_ssl_certfile=pki.client_cert,
        kafka_ssl_keyfile=pki.client_key, kafka_ssl_key_password=CLIENT_KEY_PASSWORD,
    ))
    assert "sasl_mechanism" not in args
    assert ca_subjects(args["ssl_context"]) == ["usage-metrics test CA"]


def security_of(client: Any) -> dict[str, Any]:
    """What an aiokafka client will connect with, read back from the client it built."""
    inner = getattr(client, "_client", None) or client.client
    return {
        "bootstrap": inner._bootstrap_servers,
        "protocol": inner._security_protocol,
        "mechanism": inner._sasl_mechanism,
        "username": inner._sasl_plain_username,
        "password": inner._sasl_plain_password,
        "context": inner._ssl_context,
    }


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
async def test_every_kafka_client_connects_with_the_security_settings(
    pki: Pki, mechanism: str
) -> None:
    settings = sasl(mechanism=mechanism, kafka_ssl_cafile=pki.ca,
                    kafka_bootstrap_servers="broker-1:9096,broker-2:9096")
    clients = {
        "group consumer (and replay's)": make_kafka_consumer(settings, "g"),
        "dead-letter producer": make_dlq_producer(settings),
        "demo producer": make_producer(settings, linger_ms=20),
        "admin client (demo, bench)": make_admin_client(settings),
    }
    for name, client in clients.items():
        got = security_of(client)
        assert got["bootstrap"] == "broker-1:9096,broker-2:9096", name
        assert got["protocol"] == "SASL_SSL", name
        assert got["mechanism"] == mechanism, name
        assert (got["username"], got["password"]) == ("svc-usage", PASSWORD), name
        assert ca_subjects(got["context"]) == ["usage-metrics test CA"], name
    await clients["admin client (demo, bench)"].close()


def run_cli(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("KAFKA_", "REDIS_", "JWT_"))}
    return subprocess.run(
        [sys.executable, "-m", "usage_metrics.cli", *args], cwd=cwd, env={**base, **env},
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )


@pytest.mark.parametrize(
    ("command", "env", "named"),
    [
        (["consume"], {"KAFKA_SECURITY_PROTOCOL": "SSL", "KAFKA_SSL_CAFILE": "/no/ca.pem"},
         "KAFKA_SSL_CAFILE: Value error, no such file: /no/ca.pem"),
        (["replay", "--from-beginning"],
         {"KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
          "KAFKA_SASL_PASSWORD": PASSWORD},
         "KAFKA_SECURITY_PROTOCOL=SASL_SSL needs KAFKA_SASL_USERNAME"),
    ],
)
def test_a_command_with_unusable_kafka_security_exits_2_naming_the_setting(
    tmp_path: Path, command: list[str], env: dict[str, str], named: str
) -> None:
    done = run_cli(command, env, tmp_path)
    assert done.returncode == 2, done.stderr
    assert "refusing to start, invalid settings" in done.stderr
    assert named in done.stderr
    assert PASSWORD not in done.stderr + done.stdout
    assert "Traceback" not in done.stderr
