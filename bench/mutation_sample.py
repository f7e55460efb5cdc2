"""The mutation audit's second stage (docs/mutation.md): a random sample of the audited mutants
the ``mutmut run`` pass had not reached, each run against the tests that executed its function
(mutmut's own record, ``mutants/mutmut-stats.json``) fastest first, less the slow ones (more than
``SLOW_S`` each: the adversary and the Kafka rebuild runs).

Why: on a shared 2-core machine a full pass takes hours, because every surviving mutant runs
every test that touches its function. A sample drawn at random per file, in an order where any
prefix is itself a random sample, gives each file's kill rate with a known size whenever the
time runs out. Verdicts go into mutmut's records (``mutants/*.meta``), so
``bench.mutation_summary`` and ``mutmut show`` read them, and into ``mutants/sample.json``.

    REDIS_URL=... KAFKA_BOOTSTRAP_SERVERS=... CI=1 .venv/bin/python -m bench.mutation_sample 1800
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path

from bench.mutation_summary import SCOPE, in_scope

SLOW_S = 2.0
SEED = 1517
WORKERS = int(os.environ.get("MUTATION_WORKERS", "2"))


def queue() -> list[str]:
    """Unchecked audited mutants, shuffled per file and interleaved in proportion to each
    file's share, so that the first n are a random sample of every file."""
    rng = random.Random(SEED)
    per_file: dict[str, list[str]] = {}
    for path in SCOPE:
        codes = json.loads((Path("mutants") / (path + ".meta")).read_text())["exit_code_by_key"]
        names = sorted(k for k, v in codes.items() if v is None and in_scope(path, k))
        rng.shuffle(names)
        per_file[path] = names
    total = sum(len(v) for v in per_file.values())
    out: list[str] = []
    taken = dict.fromkeys(per_file, 0)
    while len(out) < total:
        # the file furthest behind its share goes next
        path = min((p for p in per_file if taken[p] < len(per_file[p])),
                   key=lambda p: taken[p] / len(per_file[p]))
        out.append(per_file[path][taken[path]])
        taken[path] += 1
    return out


def run_one(name: str, tests: list[str]) -> int:
    if not tests:
        return 33
    env = {**os.environ, "MUTANT_UNDER_TEST": name}
    cmd = ["nice", "-n", "19", sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:randomly",
           "-p", "no:cacheprovider", "--timeout=60", *tests]
    try:
        return subprocess.run(cmd, cwd="mutants", env=env, capture_output=True,
                              timeout=600).returncode
    except subprocess.TimeoutExpired:
        return 36


def main(argv: list[str]) -> int:
    deadline = time.monotonic() + float(argv[0]) if argv else float("inf")
    stats = json.loads(Path("mutants/mutmut-stats.json").read_text())
    by_fn: dict[str, list[str]] = stats["tests_by_mangled_function_name"]
    duration: dict[str, float] = stats["duration_by_test"]
    slow = sorted(t for t, d in duration.items() if d > SLOW_S)
    print(f"left out as slow ({len(slow)}): {slow}", flush=True)
    results_path = Path("mutants/sample.json")
    results: dict[str, int] = (json.loads(results_path.read_text())
                               if results_path.exists() else {})
    names = [n for n in queue() if n not in results]
    path_of: dict[str, str] = {}
    metas = {p: json.loads((Path("mutants") / (p + ".meta")).read_text()) for p in SCOPE}
    for p, meta in metas.items():
        for n in meta["exit_code_by_key"]:
            path_of[n] = p

    def tests_of(name: str) -> list[str]:
        fn = name.rsplit("__mutmut_", 1)[0]
        return sorted((t for t in by_fn.get(fn, ()) if duration.get(t, 0) <= SLOW_S),
                      key=lambda t: duration.get(t, 0))

    def save() -> None:
        results_path.write_text(json.dumps(results, indent=1, sort_keys=True))
        for p, meta in metas.items():
            (Path("mutants") / (p + ".meta")).write_text(json.dumps(meta, indent=4))

    running: dict[Future[int], str] = {}
    with ThreadPoolExecutor(WORKERS) as pool:
        it = iter(names)
        while True:
            while len(running) < WORKERS and time.monotonic() < deadline:
                name = next(it, None)
                if name is None:
                    break
                running[pool.submit(run_one, name, tests_of(name))] = name
            if not running:
                break
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in done:
                name = running.pop(fut)
                code = fut.result()
                results[name] = code
                metas[path_of[name]]["exit_code_by_key"][name] = code
                print(f"{code:3} {name}", flush=True)
            save()
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
