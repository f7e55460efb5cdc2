"""Figures of the mutation audit (docs/mutation.md) from mutmut's own records (``mutants/*.meta``):
per audited file, mutants in scope, killed, survived, timeouts and not yet checked, and the
survivors by name, so that the note's numbers are recomputed, never typed by hand.

    .venv/bin/python -m bench.mutation_summary [--survivors]

``SCOPE`` is what the audit covers (the functions issues 15 and 17 changed); ``mutmut run`` is
given the same patterns (``python -m bench.mutation_summary --patterns``).
"""

from __future__ import annotations

import fnmatch
import json
import sys
from collections import Counter
from pathlib import Path

SCOPE: dict[str, list[str]] = {
    "sketches/writes.py": ["sketches.writes.*"],
    "sketches/results.py": [
        "sketches.results.xǁStoredǁ*",
        "sketches.results.x_stamps_from__*",
        "sketches.results.xǁSpanǁtokens__*",
        "sketches.results.xǁResultCacheǁget__*",
        "sketches.results.xǁResultCacheǁput__*",
        "sketches.results.xǁAnswersǁsnapshot__*",
        "sketches.results.xǁAnswersǁanswer__*",
        "sketches.results.xǁAnswersǁcomputed__*",
        "sketches.results.xǁAnswersǁ_refresh__*",
        "sketches.results.xǁAnswersǁ_recheck__*",
        "sketches.results.xǁAnswersǁ_write_back__*",
        "sketches.results.x_invalid_entries__*",
        "sketches.results.x_render_series__*",
    ],
    "sketches/store.py": [
        f"sketches.store.xǁSketchStoreǁ{name}__*"
        for name in ("_add_grouped", "begin_rebuild", "finish_rebuild", "cancel_rebuild",
                     "_live_candidates", "delete_workspace")
    ],
    "consumer/rebuild.py": [
        "consumer.selection.xǁSelectionǁ*",
        "consumer.recordfilter.x_quoted__*",
        "consumer.recordfilter.xǁPrefilterǁ*",
        "consumer.recordfilter.x_default_partition__*",
        "consumer.recordfilter.x_workspace_key__*",
        "consumer.recordfilter.xǁKeyedPartitionsǁ*",
        "consumer.recordfilter.xǁRecordFilterǁ*",
    ],
    "sketches/settings_feed.py": ["sketches.settings_feed.*"],
}

STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests",
          None: "not checked", 36: "timeout", 24: "timeout", -24: "timeout", 152: "timeout",
          255: "timeout"}


def in_scope(path: str, name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in SCOPE[path])


def main(argv: list[str]) -> int:
    if "--patterns" in argv:
        print(" ".join(f'"{p}"' for ps in SCOPE.values() for p in ps))
        return 0
    for path in SCOPE:
        meta = Path("mutants") / (path + ".meta")
        codes = json.loads(meta.read_text())["exit_code_by_key"] if meta.exists() else {}
        mine = {k: v for k, v in codes.items() if in_scope(path, k)}
        tally = Counter(STATUS.get(v, f"exit {v}") for v in mine.values())
        print(f"{path}: {len(mine)} mutants: " + ", ".join(f"{n} {s}" for s, n in
                                                           sorted(tally.items())))
        if "--survivors" in argv:
            for k, v in sorted(mine.items()):
                if STATUS.get(v) in ("survived", "timeout", "no tests"):
                    print(f"    {STATUS[v]:9} {k}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
