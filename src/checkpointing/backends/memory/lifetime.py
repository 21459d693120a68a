"""Who owns a shm channel, how a reader knows the owner is alive, and how stale segments go.

A channel is a small *control* segment (``titanckpt-{uid}-{channel}``) naming a generation of
slot segments (``titanckpt-{uid}-{channel}.{gen}.{i}``). Its publisher holds an exclusive
``flock`` on the control segment for as long as it lives; the kernel drops that lock when the
process dies, however it dies. So:

* liveness needs no pid (pids get reused): a lock nobody holds means a dead publisher;
* a second publisher finds the lock held and is refused (ChannelBusyError), or finds it free,
  reclaims the dead generation's segments under that same lock, and takes over;
* a channel is created aside: its control segment is born unnamed (``O_TMPFILE``), locked and
  filled, then named ``….new-{gen}`` while its slots are made, then linked into place. A reader
  never sees a half-written control segment, and a cleaner never sees a creator's segment
  unlocked.

Segments are removed slots first, control last, so every slot segment is always named by a
control or a half-created temp; ``reclaim`` sweeps both kinds when their holder is gone.
"""

from __future__ import annotations

import os
import secrets
import struct
import time
import zlib
from dataclasses import dataclass

from ...errors import CheckpointError, CorruptCheckpointError, UnsafeCheckpointError
from .errors import ChannelBusyError
from .segments import (
    GEN_RE,
    channel_files,
    channel_prefix,
    control_path,
    create_private,
    create_private_locked,
    lock_within,
    open_private,
    same_file,
    slot_path,
    temp_control_path,
    try_lock,
    unlink_quietly,
    unlock,
)

MAGIC = b"TCKCHAN1"
FORMAT = 1
MAX_SLOTS = 64
_HEADER = struct.Struct("<8sIIQ16sd")
CONTROL_BYTES = _HEADER.size + 4  # + crc32 of the header


@dataclass(frozen=True)
class ChannelInfo:
    gen: str
    slots: int
    pid: int
    created: float


def encode_control(info: ChannelInfo) -> bytes:
    head = _HEADER.pack(MAGIC, FORMAT, info.slots, info.pid, info.gen.encode(), info.created)
    return head + struct.pack("<I", zlib.crc32(head) & 0xFFFFFFFF)


def read_control(fd: int, path: str) -> ChannelInfo:
    raw = os.pread(fd, CONTROL_BYTES, 0)
    if len(raw) != CONTROL_BYTES:
        raise CorruptCheckpointError(f"shm control segment {path} is truncated ({len(raw)} bytes)", path)
    head, (crc,) = raw[: _HEADER.size], struct.unpack("<I", raw[_HEADER.size :])
    magic, fmt, slots, pid, gen, created = _HEADER.unpack(head)
    if magic != MAGIC or zlib.crc32(head) & 0xFFFFFFFF != crc:
        raise CorruptCheckpointError(f"shm control segment {path} is damaged (bad magic or checksum)", path)
    gen_text = gen.decode("ascii", "replace")
    if fmt != FORMAT or not 1 <= slots <= MAX_SLOTS or not GEN_RE.fullmatch(gen_text):
        raise CorruptCheckpointError(f"shm control segment {path} has format {fmt}, {slots} slots, gen {gen!r}", path)
    return ChannelInfo(gen_text, slots, pid, created)


def _read_control_or_none(fd: int, path: str) -> ChannelInfo | None:
    try:
        return read_control(fd, path)
    except CorruptCheckpointError:
        return None


def owner_alive(fd: int) -> bool:
    """A shared probe fails only while someone holds the exclusive lock: the publisher."""
    if try_lock(fd, exclusive=False):
        unlock(fd)
        return False
    return True


class Ownership:
    """A publisher's hold on its channel: the control segment, locked exclusively for life."""

    def __init__(self, channel: str, fd: int, info: ChannelInfo, slot_fds: list[int]):
        self.channel = channel
        self.fd = fd
        self.info = info
        self.slot_fds = slot_fds

    def slot_path(self, index: int) -> str:
        return slot_path(self.channel, self.info.gen, index)

    def release(self) -> None:
        """Free every segment; readers still copying keep their mappings until they finish."""
        for i, fd in enumerate(self.slot_fds):
            unlink_quietly(self.slot_path(i))
            os.close(fd)
        self.slot_fds = []
        path = control_path(self.channel)
        if same_file(self.fd, path):
            unlink_quietly(path)
        os.close(self.fd)  # drops the lock last


class _SweptWhileCreating(CheckpointError):
    """A concurrent ``reclaim`` took our half-created channel for a dead creator's."""


def claim(channel: str, n_slots: int, slot_bytes: int, empty_slot_header: bytes) -> Ownership:
    """Create the channel and own it, taking over from a dead publisher if there was one."""
    for attempt in range(3):
        try:
            return _claim_once(channel, n_slots, slot_bytes, empty_slot_header)
        except _SweptWhileCreating:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def _claim_once(channel: str, n_slots: int, slot_bytes: int, empty_slot_header: bytes) -> Ownership:
    gen = secrets.token_hex(8)
    tmp = temp_control_path(channel, gen)
    info = ChannelInfo(gen, n_slots, os.getpid(), time.time())
    fd = create_private_locked(tmp, encode_control(info))
    slot_fds: list[int] = []
    try:
        if not same_file(fd, tmp):  # only without O_TMPFILE: a cleaner saw it before our lock
            raise _SweptWhileCreating(f"creating shm channel {channel!r} raced with a cleanup three times")
        for i in range(n_slots):
            slot_fds.append(create_private(slot_path(channel, gen, i), slot_bytes))
            os.pwrite(slot_fds[-1], empty_slot_header, 0)
        _link_into_place(channel, tmp)
        unlink_quietly(tmp)
        return Ownership(channel, fd, info, slot_fds)
    except BaseException:
        for i, sfd in enumerate(slot_fds):
            os.close(sfd)
            unlink_quietly(slot_path(channel, gen, i))
        if same_file(fd, tmp):
            unlink_quietly(tmp)
        os.close(fd)
        raise


def _link_into_place(channel: str, tmp: str) -> None:
    path = control_path(channel)
    for _ in range(5):
        try:
            os.link(tmp, path)
            return
        except FileExistsError:
            pass
        state, info = _reclaim_control(channel, [])
        if state == "live":
            pid = info.pid if info else None
            raise ChannelBusyError(
                f"shm channel {channel!r} already has a live publisher (pid {pid}); one channel carries one "
                "model's versions: stop that publisher or use another [checkpoint.memory] channel",
                channel,
                pid,
            )
    raise ChannelBusyError(f"shm channel {channel!r}: another process keeps claiming it", channel)


def _reclaim_control(channel: str, removed: list[str]) -> tuple[str, ChannelInfo | None]:
    """("absent" | "removed" | "live", info): remove the control segment and its generation's
    slots if, and only if, no publisher holds it."""
    path = control_path(channel)
    fd = open_private(path, writable=False)
    if fd is None:
        return "absent", None
    try:
        if owner_alive(fd) or not lock_within(fd, exclusive=True, timeout=1.0):
            return "live", _read_control_or_none(fd, path)
        try:
            if not same_file(fd, path):
                return "absent", None
            info = _read_control_or_none(fd, path)
            if info is not None:
                _remove_generation(channel, info.gen, removed)
            if unlink_quietly(path):
                removed.append(path)
            return "removed", info
        finally:
            unlock(fd)
    finally:
        os.close(fd)


def _remove_generation(channel: str, gen: str, removed: list[str]) -> None:
    marker = f"{channel_prefix(channel)}.{gen}."
    for path in channel_files(channel):
        if os.path.basename(path).startswith(marker) and unlink_quietly(path):
            removed.append(path)


def reclaim(channel: str) -> list[str]:
    """Remove every segment of ``channel`` whose holder is dead; returns the removed paths.

    Safe to call at any time from any process: a live publisher's segments are never touched.
    """
    removed: list[str] = []
    state, info = _reclaim_control(channel, removed)
    protected = {info.gen} if state == "live" and info else set()
    prefix = channel_prefix(channel)
    for path in channel_files(channel):
        name = os.path.basename(path)
        if name.startswith(prefix + ".new-"):
            gen = name[len(prefix) + 5 :]
            if GEN_RE.fullmatch(gen) and not _sweep_temp(channel, path, gen, removed):
                protected.add(gen)
    for path in channel_files(channel):
        slot_gen = _slot_gen(channel, os.path.basename(path))
        if slot_gen is None or slot_gen in protected or _generation_held(channel, slot_gen):
            continue
        if unlink_quietly(path):
            removed.append(path)
    return removed


def _sweep_temp(channel: str, path: str, gen: str, removed: list[str]) -> bool:
    """Remove a half-created channel whose creator died; False while its creator lives."""
    try:
        fd = open_private(path, writable=False)
    except UnsafeCheckpointError:
        return False
    if fd is None:
        return True
    try:
        if not try_lock(fd, exclusive=True):
            return False
        try:
            if same_file(fd, path):
                _remove_generation(channel, gen, removed)
                if unlink_quietly(path):
                    removed.append(path)
        finally:
            unlock(fd)
        return True
    finally:
        os.close(fd)


def _slot_gen(channel: str, name: str) -> str | None:
    prefix = channel_prefix(channel) + "."
    if not name.startswith(prefix):
        return None
    parts = name[len(prefix) :].split(".")
    if len(parts) == 2 and GEN_RE.fullmatch(parts[0]) and parts[1].isdigit():
        return parts[0]
    return None


def _generation_held(channel: str, gen: str) -> bool:
    """Is ``gen`` named by a half-created temp or by the current control segment? (Checked in
    that order: a creator links the control before it removes its temp.)"""
    if os.path.lexists(temp_control_path(channel, gen)):
        return True
    try:
        fd = open_private(control_path(channel), writable=False)
    except UnsafeCheckpointError:
        return True
    if fd is None:
        return False
    try:
        info = _read_control_or_none(fd, control_path(channel))
        return info is None or info.gen == gen
    finally:
        os.close(fd)
