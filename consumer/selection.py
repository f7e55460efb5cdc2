"""The scopes one rebuild rebuilds, in one pass over the topic (``consumer.rebuild``): a leaf that
bucketing, the writer and the record filters share without importing the rebuild."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from sketches.keys import Scope


@dataclass(frozen=True)
class Selection:
    """The scopes one rebuild rebuilds: workspaces, and orgs' own scopes (``Scope(org, "")``)."""

    scopes: frozenset[Scope]

    @classmethod
    def of(cls, scopes: Iterable[Scope]) -> Selection:
        chosen = frozenset(scopes)
        if not chosen:
            raise ValueError("a rebuild needs at least one scope")
        return cls(chosen)

    @property
    def workspaces(self) -> frozenset[Scope]:
        return frozenset(s for s in self.scopes if not s.is_org)

    @property
    def orgs(self) -> frozenset[str]:
        """The orgs whose own scope is selected (each needs every record of the org)."""
        return frozenset(s.org_id for s in self.scopes if s.is_org)

    def describe(self) -> str:
        names = sorted(s.name for s in self.scopes)
        return ", ".join(names)
