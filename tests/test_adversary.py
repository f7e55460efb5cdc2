"""The store and its answers against a model-based adversary (``tests.adversary``), on one Redis,
in both sketch modes. The cluster run is ``tests/cluster/test_cluster_adversary.py``."""

from __future__ import annotations

from sketches.config import Settings
from tests.adversary import run_adversary


def test_no_answer_is_old_or_phantom_whatever_the_adversary_does(settings: Settings) -> None:
    run_adversary(settings, max_examples=30, steps=40)
