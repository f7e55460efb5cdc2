"""Re-check surviving mutants against the tests written for them (docs/mutation.md): each named
mutant runs ``tests/test_mutants_protocol.py`` (copied into ``mutants/tests``); prints
``killed``/``survived`` per mutant and records the verdicts in ``mutants/recheck.json``.

    .venv/bin/python -m bench.mutation_recheck NAME...   (or names on stdin)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

TESTS = "tests/test_mutants_protocol.py"
# The tests of each module first (``-k``): a mutant is usually killed by its own module's.
KEYWORDS = {
    "consumer.recordfilter": "sample or no_login or parsed_login or unkeyed or workspace_key",
    "sketches.settings_feed": "feed or pattern or fill_of_more or not_parse",
    "sketches.writes": "parts or share_a_call or lone_week or fails_whole",
    "sketches.store": "switch or deleted or cancelled or fails_whole or lost_its_scripts"
                      " or something_else",
    "sketches.results": "new_day or span_when or without_a_deadline or outside_the_span",
}


def check(name: str) -> tuple[str, int]:
    env = {**os.environ, "MUTANT_UNDER_TEST": name}
    cmd = ["nice", "-n", "19", sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:randomly",
           "-p", "no:cacheprovider", "--timeout=60", TESTS]
    module = next((m for m in KEYWORDS if name.startswith(m + ".")), None)
    if module is not None:
        code = subprocess.run([*cmd, "-k", KEYWORDS[module]], cwd="mutants", env=env,
                              capture_output=True).returncode
        if code == 1:
            return name, code
    return name, subprocess.run(cmd, cwd="mutants", env=env, capture_output=True).returncode


def main(argv: list[str]) -> int:
    names = argv or [line.strip() for line in sys.stdin if line.strip()]
    shutil.copy(TESTS, Path("mutants") / TESTS)
    path = Path("mutants/recheck.json")
    done: dict[str, int] = json.loads(path.read_text()) if path.exists() else {}
    with ThreadPoolExecutor(int(os.environ.get("MUTATION_WORKERS", "2"))) as pool:
        for name, code in pool.map(check, names):
            done[name] = code
            print("killed  " if code == 1 else f"exit {code}", name, flush=True)
            path.write_text(json.dumps(done, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
