"""Shared-memory segments as private files under /dev/shm: naming, opening, locking, mapping.

Why files and not ``multiprocessing.shared_memory``: its resource tracker unlinks segments when
the *creating* process exits (and warns about "leaks" in every other one), and it cannot set a
mode. Plain files on the tmpfs give us what we need: ``O_EXCL`` creation with mode 0600,
``O_NOFOLLOW`` and an owner/mode check on every open (a segment planted by another user, or a
symlink, is refused), ``flock`` locks that the kernel drops when a process dies (so a SIGKILLed
publisher or reader never leaves a lock behind), and ``mmap`` for zero-copy tensors.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import re
import stat
import threading
import time
import warnings

import torch

from ...errors import CheckpointError, UnsafeCheckpointError
from ...untrusted import kind_of, open_regular

SHM_DIR = "/dev/shm"
PREFIX = "titanckpt"
PAGE = mmap.PAGESIZE
CHANNEL_RE = re.compile(r"[A-Za-z0-9_-]{1,128}")
GEN_RE = re.compile(r"[0-9a-f]{16}")


def shm_dir() -> str:
    if not os.path.isdir(SHM_DIR):
        raise CheckpointError(
            f"[checkpoint.memory] transport = 'shm' needs a tmpfs at {SHM_DIR} (Linux); "
            "use transport = 'local' for a generator in the same process"
        )
    return SHM_DIR


def channel_prefix(channel: str) -> str:
    """Segments are namespaced by user id: two users' channels of the same name never meet."""
    return f"{PREFIX}-{os.geteuid()}-{channel}"


def control_path(channel: str) -> str:
    return os.path.join(shm_dir(), channel_prefix(channel))


def slot_path(channel: str, gen: str, index: int) -> str:
    return os.path.join(shm_dir(), f"{channel_prefix(channel)}.{gen}.{index}")


def temp_control_path(channel: str, gen: str) -> str:
    return os.path.join(shm_dir(), f"{channel_prefix(channel)}.new-{gen}")


def channel_files(channel: str) -> list[str]:
    """Every segment of ``channel`` (control, slots, half-created temps), as paths."""
    d = shm_dir()
    prefix = channel_prefix(channel)
    return sorted(os.path.join(d, n) for n in os.listdir(d) if n == prefix or n.startswith(prefix + "."))


def live_channel_names() -> list[str]:
    """Channels of this user that have a control segment (live or stale)."""
    d = shm_dir()
    head = f"{PREFIX}-{os.geteuid()}-"
    return sorted(n[len(head) :] for n in os.listdir(d) if n.startswith(head) and "." not in n[len(head) :])


# ---------------------------------------------------------------------------- files
def create_private(path: str, size: int) -> int:
    """A new segment only this user can read, with ``size`` bytes of memory reserved up front
    (so running out of /dev/shm is an error here, not a SIGBUS in the middle of a copy)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # whatever the umask says
        if size:
            reserve(fd, path, 0, size)
    except BaseException:
        os.close(fd)
        unlink_quietly(path)
        raise
    return fd


def create_private_locked(path: str, content: bytes) -> int:
    """A new private segment holding ``content`` whose exclusive lock is taken *before* its name
    appears (an unnamed ``O_TMPFILE`` linked into place), so no other process can ever see it
    unlocked and take its creator for dead. Without ``O_TMPFILE``: create, then lock, and the
    caller must check ``same_file`` afterwards."""
    try:
        fd = os.open(os.path.dirname(path), os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    except (AttributeError, OSError):
        fd = create_private(path, 0)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.pwrite(fd, content, 0)
        return fd
    try:
        os.fchmod(fd, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.pwrite(fd, content, 0)
        # linkat(AT_SYMLINK_FOLLOW) on the /proc link names the open file itself; CPython only
        # calls linkat (not link) when given a dir fd.
        dir_fd = os.open(os.path.dirname(path), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.link(f"/proc/self/fd/{fd}", os.path.basename(path), dst_dir_fd=dir_fd, follow_symlinks=True)
        finally:
            os.close(dir_fd)
    except BaseException:
        os.close(fd)
        raise
    return fd


def reserve(fd: int, path: str, start: int, end: int) -> None:
    try:
        os.ftruncate(fd, end)
        os.posix_fallocate(fd, start, end - start)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.ENOMEM):
            raise CheckpointError(
                f"not enough shared memory for {end} bytes in {path}: {SHM_DIR} is full "
                "(df -h /dev/shm); free it or lower [checkpoint.memory] keep_versions"
            ) from None
        raise


def open_private(path: str, writable: bool) -> int | None:
    """Open an existing segment, refusing anything this user did not create privately: a
    symlink, a FIFO or device (which another local user can plant under our channel's name in
    the world-writable /dev/shm; opened without blocking and refused), a file of another user
    or one others can read. None when it does not exist (a publisher closed it meanwhile)."""
    try:
        fd = open_regular(path, "shared-memory segment", writable=writable)
    except FileNotFoundError:
        return None
    try:
        check_private(fd, path)
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_private(fd: int, path: str) -> None:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise UnsafeCheckpointError(f"shared-memory segment {path} is {kind_of(st.st_mode)}, not a regular file", path)
    if st.st_uid != os.geteuid():
        raise UnsafeCheckpointError(
            f"shared-memory segment {path} belongs to uid {st.st_uid}, not to this user ({os.geteuid()}); "
            "refusing to read weights another user could have written",
            path,
        )
    if st.st_mode & 0o077:
        raise UnsafeCheckpointError(
            f"shared-memory segment {path} has mode {stat.S_IMODE(st.st_mode):04o}; segments must be private (0600)",
            path,
        )


def same_file(fd: int, path: str) -> bool:
    """Is ``fd`` still the file named ``path``? (It was not unlinked or replaced meanwhile.)"""
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def unlink_quietly(path: str) -> bool:
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False


# ---------------------------------------------------------------------------- locks
def try_lock(fd: int, exclusive: bool) -> bool:
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def lock_within(fd: int, exclusive: bool, timeout: float) -> bool:
    """Poll for the lock (a blocking flock could not be given up on)."""
    deadline = time.monotonic() + timeout
    pause = 0.0002
    while not try_lock(fd, exclusive):
        if time.monotonic() >= deadline:
            return False
        time.sleep(pause)
        pause = min(pause * 2, 0.01)
    return True


def unlock(fd: int) -> None:
    fcntl.flock(fd, fcntl.LOCK_UN)


# ---------------------------------------------------------------------------- mappings
class Mapping:
    """The first ``size`` bytes of a segment mapped into this process, with a uint8 tensor over
    them. ``populate`` faults every page in now rather than mid-copy; a reader asks for it only
    for a byte range it has checked (a planted sparse segment is never faulted in whole).

    Unmapping under a live tensor view would make every later read of that view fault, and
    ``mmap.close()`` does not know about torch's views. So a holder of views (a lease) calls
    :meth:`hold`; :meth:`close` then only marks the mapping, and the last :meth:`let_go` unmaps."""

    def __init__(self, fd: int, size: int, writable: bool, populate: bool = True):
        self.size = size
        self.writable = writable
        self._mm: mmap.mmap | None = None
        self._holds = 0
        self._closing = False
        self._lock = threading.Lock()  # a lease may be let go by the garbage collector, on any thread
        if size == 0:
            self.base = torch.empty(0, dtype=torch.uint8)
            return
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        flags = mmap.MAP_SHARED | (getattr(mmap, "MAP_POPULATE", 0) if populate else 0)
        self._mm = mmap.mmap(fd, size, flags=flags, prot=prot)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "buffer is not writable": readers only read
            self.base = torch.frombuffer(self._mm, dtype=torch.uint8)

    @property
    def buffer(self) -> mmap.mmap:
        assert self._mm is not None
        return self._mm

    def hold(self) -> None:
        with self._lock:
            self._holds += 1

    def let_go(self) -> None:
        with self._lock:
            self._holds -= 1
            if self._closing and not self._holds:
                self._unmap()

    def close(self) -> None:
        with self._lock:
            self._closing = True
            if not self._holds:
                self._unmap()

    def _unmap(self) -> None:
        self.base = torch.empty(0, dtype=torch.uint8)
        mm, self._mm = self._mm, None
        if mm is not None:
            try:
                mm.close()
            except BufferError:
                pass  # a Python buffer export (not a tensor) is still alive: it goes when that does
