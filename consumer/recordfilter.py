"""Which records a rebuild reads and parses, at a cost that follows its selection
(``consumer.rebuild`` has the whole story).

- **A prefilter on the raw bytes** (``Prefilter``): a record whose value cannot hold any selected
  id is skipped before JSON parsing. A JSON string without a backslash is its characters'
  UTF-8 between two quotes, so a value without a backslash can hold a selected login only if it
  holds the quoted UTF-8 of the workspace id and of the org id. A value with a backslash is
  always parsed: an escape (``\\/``, ``\\u0041``) may spell any character of an id. An id
  holding ``"``, ``\\``, a control character or a lone surrogate has no unescaped spelling (the
  parsers refuse those raw), so only values with a backslash can hold it.
- **Only the partitions that can hold the workspaces** when producers key records by workspace
  id (``KAFKA_RECORD_KEY=workspace``): Kafka's default partitioner puts key ``k`` in partition
  ``murmur2(k) & 0x7fffffff % partitions``. An org's own scope needs every record of the org,
  which lies in every partition, so a selection with an org reads them all. The setting is
  verified on the fly (``KeyedPartitions``): a record of a read partition without a key, with a
  key the partitioner would have put elsewhere, or (a parsed login, or a sampled skipped record)
  whose workspace id is not its key fails the rebuild before the switch.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence

import orjson
from aiokafka.partitioner import murmur2

from consumer.batch import Parsed, Record
from consumer.selection import Selection
from sketches.errors import UsageMetricsError

log = logging.getLogger(__name__)

# Above this many quoted ids, a value's string tokens are looked up in a set instead of each id
# being searched for in the value: the cost per record then stops growing with the selection.
FEW_NEEDLES = 8
# One skipped record in this many is parsed to check that its key is its workspace id.
KEY_SAMPLE_EVERY = 32
_STRING = re.compile(rb'"([^"]*)"')


class WrongRecordKey(UsageMetricsError):
    """``KAFKA_RECORD_KEY=workspace`` while the topic's producers do not key records by workspace
    id with Kafka's default partitioner: reading only some partitions would miss logins."""


def quoted(raw: str) -> bytes | None:
    """How an id appears in a JSON value that holds no backslash: its UTF-8 between quotes; None
    when it cannot appear there (a ``"``, a ``\\``, a control character or a lone surrogate must
    be escaped, and both parsers refuse them raw)."""
    if '"' in raw or "\\" in raw or any(ord(c) < 0x20 for c in raw):
        return None
    try:
        return b'"' + raw.encode("utf-8") + b'"'
    except UnicodeEncodeError:
        return None


class Prefilter:
    """``prefilter(value)`` is False only for a record value that cannot hold a login of the
    selection, so that skipping it changes nothing the full parse would count. Pure: the answer
    depends on the value and the selection alone."""

    def __init__(self, selection: Selection) -> None:
        orgs: set[bytes] = set()
        pairs: set[tuple[bytes, bytes]] = set()
        for scope in selection.scopes:
            org = quoted(scope.org_id)
            if org is None:
                continue  # only a value with a backslash can hold it: always parsed
            if scope.is_org:
                orgs.add(org)
                continue
            ws = quoted(scope.workspace_id)
            if ws is not None:
                pairs.add((org, ws))
        # A workspace of a selected org is read for the org anyway.
        pairs = {(o, w) for o, w in pairs if o not in orgs}
        self.orgs = tuple(sorted(orgs))
        self.pairs = tuple(sorted(pairs))
        # The token form: ids without their quotes, and each workspace id's orgs.
        self._org_set = frozenset(o[1:-1] for o in orgs)
        by_ws: dict[bytes, set[bytes]] = {}
        for o, w in pairs:
            by_ws.setdefault(w[1:-1], set()).add(o[1:-1])
        self._orgs_of_ws = {w: frozenset(os) for w, os in by_ws.items()}
        self._few = len(self.orgs) + 2 * len(self.pairs) <= FEW_NEEDLES

    def __call__(self, value: bytes | None) -> bool:
        if value is None:
            return False  # never a login: a bad message, counted by the live consumer
        if b"\\" in value:
            return True
        if self._few:
            for org in self.orgs:
                if org in value:
                    return True
            return any(ws in value and org in value for org, ws in self.pairs)
        tokens = set(_STRING.findall(value))
        if not self._org_set.isdisjoint(tokens):
            return True
        orgs_of_ws = self._orgs_of_ws
        for token in tokens:
            orgs = orgs_of_ws.get(token)
            if orgs is not None and not orgs.isdisjoint(tokens):
                return True
        return False


def default_partition(key: bytes, partitions: int) -> int:
    """Where Kafka's default partitioner (the Java client's; librdkafka's ``murmur2_random``;
    aiokafka's) puts a record with this key."""
    return (int(murmur2(key)) & 0x7FFFFFFF) % partitions


def workspace_key(workspace_id: str) -> bytes:
    """The record key of a producer that keys by workspace id: the id's UTF-8."""
    return workspace_id.encode("utf-8", "surrogatepass")


class KeyedPartitions:
    """Under ``KAFKA_RECORD_KEY=workspace``: which partitions a rebuild reads, and the checks
    that producers do key by workspace id with the default partitioner."""

    def __init__(self, selection: Selection, login_type: str) -> None:
        self.selection = selection
        self.login_type = login_type
        self.keys = frozenset(workspace_key(ws.workspace_id) for ws in selection.workspaces)
        self._home: dict[bytes, int] = {}
        self._count: int | None = None
        self._seen = 0

    def partitions(self, count: int) -> list[int] | None:
        """The partitions that can hold the selection, or None for all of them (an org's own
        scope needs every record of the org)."""
        self._count = count
        if self.selection.orgs:
            return None
        return sorted({default_partition(k, count) for k in self.keys})

    def _fail(self, record: Record, why: str) -> WrongRecordKey:
        return WrongRecordKey(
            f"KAFKA_RECORD_KEY=workspace, but the record at partition {record.partition} offset "
            f"{record.offset} of {record.topic} {why}: the topic's producers do not key records "
            "by workspace id with Kafka's default partitioner (murmur2), or partitions were "
            "added since. Reading only some partitions would miss logins, so nothing was "
            "switched; rebuild with KAFKA_RECORD_KEY=none"
        )

    def check_record(self, record: Record) -> None:
        """Every record of a read partition: it has a key, and the partitioner puts that key
        here."""
        key = record.key
        if key is None:
            raise self._fail(record, "has no key")
        home = self._home.get(key)
        if home is None:
            assert self._count is not None, "partitions() first"
            home = self._home[key] = default_partition(key, self._count)
        if home != record.partition:
            raise self._fail(record, f"has a key the default partitioner puts in partition {home}")

    def sampled(self) -> bool:
        """Whether this skipped record is one of those parsed to check its key."""
        self._seen += 1
        return self._seen % KEY_SAMPLE_EVERY == 1

    def check_value(self, record: Record) -> None:
        """A skipped record, parsed: a login whose workspace id is not its key fails."""
        try:
            obj = orjson.loads(record.value) if record.value is not None else None
        except orjson.JSONDecodeError:
            return
        if not isinstance(obj, dict) or obj.get("metric_type") != self.login_type:
            return
        ws = obj.get("workspace_id")
        if isinstance(ws, str) and ws and workspace_key(ws) != record.key:
            raise self._fail(record, f"holds workspace {ws[:64]!r} under key {record.key!r:.80}")

    def check_logins(self, parsed: Parsed) -> None:
        """Every parsed login: its key is its workspace id."""
        for login, record in zip(parsed.logins, parsed.sources, strict=True):
            if workspace_key(login.workspace.workspace_id) != record.key:
                raise self._fail(record, f"holds workspace {login.workspace.workspace_id[:64]!r} "
                                         f"under key {record.key!r:.80}")


class RecordFilter:
    """What replay asks of a rebuild: the partitions to read, the records to parse, and the
    checks of the parsed ones."""

    def __init__(self, selection: Selection, keyed: bool, login_type: str) -> None:
        self.selection = selection
        self.prefilter = Prefilter(selection)
        self.keyed = KeyedPartitions(selection, login_type) if keyed else None

    def partitions(self, count: int) -> list[int] | None:
        return self.keyed.partitions(count) if self.keyed is not None else None

    def select(self, records: Sequence[Record]) -> list[Record]:
        keep = self.prefilter
        keyed = self.keyed
        if keyed is None:
            return [r for r in records if keep(r.value)]
        out: list[Record] = []
        mine = keyed.keys
        for r in records:
            keyed.check_record(r)
            if r.key in mine or keep(r.value):
                # A record keyed by a selected workspace is parsed whatever it holds, so that a
                # login of another workspace under that key is seen.
                out.append(r)
            elif keyed.sampled():
                keyed.check_value(r)
        return out

    def check(self, parsed: Parsed) -> None:
        if self.keyed is not None:
            self.keyed.check_logins(parsed)
