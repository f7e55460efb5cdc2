"""How much CPU processes outside the benchmark took while it ran.

The machine is shared (other test suites may run at the same time), so every section records the
cores other processes used: the CPU-time deltas of every process in ``/proc`` that is not the
benchmark or one of its descendants, sampled every second. It runs as its own process
(``python -m bench.contention ROOT_PID SECTION_FILE``) so that reading ``/proc`` never holds the
GIL of the process whose latencies are being measured; the benchmark writes the name of the
current section into ``SECTION_FILE``, and the watcher prints its JSON on SIGTERM.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import orjson

_TICK = os.sysconf("SC_CLK_TCK")


def _snapshot() -> dict[int, tuple[int, float]]:
    """pid -> (ppid, cpu seconds) for every readable process."""
    out: dict[int, tuple[int, float]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                raw = f.read()
        except OSError:
            continue
        rest = raw[raw.rfind(b")") + 2:].split()
        # fields after the command: state ppid ... utime(11) stime(12) (0-based from state)
        try:
            out[int(name)] = (int(rest[1]), (int(rest[11]) + int(rest[12])) / _TICK)
        except (IndexError, ValueError):
            continue
    return out


def _ours(snap: dict[int, tuple[int, float]], root: int) -> set[int]:
    mine = {root}
    changed = True
    while changed:
        changed = False
        for pid, (ppid, _) in snap.items():
            if pid not in mine and ppid in mine:
                mine.add(pid)
                changed = True
    return mine


class CpuWatch:
    def __init__(self, interval: float = 1.0, root: int | None = None) -> None:
        self.interval = interval
        self.root = root if root is not None else os.getpid()
        self.section = "start"
        self.foreign: dict[str, float] = {}
        self.wall: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-watch", daemon=True)
        self._last = _snapshot()
        self._t = time.monotonic()

    def start(self) -> CpuWatch:
        self._thread.start()
        return self

    def mark(self, section: str) -> None:
        self.section = section

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> float:
        """Foreign cores since the last sample, also added to the current section."""
        snap = _snapshot()
        now = time.monotonic()
        mine = _ours(snap, self.root)
        used = 0.0
        for pid, (_, cpu) in snap.items():
            if pid in mine:
                continue
            before = self._last.get(pid)
            # a process new since the last sample spent all of its CPU time in this interval
            used += cpu - before[1] if before else cpu
        dt = now - self._t
        self._last, self._t = snap, now
        self.foreign[self.section] = self.foreign.get(self.section, 0.0) + used
        self.wall[self.section] = self.wall.get(self.section, 0.0) + dt
        return used / dt if dt > 0 else 0.0

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        self._thread.join(5)
        return self.summary()

    def summary(self) -> dict[str, Any]:
        return {
            name: {"foreign_cpu_s": round(cpu, 1), "seconds": round(self.wall[name], 1),
                   "foreign_cores": round(cpu / self.wall[name], 2) if self.wall[name] else 0.0}
            for name, cpu in self.foreign.items()
        }


def wait_quiet(limit_s: float, cores: float = 0.25, quiet_for: float = 10.0) -> float:
    """Wait (at most ``limit_s``) until other processes use under ``cores`` for ``quiet_for``
    seconds in a row; returns the seconds waited."""
    if limit_s <= 0:
        return 0.0
    watch = CpuWatch()
    started = time.monotonic()
    calm_since = time.monotonic()
    while time.monotonic() - started < limit_s:
        time.sleep(1.0)
        if watch.sample() > cores:
            calm_since = time.monotonic()
        elif time.monotonic() - calm_since >= quiet_for:
            break
    return time.monotonic() - started


class WatchProcess:
    """The watcher as a child process, driven by a section file."""

    def __init__(self, section_file: Path) -> None:
        self.section_file = section_file
        section_file.write_text("setup", encoding="utf-8")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.contention", str(os.getpid()), str(section_file)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            cwd=str(Path(__file__).resolve().parent.parent),
        )

    def mark(self, section: str) -> None:
        self.section_file.write_text(section, encoding="utf-8")

    def stop(self) -> dict[str, Any]:
        self.proc.send_signal(signal.SIGTERM)
        try:
            out, _ = self.proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            return {}
        try:
            result: dict[str, Any] = orjson.loads(out.strip().splitlines()[-1])
        except (orjson.JSONDecodeError, IndexError):
            return {}
        return result


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    root, section_file = int(args[0]), Path(args[1])
    watch = CpuWatch(root=root)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    while not stop.wait(watch.interval):
        with contextlib.suppress(OSError):
            watch.mark(section_file.read_text(encoding="utf-8").strip() or "?")
        watch.sample()
        try:
            os.kill(root, 0)
        except ProcessLookupError:
            return 0  # the benchmark is gone: nobody will read the result
    watch.sample()
    sys.stdout.write(orjson.dumps(watch.summary()).decode() + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
