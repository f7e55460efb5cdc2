"""Rebuilding a selection of scopes from the retained topic, at a cost that follows the selection.

A rebuild of one workspace among 100,000 used to parse every record of the topic and drop the
others' logins only when bucketing them (issue 17: 0.12 of a bare read). Here:

- **One pass for many scopes.** A ``Selection`` holds any number of workspaces and orgs' own
  scopes; the topic is read once for all of them.
- **Only the records that can hold the selection** (``consumer.recordfilter``): a value that
  cannot hold a selected id is skipped before JSON parsing, and when producers key records by
  workspace id (``KAFKA_RECORD_KEY=workspace``) only the partitions that can hold the selected
  workspaces are read, the setting checked on the fly.
- **Answers from the old sketches until the new ones are complete**: the store builds a new
  generation of each selected scope (``begin_rebuild``) before the topic's end offsets are
  taken, the replay writes only there, and ``finish_rebuild`` switches each scope in one step;
  any failure cancels the new generation and leaves the old one answering.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from consumer.recordfilter import RecordFilter
from consumer.replay import ReplayStart, replay
from consumer.selection import Selection
from sketches.keys import Scope

if TYPE_CHECKING:
    from consumer.replay import Progress, ReplayStats
    from sketches.config import Settings
    from sketches.store import SketchStore

log = logging.getLogger(__name__)


async def rebuild(
    settings: Settings,
    store: SketchStore,
    selection: Selection,
    *,
    progress: Progress | None = None,
    on_begin: Callable[[Mapping[Scope, int]], None] | None = None,
    take_over: bool = False,
) -> ReplayStats:
    """Rebuild the selection in one pass over the retained topic. The new generation of each
    scope is begun before the topic's end offsets are taken (so the live consumer's writes from
    then on reach it too), filled by the replay, and switched in one step per scope only once
    complete; on any failure the generations are cancelled and the old sketches go on
    answering. ``take_over`` replaces a rebuild of the same scopes that is running or died."""
    building = await store.begin_rebuild(sorted(selection.scopes), take_over=take_over)
    if on_begin is not None:
        on_begin(building)
    try:
        stats = await replay(
            settings, store, ReplayStart("beginning"), progress=progress,
            selection=selection, building=building,
            record_filter=RecordFilter(selection, settings.kafka_record_key == "workspace",
                                       settings.login_metric_type),
        )
        moved = await store.finish_rebuild(building)
    except BaseException:
        # Also after a switch that failed part-way: a scope already switched has no generation
        # left to cancel, so this only drops what was not switched.
        await _cancel(store, building)
        raise
    log.info("switched %s to the rebuilt sketches (%d keys)", selection.describe(), moved)
    return stats


async def _cancel(store: SketchStore, building: Mapping[Scope, int]) -> None:
    try:
        await store.cancel_rebuild(building)
    except Exception as err:  # noqa: BLE001 - the rebuild's own failure is the one to report
        log.error("could not cancel the rebuild's new generation (%s); the old sketches still "
                  "answer, a later rebuild of these scopes replaces it", err)
