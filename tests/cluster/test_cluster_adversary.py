"""The model-based adversary (``tests.adversary``) on a Redis Cluster: many scopes per script
call grouped by slot, the switch and the per-scope meta each on their scope's node."""

from __future__ import annotations

from sketches.config import Settings
from tests.adversary import run_adversary


def test_no_answer_is_old_or_phantom_on_the_cluster(settings: Settings) -> None:
    run_adversary(settings, max_examples=10, steps=30)
