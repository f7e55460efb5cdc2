"""tests/test_org_usage.py's end-to-end oracle test on the Redis Cluster, both modes: org sketches
sit under the org's own hash tag, written by the same batch as the workspaces'."""

from __future__ import annotations

import pytest

from tests import test_org_usage as _single

pytestmark = pytest.mark.xdist_group("cluster")

client = _single.client
test_org_rows_count_each_member_once_across_workspaces_and_never_another_orgs = (
    _single.test_org_rows_count_each_member_once_across_workspaces_and_never_another_orgs
)
