"""A publisher's versions: snapshots of *its own shards*, served while training goes on.

``save(step)`` copies this rank's local tensors (its FSDP shards, or the whole model on a
single rank) into a slot: one flat buffer laid out by its layout, in the snapshot dtype, in one
batched copy. Readers are served from the slot, never from the live parameters, so the next
optimizer step cannot tear a version a reader is pulling. The slot protocol is the memory
backend's (:mod:`..memory.transport`): a save takes the slot of the same step, else an empty
one, else the oldest a reader is not pulling, under an exclusive lock (waiting, bounded, only
while readers pull every held version); a transfer pins its slot with a shared lock
taken without waiting (a slot being rewritten is "gone", not waited for).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..._compat import foreach_copy
from ..memory.slot_lock import SlotLock
from ..memory.transport import SlotInfo, complete_steps, odd_after, slot_holding, take_first_free, write_order
from .errors import PeerGoneError
from .layout import RankLayout


class _StillPulled(Exception):
    """A slot to retire is still pinned by a reader."""


class Slot:
    def __init__(self, index: int) -> None:
        self.index = index
        self.seq = 0
        self.step = -1
        self.order = 0
        self.data: torch.Tensor | None = None
        self.views: list[torch.Tensor] = []
        """One typed view per held tensor, shaped like this rank's box of it."""
        self.lock = SlotLock()

    def info(self) -> SlotInfo:
        return SlotInfo(self.index, self.seq, self.step, self.order)


def fill(views: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
    """Copy a version into a slot (casting to the snapshot dtype)."""
    foreach_copy(views, sources)


def typed_views(data: torch.Tensor, layout: RankLayout) -> list[torch.Tensor]:
    return [data[t.offset : t.offset + t.nbytes].view(t.dtype).view(t.box.shape) for t in layout.tensors]


class Snapshots:
    def __init__(self, keep: int, write_timeout_s: float) -> None:
        self.slots = [Slot(i) for i in range(keep)]
        self.published = 0
        self.write_timeout_s = write_timeout_s

    def infos(self) -> list[SlotInfo]:
        return [s.info() for s in self.slots]

    def versions(self) -> list[int]:
        return complete_steps(self.infos())

    def write(self, step: int, layout: RankLayout, sources: list[torch.Tensor], device: torch.device) -> None:
        order = write_order(self.infos(), step, len(self.slots))
        busy = lambda: PeerGoneError(
            f"readers have been pulling every held version for more than {self.write_timeout_s:g} s; "
            "this save needs a slot (raise [dist] keep_versions to let saves overtake slow readers)",
            "a reader",
        )
        slot = self.slots[take_first_free(order, lambda i: self.slots[i].lock.try_exclusive(), self.write_timeout_s, busy)]
        try:
            slot.seq = odd_after(slot.seq)
            slot.step = -1
            try:
                if slot.data is None or slot.data.numel() != layout.nbytes or slot.data.device != device:
                    slot.data, slot.views = None, []
                    slot.data = torch.empty(layout.nbytes, dtype=torch.uint8, device=device)
                    slot.views = typed_views(slot.data, layout)
                fill(slot.views, sources)
                self.published += 1
                slot.order, slot.step = self.published, step
            finally:
                slot.seq += 1  # even: complete, or empty after a failed fill
        finally:
            slot.lock.release_exclusive()

    def pin(self, step: int) -> Slot | None:
        """The slot holding ``step``, locked against rewriting until :meth:`unpin`; None when
        that version is not (or no longer) held."""
        held = slot_holding(self.infos(), step)
        if held is None:
            return None
        slot = self.slots[held.index]
        if not slot.lock.try_shared():
            return None
        if slot.seq % 2 or slot.step != step or slot.data is None:
            slot.lock.release_shared()
            return None
        return slot

    @staticmethod
    def unpin(slot: Slot) -> None:
        slot.lock.release_shared()

    def retire(self, step: int) -> None:
        held = slot_holding(self.infos(), step)
        if held is None:
            return
        slot = self.slots[held.index]
        try:
            take_first_free([held.index], lambda _: slot.lock.try_exclusive(), self.write_timeout_s, _StillPulled)
        except _StillPulled:
            return  # a reader still pulls it after write_timeout_s: it stays listed until the slot is rewritten
        try:
            slot.seq = odd_after(slot.seq)
            slot.step = -1
            slot.seq += 1
        finally:
            slot.lock.release_exclusive()

    def __iter__(self) -> Iterator[Slot]:
        return iter(self.slots)
