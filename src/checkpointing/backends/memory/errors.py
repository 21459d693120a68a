"""Errors a memory channel raises, so a reader can tell "not there yet" from "gone" from "taken".

They extend the library's typed errors (:mod:`checkpointing.errors`); none derives from
``StepNotFoundError`` on purpose: the manager treats that one as "a newer version replaced it,
list again", which is wrong when the whole channel is missing or its publisher is dead.
"""

from __future__ import annotations

from ...errors import CheckpointError, CorruptCheckpointError


class ChannelNotFoundError(CheckpointError, LookupError):
    """No live publisher has created this channel (never, or it closed and freed it)."""

    def __init__(self, message: str, channel: str):
        super().__init__(message)
        self.channel = channel


class ChannelBusyError(CheckpointError):
    """Another live publisher owns the channel; a channel carries one model's versions."""

    def __init__(self, message: str, channel: str, owner_pid: int | None = None):
        super().__init__(message)
        self.channel = channel
        self.owner_pid = owner_pid


class PublisherGoneError(CheckpointError):
    """The channel's publisher died without closing it: its versions are stale, and the
    segments stay until the next publisher or ``cleanup_partials()`` reclaims them."""

    def __init__(self, message: str, channel: str, owner_pid: int | None = None):
        super().__init__(message)
        self.channel = channel
        self.owner_pid = owner_pid


class TornReadError(CorruptCheckpointError):
    """A version changed while a reader copied it. The slot locks make this impossible; the
    sequence counters that raise it are the check that they keep doing so."""


class SlotsLeasedError(CheckpointError):
    """Readers held every slot of the channel for longer than a publish may wait: each holds a
    version its weights still view (a lease). A reader that died releases its lease (the
    kernel drops an ``shm`` reader's locks); live readers release theirs on their next load
    or on close()."""

    def __init__(self, message: str, channel: str):
        super().__init__(message)
        self.channel = channel
