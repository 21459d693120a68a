"""What a transport gives the memory backend: versioned slots, one writer, many readers.

A channel holds ``keep_versions + 1`` slots: ``keep_versions`` for the versions it keeps, and
one spare so that a reader may *lease* a version (hold it, zero-copy, for as long as its weights
view it) without ever stopping the publisher (N+1 buffering). A publish tries the slots in the
order :func:`write_order` gives (the same step, else an empty slot while fewer than
``keep_versions`` versions exist, else the oldest version, else the spare) and takes the first
one it can lock *exclusively* without waiting: a slot a reader holds is skipped, never
overwritten. Only when readers hold every slot does the publish wait, bounded, and then fail
with :class:`~.errors.SlotsLeasedError`. It marks the slot's sequence counter odd, fills it,
records the step and marks the counter even again.

A reader locks the slot of the version it wants *shared*, without waiting: if the writer holds
it, that version is being replaced and the reader is told so (StepNotFoundError: the manager
lists again and takes the new newest). A copy holds that lock for the copy; a lease (see
:meth:`Transport.pin`) until it is released. So a reader never copies a slot while it is
written, and a leased version's bytes never change; the counters, read before and after a copy,
are the check that the locks keep that promise (TornReadError otherwise). Retiring a version
only hides it from listings (its step mark is cleared, its bytes and counter stay), so it never
waits for, nor disturbs, a reader that holds it.

A lease dies with its holder: ``shm`` slot locks are ``flock`` locks that the kernel drops when
the holding process dies, and a ``local`` lease is released when its holder is garbage collected.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol

import torch

from .layout import Layout

WRITE_TIMEOUT_S = 120.0
"""How long a publish waits for a free slot while readers hold every one."""
SPARE_SLOTS = 1
"""Slots beyond ``keep_versions``: what lets a reader lease a version without blocking the publisher."""


@dataclass(frozen=True)
class SlotInfo:
    index: int
    seq: int
    step: int
    order: int
    """Publish counter of the slot's version: the smallest one is the oldest."""

    @property
    def complete(self) -> bool:
        return self.seq % 2 == 0 and self.step >= 0


@dataclass
class PublishTarget:
    """The bytes a publish fills, and what it records beside them."""

    data: torch.Tensor
    checksums: list[int] | None = None


@dataclass(frozen=True)
class ReadSource:
    layout: Layout
    data: torch.Tensor
    checksums: list[int] | None
    label: str
    """Where the version lives, for error messages (channel, version, segment)."""


@dataclass
class PinnedVersion:
    """A version a reader holds: its bytes stay as they are until ``release()`` (idempotent)."""

    source: ReadSource
    release: Callable[[], None]


class Transport(Protocol):
    kind: str
    channel: str

    def versions(self) -> list[int]: ...

    def writing(
        self, step: int, layout: Layout, with_checksums: bool, device: torch.device | None = None
    ) -> AbstractContextManager[PublishTarget]:
        """``device``: where the publisher's tensors live; a transport that can, keeps the
        snapshot there (``local`` does; ``shm`` segments are host memory by nature)."""

    def reading(self, step: int) -> AbstractContextManager[ReadSource]: ...

    def pin(self, step: int) -> PinnedVersion:
        """Hold ``step`` until released: the publisher writes other slots meanwhile. Raises
        StepNotFoundError when the version is gone or being replaced (the caller lists again)."""

    def retire(self, step: int) -> None: ...

    def reclaim_stale(self) -> list[str]: ...

    def close(self) -> None: ...


def complete_steps(slots: list[SlotInfo]) -> list[int]:
    return sorted(s.step for s in slots if s.complete)


def write_order(slots: list[SlotInfo], step: int, keep_versions: int) -> list[int]:
    """Slot indices a publish of ``step`` tries, best first: the same step (a re-publish
    replaces it), then empty slots while fewer than ``keep_versions`` versions are held, then
    the versions oldest first, then the spare. A slot a reader holds is skipped by the caller."""
    same = [s.index for s in slots if s.complete and s.step == step]
    versions = [s.index for s in sorted(slots, key=lambda s: s.order) if s.complete and s.step != step]
    empty = [s.index for s in slots if not s.complete]
    return same + (empty + versions if len(versions) < keep_versions else versions + empty)


def take_first_free(order: list[int], try_take: Callable[[int], bool], timeout: float, busy: Callable[[], Exception]) -> int:
    """The first slot of ``order`` that ``try_take`` locks without waiting; while readers hold
    them all, try again (backing off) for up to ``timeout`` seconds, then raise ``busy()``."""
    deadline = time.monotonic() + timeout
    pause = 0.0002
    while True:
        for index in order:
            if try_take(index):
                return index
        if time.monotonic() >= deadline:
            raise busy()
        time.sleep(pause)
        pause = min(pause * 2, 0.01)


def odd_after(seq: int) -> int:
    """The next "being written" value of a sequence counter (odd), whatever state a failed
    earlier write left it in."""
    return seq + 1 if seq % 2 == 0 else seq + 2


def slot_holding(slots: list[SlotInfo], step: int) -> SlotInfo | None:
    return next((s for s in slots if s.complete and s.step == step), None)
