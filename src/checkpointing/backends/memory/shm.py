"""``transport = "shm"``: a reader in another process on this host attaches by channel name.

Each slot is one private segment: a 128-byte header (magic, sequence counter, step, publish
order, manifest length + CRC32, data offset + length), the JSON manifest, then the snapshot
bytes at a page-aligned offset. Slot locks are ``flock`` locks on the slot segments, so they
work between processes, between threads, and vanish with a killed process. Readers map each
slot once and keep the mapping, so a load is a plain ``copy_`` out of shared pages, or no copy
at all: a lease (:meth:`ShmTransport.pin`) locks the slot through a descriptor of its own (flock
locks belong to an open file, so no other read can drop it) and keeps the mapping its views
point into alive (:meth:`.segments.Mapping.hold`) until it is released, whatever is remapped
meanwhile. A reader killed while it holds a lease loses the lock with its process, and the
publisher writes that slot again.
"""

from __future__ import annotations

import os
import struct
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

from ...commit import MAX_STEP
from ...errors import CheckpointError, CorruptCheckpointError, StepNotFoundError
from ...untrusted import describe
from .errors import ChannelNotFoundError, PublisherGoneError, SlotsLeasedError, TornReadError
from .layout import MAX_MANIFEST_BYTES, Layout, align, manifest_crc, parse_manifest
from .lifetime import ChannelInfo, Ownership, claim, owner_alive, read_control, reclaim
from .segments import (
    PAGE,
    Mapping,
    control_path,
    live_channel_names,
    open_private,
    reserve,
    shm_dir,
    slot_path,
    try_lock,
    unlock,
)
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

SLOT_MAGIC = b"TCKSLOT1"
_SLOT = struct.Struct("<8sQqQIIQQ")  # magic, seq, step, order, manifest len, manifest crc, data offset, data len
_SEQ = struct.Struct("<Q")
SEQ_AT = 8
_STEP = struct.Struct("<q")
STEP_AT = 16
MANIFEST_AT = 128
NOT_A_SLOT = -1


def empty_slot_header() -> bytes:
    return _SLOT.pack(SLOT_MAGIC, 0, -1, 0, 0, 0, 0, 0)


class _Segment:
    """One slot segment, mapped."""

    def __init__(self, path: str, fd: int, writable: bool, owns_fd: bool):
        self.path = path
        self.fd = fd
        self.writable = writable
        self.owns_fd = owns_fd
        size = os.fstat(fd).st_size
        # A reader maps the header only until it has checked what the header says: a planted
        # (or damaged) slot of any size is never faulted in whole.
        self.map = Mapping(fd, size if writable else min(size, MANIFEST_AT), writable, populate=writable)
        self._manifest: tuple[tuple, tuple[Layout, int, list[int] | None]] | None = None

    def remap(self, size: int) -> None:
        if self.map.size < size:
            self.map.close()
            self.map = Mapping(self.fd, size, self.writable)

    def seq(self) -> int:
        return _SEQ.unpack_from(self.map.buffer, SEQ_AT)[0]

    def header(self) -> tuple:
        return _SLOT.unpack_from(self.map.buffer, 0)

    def info(self, index: int) -> SlotInfo:
        """Read without a lock: a counter that moved, or is odd, marks the slot in flux."""
        if self.map.size < MANIFEST_AT:
            return SlotInfo(index, 1, NOT_A_SLOT, 0)
        before = self.seq()
        magic, _, step, order, *_ = self.header()
        after = self.seq()
        if magic != SLOT_MAGIC:
            return SlotInfo(index, 1, NOT_A_SLOT, 0)
        return SlotInfo(index, before if before == after else before | 1, step, order)

    def set_seq(self, seq: int) -> None:
        _SEQ.pack_into(self.map.buffer, SEQ_AT, seq)

    def hide(self) -> None:
        """Clear the step mark only (publisher side, no lock): listings stop showing the
        version, its bytes and counter stay for a reader that holds it."""
        _STEP.pack_into(self.map.buffer, STEP_AT, -1)

    def manifest(self, key: tuple, label: str) -> tuple[Layout, int, list[int] | None]:
        """Parsed manifest, cached while the slot keeps the same manifest bytes."""
        if self._manifest is not None and self._manifest[0] == key:
            return self._manifest[1]
        length, crc, data_len = key[0], key[1], key[3]
        raw = os.pread(self.fd, length, MANIFEST_AT)
        if manifest_crc(raw) != crc:
            raise CorruptCheckpointError(f"{label}: manifest fails its CRC32", self.path)
        known = self._manifest[1][0] if self._manifest is not None else None
        parsed = parse_manifest(raw, data_len, self.path, known)
        self._manifest = (key, parsed)
        return parsed

    def close(self) -> None:
        self.map.close()
        if self.owns_fd:
            os.close(self.fd)


class _Attachment:
    """A reader's view of a channel: the control segment, and its slot segments opened lazily."""

    def __init__(self, channel: str, fd: int, info: ChannelInfo, identity: tuple[int, int]):
        self.channel = channel
        self.fd = fd
        self.info = info
        self.identity = identity
        self._segments: dict[int, _Segment] = {}

    def segment(self, index: int) -> _Segment | None:
        seg = self._segments.get(index)
        if seg is None:
            path = slot_path(self.channel, self.info.gen, index)
            fd = open_private(path, writable=False)
            if fd is None:
                return None  # the channel is being released
            seg = self._segments[index] = _Segment(path, fd, writable=False, owns_fd=True)
        return seg

    def segments(self) -> list[_Segment | None]:
        return [self.segment(i) for i in range(self.info.slots)]

    def close(self) -> None:
        for seg in self._segments.values():
            seg.close()
        self._segments.clear()
        os.close(self.fd)


def _infos(segments: list[_Segment | None]) -> list[SlotInfo]:
    return [seg.info(i) if seg is not None else SlotInfo(i, 1, NOT_A_SLOT, 0) for i, seg in enumerate(segments)]


def _unpin(fd: int, mapping: Mapping) -> None:
    os.close(fd)  # drops the shared lock
    mapping.let_go()


class ShmTransport:
    kind = "shm"

    def __init__(self, channel: str, keep_versions: int, write_timeout: float = WRITE_TIMEOUT_S) -> None:
        shm_dir()
        self.channel = channel
        self.keep_versions = keep_versions
        self.write_timeout = write_timeout
        self._own: Ownership | None = None
        self._own_segments: list[_Segment] = []
        self._att: _Attachment | None = None

    # ------------------------------------------------------------------ publisher
    def _claim(self) -> list[_Segment]:
        if self._own is None:
            own = claim(self.channel, self.keep_versions + SPARE_SLOTS, PAGE, empty_slot_header())
            self._own = own
            self._own_segments = [
                _Segment(own.slot_path(i), fd, writable=True, owns_fd=False) for i, fd in enumerate(own.slot_fds)
            ]
            self._detach()
        return self._own_segments

    @contextmanager
    def writing(self, step: int, layout: Layout, with_checksums: bool, device=None) -> Iterator[PublishTarget]:
        if not (isinstance(step, int) and 0 <= step <= MAX_STEP):
            raise CheckpointError(
                f"shm channel {self.channel!r} cannot publish step {describe(step)}; allowed: an integer from 0 to {MAX_STEP} "
                "(slot headers store it as a signed 64-bit integer, -1 meaning empty)"
            )
        segments = self._claim()
        infos = _infos(list(segments))
        order = write_order(infos, step, self.keep_versions)
        seg = segments[take_first_free(order, lambda i: try_lock(segments[i].fd, exclusive=True), self.write_timeout, self._all_held)]
        try:
            seq = odd_after(seg.seq())
            _SLOT.pack_into(seg.map.buffer, 0, SLOT_MAGIC, seq, -1, 0, 0, 0, 0, 0)  # in flux, no version
            target: PublishTarget | None = None
            try:
                data_at = align(MANIFEST_AT + layout.manifest_budget(with_checksums), PAGE)
                end = data_at + layout.nbytes
                size = os.fstat(seg.fd).st_size
                if size < end:
                    reserve(seg.fd, seg.path, size, end)
                seg.remap(end)
                target = PublishTarget(seg.map.base[data_at:end])
                yield target
                manifest = layout.to_manifest(step, target.checksums)
                seg.map.buffer[MANIFEST_AT : MANIFEST_AT + len(manifest)] = manifest
                published = min(max(i.order for i in infos) + 1, (1 << 64) - 1)
                _SLOT.pack_into(
                    seg.map.buffer, 0, SLOT_MAGIC, seq, step, published, len(manifest), manifest_crc(manifest), data_at, layout.nbytes
                )
                for other, info in zip(segments, infos, strict=True):  # a re-publish written beside a held copy of the same step
                    if other is not seg and info.complete and info.step == step:
                        other.hide()
            finally:
                if target is not None:
                    target.data = None  # type: ignore[assignment]  # no view may outlive a remap
                seg.set_seq(seq + 1)  # even: complete, or empty after a failed fill
        finally:
            unlock(seg.fd)

    def _all_held(self) -> SlotsLeasedError:
        return SlotsLeasedError(
            f"shm channel {self.channel!r}: readers held all {self.keep_versions + SPARE_SLOTS} slots for more than "
            f"{self.write_timeout}s (each reader that adopted a version holds it until its next load or close; "
            "a killed reader's hold ends with its process)",
            self.channel,
        )

    def retire(self, step: int) -> None:
        """Hide ``step`` from listings without waiting for, or disturbing, a reader that holds it."""
        if self._own is None:
            return
        held = slot_holding(_infos(list(self._own_segments)), step)
        if held is not None:
            self._own_segments[held.index].hide()

    # ------------------------------------------------------------------ reader
    def _detach(self) -> None:
        att, self._att = self._att, None
        if att is not None:
            att.close()

    def _attach(self) -> _Attachment | None:
        """The channel as it is now; None when no publisher has it (never, or it closed)."""
        path = control_path(self.channel)
        try:
            st = os.stat(path, follow_symlinks=False)
        except FileNotFoundError:
            self._detach()
            return None
        att = self._att
        if att is None or att.identity != (st.st_dev, st.st_ino):
            self._detach()  # a new publisher took over: new generation of segments
            fd = open_private(path, writable=False)
            if fd is None:
                return None
            try:
                info = read_control(fd, path)
            except BaseException:
                os.close(fd)
                raise
            att = self._att = _Attachment(self.channel, fd, info, (st.st_dev, st.st_ino))
        if not owner_alive(att.fd):
            if os.fstat(att.fd).st_nlink == 0:  # closed (or reclaimed) while we looked
                self._detach()
                return None
            raise PublisherGoneError(
                f"the publisher of shm channel {self.channel!r} (pid {att.info.pid}) died without closing it; "
                "its versions are stale. A new publisher on this channel takes over, and cleanup_partials() "
                "(any new Checkpointer on the channel) frees its segments",
                self.channel,
                att.info.pid,
            )
        return att

    def _segments_for_reading(self) -> list[_Segment | None]:
        if self._own is not None:
            return list(self._own_segments)
        att = self._attach()
        if att is None:
            raise ChannelNotFoundError(
                f"no publisher on shm channel {self.channel!r} on this host; channels that exist for this user: "
                f"{live_channel_names()}",
                self.channel,
            )
        return att.segments()

    def versions(self) -> list[int]:
        if self._own is not None:
            return complete_steps(_infos(list(self._own_segments)))
        att = self._attach()
        return complete_steps(_infos(att.segments())) if att is not None else []

    def _held_segment(self, step: int) -> _Segment:
        segments = self._segments_for_reading()
        infos = _infos(segments)
        held = slot_holding(infos, step)
        if held is None:
            raise StepNotFoundError(f"version {step} is not held by shm channel {self.channel!r}; held: {complete_steps(infos)}")
        seg = segments[held.index]
        assert seg is not None
        return seg

    def _open_locked(self, seg: _Segment, step: int) -> tuple[int, ReadSource]:
        """(sequence counter, source) of ``step`` in ``seg``, which the caller has locked shared."""
        magic, seq, got_step, _, m_len, m_crc, data_at, data_len = seg.header()
        if magic != SLOT_MAGIC or seq % 2 or got_step != step:
            raise StepNotFoundError(f"version {step} of shm channel {self.channel!r} was replaced")
        label = f"shm channel {self.channel!r} version {step} ({seg.path})"
        st = os.fstat(seg.fd)
        end = data_at + data_len
        if m_len > MAX_MANIFEST_BYTES or MANIFEST_AT + m_len > data_at or data_at % PAGE or end > st.st_size:
            raise CorruptCheckpointError(
                f"{label}: header places the manifest ({m_len} B) or the data ({data_len} B at {data_at}) "
                f"outside the {st.st_size}-byte segment",
                seg.path,
            )
        if st.st_blocks * 512 < end:  # publishers reserve every byte up front (segments.reserve)
            raise CorruptCheckpointError(
                f"{label}: the segment has {st.st_blocks * 512} bytes of memory behind its first {end} "
                "(a sparse file no publisher wrote); refusing to fault it in",
                seg.path,
            )
        layout, version, checks = seg.manifest((m_len, m_crc, data_at, data_len), label)
        if version != step or layout.nbytes != data_len:
            raise CorruptCheckpointError(
                f"{label}: manifest describes version {version} of {layout.nbytes} bytes, the header {data_len}",
                seg.path,
            )
        seg.remap(end)
        return seq, ReadSource(layout, seg.map.base[data_at : data_at + data_len], checks, label)

    @contextmanager
    def reading(self, step: int) -> Iterator[ReadSource]:
        seg = self._held_segment(step)
        if not try_lock(seg.fd, exclusive=False):
            raise StepNotFoundError(f"version {step} of shm channel {self.channel!r} is being replaced")
        try:
            seq, source = self._open_locked(seg, step)
            yield source
            if seg.seq() != seq:
                raise TornReadError(f"{source.label} changed while it was read", seg.path)
        finally:
            unlock(seg.fd)

    def pin(self, step: int) -> PinnedVersion:
        seg = self._held_segment(step)
        fd = open_private(seg.path, writable=False)  # a lock of its own: flock belongs to the open file
        if fd is None:
            raise StepNotFoundError(f"version {step} of shm channel {self.channel!r} is gone (its publisher closed)")
        mapping = None
        try:
            if os.fstat(fd)[1:3] != os.fstat(seg.fd)[1:3] or not try_lock(fd, exclusive=False):
                raise StepNotFoundError(f"version {step} of shm channel {self.channel!r} is being replaced")
            _, source = self._open_locked(seg, step)
            mapping = seg.map
            mapping.hold()
        except BaseException:
            os.close(fd)
            raise
        pinned = PinnedVersion(source, release=lambda: None)
        # Released once: explicitly, or when a holder that forgot to release is collected
        # (and, whatever happens to this process, by the kernel when it exits).
        pinned.release = weakref.finalize(pinned, _unpin, fd, mapping)
        return pinned

    # ------------------------------------------------------------------ lifetime
    def reclaim_stale(self) -> list[str]:
        return reclaim(self.channel)

    def close(self) -> None:
        self._detach()
        for seg in self._own_segments:
            seg.close()
        self._own_segments = []
        own, self._own = self._own, None
        if own is not None:
            own.release()
