"""``transport = "local"``: publisher and readers in one process (a colocated generator).

Channels live in a process-wide registry by name. Slots are byte buffers on the publisher's
device guarded by reader/writer locks, so readers on other threads (an async generator) get the
same no-torn-read promise as ``shm`` readers in other processes. A channel belongs to the
backend that first published on it until that backend closes (or is garbage collected); a
second publisher is refused.

A lease (:meth:`LocalTransport.pin`) is a shared hold on one slot; it is released explicitly or,
should its holder be dropped without releasing it, when the lease is garbage collected, so a
vanished reader never keeps a slot from the publisher.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from ...errors import StepNotFoundError
from .errors import ChannelBusyError, ChannelNotFoundError, SlotsLeasedError, TornReadError
from .layout import Layout
from .slot_lock import SlotLock
from .transport import (
    SPARE_SLOTS,
    WRITE_TIMEOUT_S,
    PinnedVersion,
    PublishTarget,
    ReadSource,
    SlotInfo,
    complete_steps,
    odd_after,
    slot_holding,
    take_first_free,
    write_order,
)


class _Slot:
    def __init__(self, index: int) -> None:
        self.index = index
        self.seq = 0
        self.step = -1
        self.order = 0
        self.layout: Layout | None = None
        self.data: torch.Tensor | None = None
        self.checksums: list[int] | None = None
        self.lock = SlotLock()

    def info(self) -> SlotInfo:
        before = self.seq
        step, order = self.step, self.order
        seq = before if self.seq == before else before | 1  # changed meanwhile: in flux
        return SlotInfo(self.index, seq, step, order)


class _Channel:
    def __init__(self, name: str, n_slots: int) -> None:
        """``n_slots``: the versions kept plus the spare (see :mod:`.transport`)."""
        self.name = name
        self.slots = [_Slot(i) for i in range(n_slots)]
        self.published = 0

    def infos(self) -> list[SlotInfo]:
        return [s.info() for s in self.slots]


_channels: dict[str, _Channel] = {}
_registry_lock = threading.Lock()


def local_channels() -> list[str]:
    with _registry_lock:
        return sorted(_channels)


def _release(name: str, channel: _Channel) -> None:
    with _registry_lock:
        if _channels.get(name) is channel:
            del _channels[name]
    for slot in channel.slots:
        slot.data = None  # a reader mid-copy still holds its own reference


class LocalTransport:
    kind = "local"

    def __init__(self, channel: str, keep_versions: int, write_timeout: float = WRITE_TIMEOUT_S) -> None:
        self.channel = channel
        self.keep_versions = keep_versions
        self.write_timeout = write_timeout
        self._owned: _Channel | None = None
        self._finalizer: weakref.finalize | None = None

    # ------------------------------------------------------------------ publisher
    def _claim(self) -> _Channel:
        if self._owned is not None:
            return self._owned
        with _registry_lock:
            if self.channel in _channels:
                raise ChannelBusyError(
                    f"local memory channel {self.channel!r} already has a publisher in this process; "
                    "one channel carries one model's versions: close that Checkpointer first or use another "
                    "[checkpoint.memory] channel",
                    self.channel,
                )
            owned = _channels[self.channel] = _Channel(self.channel, self.keep_versions + SPARE_SLOTS)
        self._owned = owned
        self._finalizer = weakref.finalize(self, _release, self.channel, owned)
        return owned

    @contextmanager
    def writing(
        self, step: int, layout: Layout, with_checksums: bool, device: torch.device | None = None
    ) -> Iterator[PublishTarget]:
        channel = self._claim()
        order = write_order(channel.infos(), step, self.keep_versions)
        index = take_first_free(order, lambda i: channel.slots[i].lock.try_exclusive(), self.write_timeout, self._all_held)
        slot = channel.slots[index]
        try:
            slot.seq = odd_after(slot.seq)
            slot.step = -1
            try:
                device = device or torch.device("cpu")
                if slot.data is None or slot.data.numel() != layout.nbytes or slot.data.device != device:
                    slot.data = None
                    slot.data = torch.empty(layout.nbytes, dtype=torch.uint8, device=device)
                target = PublishTarget(slot.data)
                yield target
                channel.published += 1
                slot.layout, slot.checksums, slot.order = layout, target.checksums, channel.published
                slot.step = step
                for other in channel.slots:  # a re-publish written beside a held copy of the same step
                    if other is not slot and other.step == step:
                        other.step = -1
            finally:
                slot.seq += 1  # even: complete, or empty after a failed fill
        finally:
            slot.lock.release_exclusive()

    def _all_held(self) -> SlotsLeasedError:
        return SlotsLeasedError(
            f"local channel {self.channel!r}: readers held all {self.keep_versions + SPARE_SLOTS} slots for more than "
            f"{self.write_timeout}s (each reader that adopted a version holds it until its next load or close)",
            self.channel,
        )

    def retire(self, step: int) -> None:
        """Hide ``step`` from listings; its bytes stay until the slot is written again, so a
        reader that holds it is neither waited for nor disturbed."""
        if self._owned is None:
            return
        held = slot_holding(self._owned.infos(), step)
        if held is not None:
            self._owned.slots[held.index].step = -1

    # ------------------------------------------------------------------ reader
    def _lookup(self) -> _Channel | None:
        if self._owned is not None:
            return self._owned
        with _registry_lock:
            return _channels.get(self.channel)

    def versions(self) -> list[int]:
        channel = self._lookup()
        return complete_steps(channel.infos()) if channel else []

    def _hold(self, step: int) -> tuple[_Slot, int, ReadSource]:
        """Lock the slot holding ``step`` shared (the caller releases it)."""
        channel = self._lookup()
        if channel is None:
            raise ChannelNotFoundError(
                f"no publisher on local memory channel {self.channel!r} in this process; "
                f"channels with a publisher: {local_channels()}",
                self.channel,
            )
        held = slot_holding(channel.infos(), step)
        if held is None:
            raise StepNotFoundError(
                f"version {step} is not held by local channel {self.channel!r}; held: {complete_steps(channel.infos())}"
            )
        slot = channel.slots[held.index]
        if not slot.lock.try_shared():
            raise StepNotFoundError(f"version {step} of local channel {self.channel!r} is being replaced")
        seq = slot.seq
        if seq % 2 or slot.step != step or slot.layout is None or slot.data is None:
            slot.lock.release_shared()
            raise StepNotFoundError(f"version {step} of local channel {self.channel!r} was replaced")
        label = f"local channel {self.channel!r} version {step}"
        return slot, seq, ReadSource(slot.layout, slot.data, slot.checksums, label)

    @contextmanager
    def reading(self, step: int) -> Iterator[ReadSource]:
        slot, seq, source = self._hold(step)
        try:
            yield source
            if slot.seq != seq:
                raise TornReadError(f"{source.label} changed while it was read", source.label)
        finally:
            slot.lock.release_shared()

    def pin(self, step: int) -> PinnedVersion:
        slot, _, source = self._hold(step)
        pinned = PinnedVersion(source, release=lambda: None)
        # Released once: explicitly, or when a holder that forgot to release is collected.
        pinned.release = weakref.finalize(pinned, slot.lock.release_shared)
        return pinned

    # ------------------------------------------------------------------ lifetime
    def reclaim_stale(self) -> list[str]:
        return []  # a process-local channel dies with its process

    def close(self) -> None:
        if self._finalizer is not None:
            self._finalizer()  # releases the channel once, now
        self._owned = None
