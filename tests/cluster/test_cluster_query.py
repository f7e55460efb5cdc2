"""tests/test_query.py, every test of it, on the Redis Cluster in both sketch modes.

The tests are re-collected here, where the cluster's ``settings`` and ``redis_client`` fixtures
apply (see conftest.py), so a test added there runs here too. One that cannot hold on a cluster
goes into ``SINGLE_REDIS_ONLY`` with the reason.
"""

from __future__ import annotations

import pytest

from tests import test_query as _single

pytestmark = pytest.mark.xdist_group("cluster")

SINGLE_REDIS_ONLY: dict[str, str] = {}

globals().update({
    name: test for name, test in vars(_single).items()
    if name.startswith("test_") and name not in SINGLE_REDIS_ONLY
})
