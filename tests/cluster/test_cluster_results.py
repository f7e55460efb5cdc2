"""tests/test_results.py, every test of it, on the Redis Cluster in both sketch modes: stored
results, their stamps and their write-back share the scope's hash tag, so each request and each
batch stays in one slot, and every answer still equals the direct computation."""

from __future__ import annotations

import pytest

from tests import test_results as _single

pytestmark = pytest.mark.xdist_group("cluster")

SINGLE_REDIS_ONLY: dict[str, str] = {}

globals().update({
    name: test for name, test in vars(_single).items()
    if name.startswith("test_") and name not in SINGLE_REDIS_ONLY
})
