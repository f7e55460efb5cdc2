"""Static checks of the deployment files: compose.yaml, Dockerfile, .dockerignore.

No Docker engine runs on the CI machines, so compose.yaml is read with PyYAML and checked for
what matters in production (KRaft, AOF, health checks, start order, env names, non-root image).
Only ``test_docker_compose_config`` needs Docker, and it skips itself when no engine answers.

Deliberately imports nothing from the project and uses no conftest fixture.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

# The environment variables sketches.config.Settings reads (the service contract).
# Hard-coded on purpose: a typo in compose.yaml (KAFKA_BOOTSTRAP_SERVER, REDIS_URI...) would be
# silently ignored by pydantic-settings and the service would run against its localhost defaults.
KNOWN_SETTINGS = frozenset(
    {
        "KAFKA_BOOTSTRAP_SERVERS",
        "KAFKA_TOPIC",
        "KAFKA_DLQ_TOPIC",
        "KAFKA_GROUP_ID",
        "REDIS_URL",
        "SKETCH_MODE",
        "LOGIN_METRIC_TYPE",
        "RETENTION_DAYS",
        "MAX_PERIOD_LENGTH",
        "JWT_SECRET",
        "JWT_PUBLIC_KEY",
        "JWT_AUDIENCE",
        "JWT_ISSUER",
        "LOG_FORMAT",
        "CONSUMER_HEALTH_PORT",
        "API_METRICS_PORT",
        "API_METRICS_HOST",
    }
)

APP_SERVICES = ("consumer", "api")
ONE_SHOT_SERVICES = frozenset({"kafka-init"})
ENTRYPOINT = ["usage-metrics"]


# ---------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    assert isinstance(doc, dict), "compose.yaml must be a mapping"
    return doc


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    svcs = compose.get("services")
    assert isinstance(svcs, dict), "compose.yaml has no services mapping"
    return svcs


def env_of(service: dict[str, Any]) -> dict[str, str]:
    """A service's `environment`, map or list form, as {name: value} (value '' when unset)."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        pairs = (item.split("=", 1) for item in env)
        return {p[0]: (p[1] if len(p) > 1 else "") for p in pairs}
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def tokens(value: Any) -> list[str]:
    """A command / entrypoint / healthcheck test, string or list form, as a token list."""
    if value is None:
        return []
    if isinstance(value, str):
        return shlex.split(value)
    return [str(v) for v in value]


def healthcheck_command(service: dict[str, Any]) -> str:
    """The healthcheck's command as one string, without the CMD / CMD-SHELL marker."""
    test = service["healthcheck"]["test"]
    if isinstance(test, str):
        return test
    assert test[0] in ("CMD", "CMD-SHELL"), f"healthcheck test must start with CMD: {test!r}"
    return " ".join(test[1:])


def flag_value(args: list[str], flag: str) -> str | None:
    """The value after `flag` in an argument list (also `--flag=value`), or None."""
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def depends_on(service: dict[str, Any]) -> dict[str, str]:
    """{dependency: condition}; the short list form has no condition, recorded as ''."""
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return dict.fromkeys(deps, "")
    return {name: (spec or {}).get("condition", "") for name, spec in deps.items()}


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with line continuations joined and comments dropped."""
    logical: list[str] = []
    current = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    if current.strip():
        logical.append(current)
    out = []
    for text in logical:
        instr, _, args = text.partition(" ")
        out.append((instr.upper(), args.strip()))
    return out


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions()
    starts = [i for i, (instr, _) in enumerate(instructions) if instr == "FROM"]
    assert starts, "Dockerfile has no FROM"
    return instructions[starts[-1] :]


def exec_form(args: str) -> list[str]:
    """The JSON (exec) form of CMD / ENTRYPOINT; shell form is refused (signals, PID 1)."""
    try:
        value = json.loads(args)
    except json.JSONDecodeError:
        pytest.fail(f"not in exec (JSON) form: {args!r}")
    assert isinstance(value, list), f"not in exec (JSON) form: {args!r}"
    return value


def version_tuple(tag: str) -> tuple[int, ...]:
    match = re.match(r"^(\d+)(?:\.(\d+))?", tag)
    assert match, f"image tag {tag!r} is not a version (pin one, e.g. 7.4)"
    return tuple(int(g) for g in match.groups() if g is not None)


# ---------------------------------------------------------------- compose.yaml: structure


def test_compose_specification_has_no_version_key(compose: dict[str, Any]) -> None:
    assert "version" not in compose, "the Compose Specification has no `version:` key"


@pytest.mark.parametrize("name", ["kafka", "kafka-init", "redis", "consumer", "api"])
def test_service_exists(services: dict[str, dict[str, Any]], name: str) -> None:
    assert name in services, f"compose.yaml has no {name!r} service"


def test_every_long_running_service_has_a_healthcheck(
    services: dict[str, dict[str, Any]],
) -> None:
    missing = []
    for name, svc in services.items():
        if name in ONE_SHOT_SERVICES:
            continue
        hc = svc.get("healthcheck") or {}
        if hc.get("disable") or not tokens(hc.get("test")) or tokens(hc.get("test")) == ["NONE"]:
            missing.append(name)
    assert not missing, f"services without a healthcheck: {missing}"


def test_one_shot_init_is_not_restarted(services: dict[str, dict[str, Any]]) -> None:
    for name in ONE_SHOT_SERVICES:
        restart = str(services[name].get("restart", "no"))
        assert restart in ("no", "on-failure") or restart.startswith("on-failure:"), (
            f"{name} is one-shot; restart={restart!r} would rerun it forever"
        )


def test_stateful_services_use_named_volumes(compose: dict[str, Any]) -> None:
    declared = set((compose.get("volumes") or {}).keys())
    for name in ("kafka", "redis"):
        mounts = compose["services"][name].get("volumes") or []
        sources = set()
        for m in mounts:
            source = m.split(":", 1)[0] if isinstance(m, str) else m.get("source")
            sources.add(source)
        assert sources & declared, f"{name} mounts no named volume (declared: {sorted(declared)})"


# ---------------------------------------------------------------- kafka


def test_kafka_is_a_single_kraft_node(services: dict[str, dict[str, Any]]) -> None:
    kafka = services["kafka"]
    image = kafka["image"]
    repo, _, tag = image.partition(":")
    assert repo == "apache/kafka", image
    assert version_tuple(tag) >= (3, 9), f"{image}: need apache/kafka 3.9.0 or newer"

    env = env_of(kafka)
    assert "KAFKA_ZOOKEEPER_CONNECT" not in env, "KRaft mode has no ZooKeeper"
    roles = {r.strip() for r in env.get("KAFKA_PROCESS_ROLES", "").split(",")}
    assert roles == {"broker", "controller"}, f"process roles {roles}"

    voters = [v for v in env.get("KAFKA_CONTROLLER_QUORUM_VOTERS", "").split(",") if v]
    assert len(voters) == 1, f"expected one controller voter, got {voters}"
    voter_id = voters[0].split("@", 1)[0]
    assert voter_id == env.get("KAFKA_NODE_ID"), (
        f"the voter {voters[0]!r} is not this node (KAFKA_NODE_ID={env.get('KAFKA_NODE_ID')!r})"
    )
    controller_names = env.get("KAFKA_CONTROLLER_LISTENER_NAMES", "")
    assert controller_names, "KAFKA_CONTROLLER_LISTENER_NAMES is required in KRaft mode"
    assert f"{controller_names}://" in env.get("KAFKA_LISTENERS", ""), (
        "the controller listener is not among KAFKA_LISTENERS"
    )


def test_kafka_advertises_an_internal_and_a_host_listener(
    services: dict[str, dict[str, Any]],
) -> None:
    advertised = env_of(services["kafka"]).get("KAFKA_ADVERTISED_LISTENERS", "")
    endpoints = [e.split("://", 1)[1] for e in advertised.split(",") if "://" in e]
    assert "kafka:9092" in endpoints, f"no internal listener kafka:9092 in {advertised!r}"
    host_endpoints = [e for e in endpoints if e.split(":")[0] in ("localhost", "127.0.0.1")]
    assert host_endpoints, f"no host listener in {advertised!r}"
    host_port = host_endpoints[0].rsplit(":", 1)[1]
    published = [str(p) for p in services["kafka"].get("ports") or []]
    assert any(p.endswith(f":{host_port}") for p in published), (
        f"host listener port {host_port} is not published: {published}"
    )


def test_kafka_healthcheck_asks_the_broker(services: dict[str, dict[str, Any]]) -> None:
    command = healthcheck_command(services["kafka"])
    assert "kafka-broker-api-versions.sh" in command or "kafka-topics.sh" in command, command
    assert "--bootstrap-server" in command, command


def test_kafka_init_creates_the_topics_the_consumer_uses(
    services: dict[str, dict[str, Any]],
) -> None:
    init = services["kafka-init"]
    assert depends_on(init).get("kafka") == "service_healthy", depends_on(init)

    script = " ".join(tokens(init.get("entrypoint")) + tokens(init.get("command")))
    script = script.replace("\\\n", " ")  # join shell line continuations
    creates = [
        shlex.split(line)
        for line in re.split(r"\n|;|&&", script)
        if "kafka-topics.sh" in line and "--create" in line
    ]
    assert creates, "kafka-init creates no topic"
    created = {flag_value(args, "--topic") for args in creates}
    for args in creates:
        assert "--if-not-exists" in args, f"not idempotent: {' '.join(args)}"

    consumer_env = env_of(services["consumer"])
    wanted = {consumer_env.get("KAFKA_TOPIC", "metrics"), consumer_env.get("KAFKA_DLQ_TOPIC")}
    assert wanted == {"metrics", "metrics.dlq"}, f"consumer topics {wanted}"
    assert wanted <= created, f"kafka-init creates {created}, the consumer uses {wanted}"

    # The dead-letter topic takes what the dead-letter producer may send: consumer/dlq.py
    # MAX_DLQ_REQUEST_BYTES, hard-coded here as this module imports nothing of the project.
    [dlq] = [args for args in creates if flag_value(args, "--topic") == "metrics.dlq"]
    configs = dict(
        value.partition("=")[::2] for flag, value in itertools.pairwise(dlq)
        if flag == "--config"
    )
    assert configs.get("max.message.bytes") == str(8 * 1024 * 1024), configs


# ---------------------------------------------------------------- redis


def test_redis_is_7_4_or_newer_with_aof_everysec(services: dict[str, dict[str, Any]]) -> None:
    redis = services["redis"]
    repo, _, tag = redis["image"].partition(":")
    assert repo in ("redis", "docker.io/library/redis"), redis["image"]
    assert version_tuple(tag) >= (7, 4), f"{redis['image']}: need redis 7.4 or newer"

    args = tokens(redis.get("command"))
    assert flag_value(args, "--appendonly") == "yes", f"AOF is not on: {args}"
    assert flag_value(args, "--appendfsync") == "everysec", f"AOF fsync is not everysec: {args}"


def test_redis_healthcheck_pings(services: dict[str, dict[str, Any]]) -> None:
    command = healthcheck_command(services["redis"])
    assert re.search(r"redis-cli\b.*\bping\b", command, re.IGNORECASE), command


# ---------------------------------------------------------------- consumer and api


@pytest.mark.parametrize("name", APP_SERVICES)
def test_app_service_is_built_from_the_dockerfile(
    services: dict[str, dict[str, Any]], name: str
) -> None:
    build = services[name].get("build")
    assert build is not None, f"{name} is not built from the Dockerfile"
    if isinstance(build, str):
        context, dockerfile = build, "Dockerfile"
    else:
        context, dockerfile = build.get("context", "."), build.get("dockerfile", "Dockerfile")
    assert (COMPOSE_FILE.parent / context / dockerfile).resolve() == DOCKERFILE, (
        f"{name} builds {context}/{dockerfile}, not the repo's Dockerfile"
    )
    entrypoint = services[name].get("entrypoint")
    assert entrypoint is None or tokens(entrypoint) == ENTRYPOINT, (
        f"{name} overrides the entrypoint: {entrypoint!r}"
    )


def test_consumer_runs_consume(services: dict[str, dict[str, Any]]) -> None:
    assert tokens(services["consumer"].get("command"))[:1] == ["consume"]


def test_api_runs_api_on_all_interfaces_and_publishes_its_port(
    services: dict[str, dict[str, Any]],
) -> None:
    api = services["api"]
    args = tokens(api.get("command"))
    assert args[:1] == ["api"], args
    assert flag_value(args, "--host") == "0.0.0.0", f"the API must listen on 0.0.0.0: {args}"
    port = flag_value(args, "--port") or "8000"
    published = [str(p) for p in api.get("ports") or []]
    assert any(p.split(":")[-1].split("/")[0] == port for p in published), (
        f"container port {port} is not published: {published}"
    )


def test_api_metrics_have_a_listener_of_their_own_exposed_on_the_network_never_published(
    services: dict[str, dict[str, Any]],
) -> None:
    """The API port is published on every interface and faces callers; the Prometheus series
    (routes, statuses, load) are served on API_METRICS_PORT, reachable by a scraper on the compose
    network and by nothing outside it."""
    api = services["api"]
    env = env_of(api)
    port = env.get("API_METRICS_PORT")
    assert port, "the API's metrics need API_METRICS_PORT (else nothing serves them)"
    assert env.get("API_METRICS_HOST") == "0.0.0.0", "other containers must reach the listener"
    api_port = flag_value(tokens(api.get("command")), "--port") or "8000"
    assert port != api_port
    exposed = [str(p).split("/")[0] for p in api.get("expose") or []]
    assert port in exposed, f"API_METRICS_PORT {port} is not exposed: {exposed}"
    published = [str(p) for p in api.get("ports") or []]
    assert not any(p.split(":")[-1].split("/")[0] == port for p in published), (
        f"the metrics port {port} is published: {published}"
    )


@pytest.mark.parametrize(
    ("name", "required"),
    [
        (
            "consumer",
            {
                "redis": "service_healthy",
                "kafka": "service_healthy",
                "kafka-init": "service_completed_successfully",
            },
        ),
        ("api", {"redis": "service_healthy"}),
    ],
)
def test_app_service_waits_for_its_dependencies(
    services: dict[str, dict[str, Any]], name: str, required: dict[str, str]
) -> None:
    deps = depends_on(services[name])
    for dep, condition in required.items():
        assert deps.get(dep) == condition, f"{name} depends_on {dep}: {deps.get(dep)!r}"


@pytest.mark.parametrize("name", APP_SERVICES)
def test_app_service_sets_only_known_settings(
    services: dict[str, dict[str, Any]], name: str
) -> None:
    env = env_of(services[name])
    assert env, f"{name} sets no environment at all"
    unknown = sorted(set(env) - KNOWN_SETTINGS)
    assert not unknown, f"{name} sets env vars the Settings do not read: {unknown}"


@pytest.mark.parametrize("name", APP_SERVICES)
def test_app_service_points_at_the_compose_redis(
    services: dict[str, dict[str, Any]], name: str
) -> None:
    url = env_of(services[name]).get("REDIS_URL", "")
    assert re.fullmatch(r"rediss?://([^@/]*@)?redis:6379(/\d+)?", url), (
        f"{name} REDIS_URL={url!r} does not point at the redis service"
    )


def test_consumer_points_at_the_internal_kafka_listener(
    services: dict[str, dict[str, Any]],
) -> None:
    servers = env_of(services["consumer"]).get("KAFKA_BOOTSTRAP_SERVERS", "")
    advertised = env_of(services["kafka"]).get("KAFKA_ADVERTISED_LISTENERS", "")
    assert servers == "kafka:9092", servers
    assert f"://{servers}" in advertised, f"{servers} is not a listener kafka advertises"


def test_consumer_health_port_matches_its_healthcheck(services: dict[str, dict[str, Any]]) -> None:
    consumer = services["consumer"]
    port = env_of(consumer).get("CONSUMER_HEALTH_PORT")
    assert port == "8081", f"CONSUMER_HEALTH_PORT={port!r}"
    command = healthcheck_command(consumer)
    assert f":{port}/healthz" in command, f"the healthcheck does not ask port {port}: {command}"
    assert not re.search(r"\b(curl|wget)\b", command), "no curl/wget in slim images"


def test_api_healthcheck_asks_healthz(services: dict[str, dict[str, Any]]) -> None:
    command = healthcheck_command(services["api"])
    assert ":8000/healthz" in command, command
    assert not re.search(r"\b(curl|wget)\b", command), "no curl/wget in slim images"


def test_consumer_restarts_and_gets_time_to_finish_a_batch(
    services: dict[str, dict[str, Any]],
) -> None:
    consumer = services["consumer"]
    assert consumer.get("restart") == "unless-stopped", consumer.get("restart")
    grace = str(consumer.get("stop_grace_period", "10s"))
    match = re.fullmatch(r"(\d+)(s|m)", grace)
    assert match, f"stop_grace_period {grace!r}: use seconds or minutes"
    seconds = int(match.group(1)) * (60 if match.group(2) == "m" else 1)
    assert seconds >= 30, f"stop_grace_period {grace} is shorter than a batch may take"


def test_api_restarts_and_requires_a_jwt_secret(services: dict[str, dict[str, Any]]) -> None:
    api = services["api"]
    assert api.get("restart") == "unless-stopped", api.get("restart")
    secret = env_of(api).get("JWT_SECRET", "")
    # ${VAR:?msg} makes `docker compose` refuse to start when JWT_SECRET is unset or empty.
    assert re.fullmatch(r"\$\{JWT_SECRET:\?[^}]+\}", secret), (
        f"JWT_SECRET={secret!r}: must be required from the environment, never a literal"
    )
    # Tokens are checked for whom and by whom they were issued, not only for their signature.
    for name in ("JWT_AUDIENCE", "JWT_ISSUER"):
        value = env_of(api).get(name, "")
        assert value, f"{name} is not set"
        assert not value.startswith("${" + name + ":-}"), f"{name}={value!r} may be empty"


# ---------------------------------------------------------------- Dockerfile


def test_dockerfile_is_multi_stage_on_python_3_11_slim() -> None:
    bases = [args.split()[0] for instr, args in dockerfile_instructions() if instr == "FROM"]
    assert len(bases) >= 2, f"not multi-stage: FROM {bases}"
    assert bases[-1].startswith("python:3.11-slim"), f"runtime base {bases[-1]}"
    runs = [args for instr, args in dockerfile_instructions() if instr == "RUN"]
    assert any(re.search(r"\bpip install\b.*\s\.(\s|$)", args) for args in runs), (
        f"the project is not installed with `pip install .`: {runs}"
    )


def test_dockerfile_entrypoint_and_default_command() -> None:
    stage = final_stage()
    entrypoints = [args for instr, args in stage if instr == "ENTRYPOINT"]
    cmds = [args for instr, args in stage if instr == "CMD"]
    assert entrypoints, "the runtime stage has no ENTRYPOINT"
    assert exec_form(entrypoints[-1]) == ENTRYPOINT, entrypoints[-1]
    assert cmds, "the runtime stage has no CMD"
    assert exec_form(cmds[-1]) == ["api", "--host", "0.0.0.0", "--port", "8000"], cmds[-1]


def test_dockerfile_runs_as_a_non_root_user() -> None:
    users = [args for instr, args in final_stage() if instr == "USER"]
    assert users, "the runtime stage has no USER: it would run as root"
    user = users[-1].split(":", 1)[0].strip()
    assert user not in ("root", "0", ""), f"USER {users[-1]} is root"


def test_dockerfile_exposes_8000_and_checks_healthz_with_python() -> None:
    stage = final_stage()
    exposed = {p.split("/")[0] for instr, args in stage if instr == "EXPOSE" for p in args.split()}
    assert "8000" in exposed, f"EXPOSE {exposed}"
    checks = [args for instr, args in stage if instr == "HEALTHCHECK"]
    assert checks, "the runtime stage has no HEALTHCHECK"
    assert "urllib" in checks[-1], checks[-1]
    assert "/healthz" in checks[-1], checks[-1]
    assert not re.search(r"\b(curl|wget)\b", checks[-1]), "no curl/wget in slim images"


def test_dockerignore_keeps_local_state_and_secrets_out() -> None:
    patterns = {
        line.strip().rstrip("/")
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    }
    wanted = {".venv", ".git", "tests/artifacts", "bench/results.json", ".env"}
    assert wanted <= patterns, f".dockerignore is missing {sorted(wanted - patterns)}"


# ---------------------------------------------------------------- Docker itself, when present


def _docker_unavailable_reason() -> str | None:
    docker = shutil.which("docker")
    if docker is None:
        return "no docker CLI on PATH"
    try:
        version = subprocess.run(
            [docker, "compose", "version"], capture_output=True, timeout=30, check=False
        )
        if version.returncode != 0:
            return "the docker CLI has no compose plugin"
        info = subprocess.run([docker, "info"], capture_output=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"docker did not answer: {exc}"
    if info.returncode != 0:
        return "no Docker engine answers (`docker info` failed)"
    return None


def test_docker_compose_config() -> None:
    reason = _docker_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    env = {**os.environ, "JWT_SECRET": "compose-config-test-only-32-bytes-long"}
    result = subprocess.run(
        ["docker", "compose", "-f", str(COMPOSE_FILE), "config", "-q"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, f"docker compose config failed:\n{result.stderr}"
