"""The in-memory handoff backend (``backend = "memory"``): trainer ``save`` publishes, generator
``load`` pulls, at memory speed, through ``local`` (same process) or ``shm`` (same host).

Modules, one concept each: :mod:`.layout` (snapshot layout + JSON manifest), :mod:`.snapshot`
(bucketed gather/cast on publish, optional checksums), :mod:`.apply` (checked in-place copy on
load), :mod:`.transport` (versioned slots, leases, the no-torn-read protocol), :mod:`.local` and
:mod:`.shm` (the transports), :mod:`.segments` and :mod:`.lifetime` (private /dev/shm segments,
ownership, reclaiming what a killed publisher left), :mod:`.backend` (the Backend protocol).
"""

from .backend import SPEC, MemoryBackend, MemoryOptions
from .errors import ChannelBusyError, ChannelNotFoundError, PublisherGoneError, SlotsLeasedError, TornReadError


def reclaim_stale_segments(channel: str | None = None) -> list[str]:
    """Free /dev/shm segments left by dead publishers (one channel, or all of this user's);
    returns the removed paths. Live publishers' segments are never touched."""
    from .lifetime import reclaim
    from .segments import live_channel_names

    names = [channel] if channel is not None else live_channel_names()
    return [path for name in names for path in reclaim(name)]


__all__ = [
    "MemoryBackend",
    "MemoryOptions",
    "SPEC",
    "ChannelBusyError",
    "ChannelNotFoundError",
    "PublisherGoneError",
    "SlotsLeasedError",
    "TornReadError",
    "reclaim_stale_segments",
]
