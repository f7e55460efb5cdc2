"""Every Redis key the service writes, built in one place.

Layout: ``<prefix>:{<org>:<workspace>}:<mode>:<granularity>:<label>``, for example
``um:{acme:ws-1}:hll:w:2026-W53``. An org's own sketches (its members counted once across all of
its workspaces) sit under ``{<org>}``: ``um:{acme}:hll:d:2026-11-24``.

- The braces are a Redis Cluster hash tag: every key of one workspace hashes to one slot, so a
  pipeline, a multi-key ``PFCOUNT`` or an ``MGET`` over a workspace never fails with ``CROSSSLOT``.
- Ids may hold any characters (``:``, ``{``, ``}``, ``/``, spaces, unicode). Each id is
  percent-encoded over UTF-8 with nothing but ``A-Z a-z 0-9 _ . - ~`` left as is. That encoding is
  one-to-one and never emits ``:``, ``{`` or ``}``, so the ``:`` between org and workspace is
  unambiguous (``("a:b", "c")`` and ``("a", "b:c")`` get different keys) and an id can never
  close the hash tag early.
- The mode is part of the key: a set and a HyperLogLog can never meet under one name, so switching
  ``SKETCH_MODE`` starts empty instead of failing with ``WRONGTYPE``.

A *scope* is what one series of sketches counts: a workspace, or a whole org. Both are a
``Scope`` tuple; an org is ``Scope(org_id, "")``, which can never be a workspace because a
workspace id is never empty. Its hash tag ``{<org>}`` holds no ``:``, so no workspace tag can equal
it, and an org's keys never share a slot requirement with its workspaces': a query of one scope
never crosses slots, and org sketches are written at ingestion beside the workspace's rather than
unioned from many workspaces at query time.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple
from urllib.parse import quote, unquote

from sketches.periods import Period

MAX_ORG_ID = 128
MAX_WORKSPACE_ID = 128


class Scope(NamedTuple):
    """An (org, workspace) pair, or an org's own scope (``workspace_id == ""``). A named tuple
    rather than a frozen dataclass: it is built and hashed for every event on the consumer's hot
    path, where tuples are several times cheaper."""

    org_id: str
    workspace_id: str

    @property
    def is_org(self) -> bool:
        return not self.workspace_id

    @property
    def name(self) -> str:
        """How logs and errors name it: ``org/workspace``, or ``org <org>`` for an org's own."""
        return f"org {self.org_id}" if self.is_org else f"{self.org_id}/{self.workspace_id}"

    @property
    def org(self) -> Scope:
        """The org scope this workspace belongs to."""
        return Scope(self.org_id, ORG_SCOPE)


ORG_SCOPE = ""
"""The workspace id of an org's own scope."""


def org_scope(org_id: str) -> Scope:
    return Scope(org_id, ORG_SCOPE)


def text_of(value: Any) -> str:
    """A Redis reply's bytes (or anything else) as text: key names, fields and errors."""
    return value.decode() if isinstance(value, bytes) else str(value)


def encode_id(raw: str) -> str:
    return quote(raw, safe="", errors="strict")


def decode_id(encoded: str) -> str:
    return unquote(encoded, errors="strict")


def feed_member(scope: Scope) -> str:
    """A scope as a member of the settings feed: its hash tag without the braces. One-to-one
    (ids are percent-encoded, never holding ``:``), and never ``!`` or ``#...``, the feed's own
    members (``encode_id`` escapes both)."""
    if not scope.workspace_id:
        return encode_id(scope.org_id)
    return encode_id(scope.org_id) + ":" + encode_id(scope.workspace_id)


def parse_feed_member(member: str) -> Scope:
    """The inverse of ``feed_member``."""
    if ":" not in member:
        return org_scope(decode_id(member))
    org, ws = member.split(":")
    return Scope(decode_id(org), decode_id(ws))


SCOPES_CACHED = 1 << 18
"""Scopes whose key heads are kept (~150 B each): more than the 100,000 workspaces and 10,000
orgs the README sizes for, so that a batch of a live store never recomputes one. At 65,536 a
batch over 110,000 scopes evicted what it needed next and percent-encoded every id again."""


@functools.lru_cache(maxsize=SCOPES_CACHED)
def _hash_tag(org_id: str, workspace_id: str) -> str:
    # Cached: a query builds ~1,000 keys of one workspace and a batch thousands of a few hundred.
    if not workspace_id:
        return "{" + encode_id(org_id) + "}"
    return "{" + encode_id(org_id) + ":" + encode_id(workspace_id) + "}"


@functools.lru_cache(maxsize=SCOPES_CACHED)
def _scope_head(prefix: str, kind: str, ws: Scope) -> str:
    return f"{prefix}:{_hash_tag(ws.org_id, ws.workspace_id)}:{kind}"


@functools.lru_cache(maxsize=4096)
def _period_tail(period: Period) -> str:
    return f":{period.granularity.value}:{period.label}"


def _sketch_key(prefix: str, mode: str, ws: Scope, period: Period) -> str:
    """A scope's head and a period's tail, each cached on its own: a batch over 100,000 scopes
    builds 300,000 keys, which a cache of whole keys could not hold, while it holds every head
    and every period's tail at a fraction of the memory; joining them is one concatenation."""
    return _scope_head(prefix, "hll" if mode == "hll" else "set", ws) + _period_tail(period)


@dataclass(frozen=True, slots=True)
class KeySpace:
    prefix: str
    mode: Literal["hll", "exact"]

    def hash_tag(self, ws: Scope) -> str:
        return _hash_tag(ws.org_id, ws.workspace_id)

    def workspace_prefix(self, ws: Scope) -> str:
        """Everything of one workspace starts with this (used to scan or delete it)."""
        return f"{self.prefix}:{self.hash_tag(ws)}:"

    @property
    def kind(self) -> str:
        return "hll" if self.mode == "hll" else "set"

    def sketch(self, ws: Scope, period: Period) -> str:
        return _sketch_key(self.prefix, self.mode, ws, period)

    def meta(self, ws: Scope) -> str:
        """The scope's write bookkeeping, one hash (``sketches.writes``): its epoch ``e``, its
        counter ``n``, the stamp of each local day written (field = the day's ordinal), and
        ``b``, the generation a rebuild is filling."""
        return _scope_head(self.prefix, self.kind, ws) + ":meta"

    def building(self, ws: Scope, period: Period, generation: int) -> str:
        """A sketch of a rebuild's generation: the live key's name with ``~<generation>`` after
        the mode (``um:{acme:ws-1}:hll~3:d:2026-11-24``), so readers never see it."""
        live = self.sketch(ws, period)
        head = self.sketch_head(ws)
        return f"{head}~{generation}{live[len(head):]}"

    def registry(self, ws: Scope, generation: int) -> str:
        """The set of a rebuild generation's sketch keys (the write script adds each one it
        creates), which the switch renames to their live names."""
        return f"{self.sketch_head(ws)}~{generation}:keys"

    def sketch_head(self, ws: Scope) -> str:
        """What every live sketch key of the scope starts with, up to its mode: the write
        script inserts a generation there."""
        return _scope_head(self.prefix, self.kind, ws)

    def result(self, ws: Scope, variant: str) -> str:
        """A stored result of the scope (``variant`` names its timezone and week start)."""
        return f"{self.workspace_prefix(ws)}{self.kind}:result:{variant}"

    def settings(self, ws: Scope) -> str:
        return f"{self.workspace_prefix(ws)}settings"

    def offsets(self, topic: str, partition: int) -> str:
        """How far the store has applied one partition (the next offset to read).

        Written in the same pipeline as the batch's sketches, after them: Redis applies and logs
        a connection's commands in order, so a surviving record proves the writes before it
        survived. The hash tag is the partition, so each record sits in one cluster slot.
        """
        return f"{self.prefix}:offsets:{self.mode}:{{{encode_id(topic)}:{partition}}}"

    def settings_without_data(self, org_id: str) -> str:
        """The workspaces of one org that have settings but no data yet: a set, bounded per org
        (``sketches.scope_settings.save``), hash-tagged by the org."""
        return f"{self.prefix}:settings-without-data:{{{encode_id(org_id)}}}"

    def settings_feed(self) -> str:
        """Which scopes' settings changed, in order: one sorted set for every scope, each
        member an encoded scope (``feed_member``) scored by the number of its latest change,
        beside a counter member (``sketches.scope_settings``). One key in one cluster slot, so
        a consumer learns every change with one command per batch instead of one read per
        scope. Not per mode: settings are not."""
        return f"{self.prefix}:settings-feed:{{settings-feed}}"

    def settings_feed_lock(self) -> str:
        """Held while one process fills the feed from the stored settings (beside the feed)."""
        return f"{self.prefix}:settings-feed-lock:{{settings-feed}}"

    def parse_workspace(self, key: str) -> Scope:
        """The workspace of one of this keyspace's workspace keys (inverse of hash_tag)."""
        head = f"{self.prefix}:{{"
        if not key.startswith(head):
            raise ValueError(f"not a key of prefix {self.prefix!r}: {key!r}")
        tag = key[len(head) : key.index("}", len(head))]
        if ":" not in tag:
            return org_scope(decode_id(tag))
        org, ws = tag.split(":")
        return Scope(decode_id(org), decode_id(ws))
