"""The performance benchmark of the usage-metrics service (``make bench``, ``python -m bench``).

It starts its own Tansu broker and redis-servers on free loopback ports, measures ingestion,
queries, Redis cost, memory and accuracy, each figure beside its baseline in the same run, prints
a Markdown table and writes ``bench/results.json``. It never runs under ``make test``.
See ``bench/README.md``.
"""
