"""What a transport gives the memory backend: versioned slots, one writer, many readers.

A channel holds ``keep_versions`` slots. A publish takes the slot of the same step, else an
empty one, else the least recently published one, locks it *exclusively*, marks its sequence
counter odd, fills it, records the step and marks the counter even again. A reader locks the
slot of the version it wants *shared*, without waiting: if the writer holds it, that version is
being replaced and the reader is told so (StepNotFoundError: the manager lists again and takes
the new newest). So a reader never copies a slot while it is written, and the receiver's
tensors are never half from one version and half from another; the counters, read before and
after the copy, are the check that the locks keep that promise (TornReadError otherwise).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol

import torch

from .layout import Layout

WRITE_TIMEOUT_S = 120.0
"""How long a publish waits for a reader to finish copying the slot it must overwrite."""


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

    def retire(self, step: int) -> None: ...

    def reclaim_stale(self) -> list[str]: ...

    def close(self) -> None: ...


def complete_steps(slots: list[SlotInfo]) -> list[int]:
    return sorted(s.step for s in slots if s.complete)


def slot_for_write(slots: list[SlotInfo], step: int) -> int:
    """Same step (a re-publish replaces it), else an empty slot, else the oldest version."""
    for s in slots:
        if s.complete and s.step == step:
            return s.index
    for s in slots:
        if not s.complete:
            return s.index
    return min(slots, key=lambda s: s.order).index


def odd_after(seq: int) -> int:
    """The next "being written" value of a sequence counter (odd), whatever state a failed
    earlier write left it in."""
    return seq + 1 if seq % 2 == 0 else seq + 2


def slot_holding(slots: list[SlotInfo], step: int) -> SlotInfo | None:
    return next((s for s in slots if s.complete and s.step == step), None)
