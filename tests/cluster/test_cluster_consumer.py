"""The consumer's end-to-end tests of tests/test_consumer.py, on the Redis Cluster, both modes.

Every test whose outcome depends on the store: produce -> GroupConsumer -> counts equal to the
oracle (dead letters included); a ``usage-metrics consume`` process (which learns
``REDIS_CLUSTER`` from the environment) killed between write and commit, or stopped with SIGTERM,
whose Kafka commits must then equal the store's offsets (the minimum over the masters' records);
the store's offsets deciding where a partition resumes once a workspace
(``delete_workspace`` by slot) and the partition's record are gone; a store that refuses writes
for a while. Codecs, librdkafka and oversized messages are transport matters and stay on the
single Redis.
"""

from __future__ import annotations

import pytest

from tests import test_consumer as _single

pytestmark = pytest.mark.xdist_group("cluster")

REUSED = (
    "test_logins_are_counted_bad_ones_dead_lettered_others_filtered",
    "test_each_message_is_handled_once_and_each_bad_one_dead_lettered_once",
    "test_killed_between_write_and_commit_counts_stay_right",
    "test_sigterm_finishes_the_batch_commits_and_exits_zero",
    "test_store_offsets_decide_where_a_partition_resumes",
    "test_a_redis_that_rejects_writes_stops_commits_until_it_accepts",
)


def _missing(name: str) -> object:
    def test() -> None:
        pytest.fail(f"tests/test_consumer.py has no {name} any more: update {__file__}")

    return test


globals().update({name: getattr(_single, name, None) or _missing(name) for name in REUSED})
