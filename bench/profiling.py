"""py-spy around a child process, and a summary of where its samples went.

The profile runs are extra, unmeasured runs: sampling slows the target a little, so no figure of
the table ever comes from a profiled run.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*)\)$")


def pyspy_bin() -> str | None:
    local = Path(sys.executable).parent / "py-spy"
    if local.exists():
        return str(local)
    return shutil.which("py-spy")


@contextlib.contextmanager
def pyspy(pid: int, out: Path, log: Path, rate: int = 250) -> Iterator[bool]:
    """Sample ``pid`` until the block ends; yields False (and records nothing) without py-spy."""
    exe = pyspy_bin()
    if exe is None:
        yield False
        return
    with log.open("ab") as errors:
        proc = subprocess.Popen(
            [exe, "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw",
             "--nolineno", "--nonblocking", "--output", str(out)],
            stdout=errors, stderr=errors,
        )
    time.sleep(0.3)  # let it attach
    try:
        yield proc.poll() is None
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _split(frame: str) -> tuple[str, str]:
    m = _FRAME.match(frame.strip())
    if m is None:
        return frame.strip(), ""
    return m.group("func"), m.group("file")


_PLUMBING = ("asyncio/", "runpy", "uvicorn/", "starlette/", "fastapi/", "usage_metrics/cli.py",
             "threading.py", "selectors.py", "contextlib.py", "anyio/")


def _interesting(name: str) -> bool:
    return not any(p in name for p in _PLUMBING)


def summarize(raw: Path, top: int = 15) -> dict[str, Any]:
    """Self and inclusive sample shares per function, and self share per source file."""
    if not raw.exists():
        return {"samples": 0, "error": f"no profile at {raw}"}
    self_fn: Counter[str] = Counter()
    incl_fn: Counter[str] = Counter()
    self_file: Counter[str] = Counter()
    total = 0
    for line in raw.read_text(encoding="utf-8", errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f for f in stack.split(";") if f and not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        total += count
        func, file = _split(frames[-1])
        self_fn[f"{func} ({file})"] += count
        self_file[file or func] += count
        seen = set()
        for frame in frames:
            func, file = _split(frame)
            name = f"{func} ({file})"
            if name not in seen:
                seen.add(name)
                incl_fn[name] += count

    def share(counter: Counter[str], trunk: float = 1.01) -> list[dict[str, Any]]:
        rows = [
            {"name": name, "samples": n, "share": n / total if total else 0.0}
            for name, n in counter.most_common()
            if not total or n / total < trunk
        ]
        return rows[:top]

    return {
        "samples": total,
        "self": share(self_fn),
        # Frames on (nearly) every stack are the trunk (runpy, the event loop): left out, and so
        # is the framework plumbing above the project's own code.
        "inclusive": share(Counter({k: v for k, v in incl_fn.items() if _interesting(k)}),
                           trunk=0.9),
        "self_by_file": share(self_file),
        "raw": str(raw),
    }


def render(title: str, summary: dict[str, Any], top: int = 10) -> str:
    if not summary.get("samples"):
        return f"#### {title}\n\n(no samples: {summary.get('error', 'py-spy unavailable')})\n"
    lines = [f"#### {title} ({summary['samples']} samples)", ""]
    lines.append("| self % | function (file) | | inclusive % | function (file) |")
    lines.append("|---:|---|---|---:|---|")
    selfs, incls = summary["self"][:top], summary["inclusive"][:top]
    for i in range(max(len(selfs), len(incls))):
        a = selfs[i] if i < len(selfs) else None
        b = incls[i] if i < len(incls) else None
        lines.append(
            f"| {a['share'] * 100:.1f} | `{a['name']}` | | " if a else "| | | | "
        )
        lines[-1] += f"{b['share'] * 100:.1f} | `{b['name']}` |" if b else " | |"
    lines.append("")
    lines.append("Self time by file: " + ", ".join(
        f"`{f['name']}` {f['share'] * 100:.0f} %" for f in summary["self_by_file"][:8]
    ))
    return "\n".join(lines) + "\n"
