"""Where a saving process dies: each kill point patches, *inside the doomed child only*, the
function it dies in, and SIGKILLs its own process there (no atexit, no finally, no flush:
exactly what a power cut or the OOM killer leaves).

Kill points are armed only for the doomed save, so the earlier saves that build the "previous
step" complete normally. Most points are generic (any backend that commits through
:mod:`checkpointing.commit` passes them); a backend that writes differently adds a recipe to
``RECIPES``. A point a backend never passes through is reported as not reached, which the test
turns into a failure: a silent pass would prove nothing.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
from collections.abc import Callable
from dataclasses import dataclass

STEP_NAME = re.compile(r"^step-\d+$")


@dataclass(frozen=True)
class KillPoint:
    name: str
    what: str
    survivor: str
    """Which step must be the newest committed one afterwards: "previous" (the doomed step
    never became visible) or "doomed" (it was already complete when the process died)."""
    purge: bool = False
    """The doomed save is the one whose retention purge deletes an old step."""


KILL_POINTS = [
    KillPoint("before_data", "right after the save's first directory is created, before any data file", "previous"),
    KillPoint("mid_data", "in the middle of writing tensor data (part of the data on disk)", "previous"),
    KillPoint("before_manifest", "data written and fsynced, manifest not yet built", "previous"),
    KillPoint("before_commit", "everything written, just before the step is made visible (the rename)", "previous"),
    KillPoint("after_commit", "just after the step was made visible, before the directory fsync", "doomed"),
    KillPoint("purge_after_rename", "retention purge: old step renamed aside, not yet removed", "doomed", purge=True),
    KillPoint("purge_mid_delete", "retention purge: after the first file of the old step is unlinked", "doomed", purge=True),
]
BY_NAME = {p.name: p for p in KILL_POINTS}


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class Trap:
    """The patches for one kill point; ``arm()`` just before the doomed save."""

    def __init__(self, point: str, folder: str, backend: str):
        self.point = BY_NAME[point]
        self.folder = os.path.abspath(folder)
        self.backend = backend
        self.armed = False
        self.purging = False

    def inside(self, path) -> bool:
        try:
            return os.path.abspath(os.fspath(path)).startswith(self.folder + os.sep)
        except TypeError:
            return False

    def arm(self) -> None:
        self.armed = True

    def install(self) -> None:
        recipe = RECIPES.get((self.backend, self.point.name)) or GENERIC.get(self.point.name)
        if recipe is None:
            raise LookupError(f"no kill recipe for point {self.point.name!r} on backend {self.backend!r}; add one to RECIPES")
        recipe(self)

    def after_calls(self, n: int, before_death: Callable[..., None] | None = None):
        """A wrapper factory: the armed ``n``-th call of the wrapped function returns, then dies."""
        count = {"n": 0}

        def wrap(real):
            def wrapper(*a, **kw):
                out = real(*a, **kw)
                if self.armed:
                    count["n"] += 1
                    if count["n"] == n:
                        if before_death is not None:
                            before_death(*a, **kw)
                        die()
                return out

            return wrapper

        return wrap


# ---------------------------------------------------------------------- generic recipes
def _before_data(trap: Trap) -> None:
    real_mkdir = os.mkdir

    def mkdir(path, *a, **kw):
        real_mkdir(path, *a, **kw)
        if trap.armed and trap.inside(path):
            die()

    os.mkdir = mkdir  # os.makedirs calls it through the module global


def _before_manifest(trap: Trap) -> None:
    from checkpointing import commit

    real_build = commit.Manifest.build.__func__

    def build(cls, step_dir, *a, **kw):
        if trap.armed and trap.inside(step_dir):
            die()
        return real_build(cls, step_dir, *a, **kw)

    commit.Manifest.build = classmethod(build)


def _publishing_rename(after: bool) -> Callable[[Trap], None]:
    def install(trap: Trap) -> None:
        for name in ("rename", "replace"):
            real = getattr(os, name)

            def publishing(src, dst, *a, _real=real, **kw):
                hit = trap.armed and trap.inside(dst) and STEP_NAME.match(os.path.basename(os.fspath(dst)))
                if hit and not after:
                    die()
                out = _real(src, dst, *a, **kw)
                if hit and after:
                    die()
                return out

            setattr(os, name, publishing)

    return install


def _watch_purge(trap: Trap) -> None:
    from checkpointing.manager import Checkpointer

    real_purge = Checkpointer._purge_stale

    def purge(ckpt):
        trap.purging = trap.armed
        try:
            return real_purge(ckpt)
        finally:
            trap.purging = False

    Checkpointer._purge_stale = purge


def _die_after_purge_calls(names: tuple[str, ...]) -> Callable[[Trap], None]:
    def install(trap: Trap) -> None:
        _watch_purge(trap)
        for name in names:
            real = getattr(os, name)

            def call(*a, _real=real, **kw):
                out = _real(*a, **kw)
                if trap.purging:
                    die()
                return out

            setattr(os, name, call)

    return install


def _purge_mid_delete(trap: Trap) -> None:
    # shutil.rmtree unlinks through os.unlink / os.rmdir, so this also stops an rmtree after
    # its first file: a half-deleted directory is left behind.
    assert shutil.rmtree.avoids_symlink_attacks, "rmtree must go through os.unlink for this point"
    _die_after_purge_calls(("unlink", "remove", "rmdir"))(trap)


GENERIC: dict[str, Callable[[Trap], None]] = {
    "before_data": _before_data,
    "before_manifest": _before_manifest,
    "before_commit": _publishing_rename(after=False),
    "after_commit": _publishing_rename(after=True),
    "purge_after_rename": _die_after_purge_calls(("rename", "replace")),
    "purge_mid_delete": _purge_mid_delete,
}


# ---------------------------------------------------------------------- per-backend recipes
def _dcp_mid_data(trap: Trap) -> None:
    """Our DCP writer writes each item through ``RecordingFileSystemWriter._write_item`` into
    one open stream: die after the second item, with what was written flushed, so a truncated
    ``.distcp`` is on disk."""
    from checkpointing.backends.dcp_writer import RecordingFileSystemWriter as Writer

    flush = lambda self, stream, *a, **kw: stream.flush()
    Writer._write_item = trap.after_calls(2, flush)(Writer._write_item)


def _hf_mid_data(trap: Trap) -> None:
    """The hf backend streams a shard as header, then tensor after tensor, through
    ``safetensors_io._write_all``: die after the header and the first tensor."""
    from checkpointing.backends.hf import safetensors_io

    safetensors_io._write_all = trap.after_calls(2)(safetensors_io._write_all)


def _memory_mid_data(trap: Trap) -> None:
    """A publish copies tensor after tensor into the slot through ``SnapshotViews``: die when
    the third tensor's place is taken (two copied, the rest stale)."""
    from checkpointing.backends.memory import layout

    layout.SnapshotViews.__call__ = trap.after_calls(3)(layout.SnapshotViews.__call__)


def _memory_before_commit(trap: Trap) -> None:
    """Every byte copied, but the slot not yet stamped with its step (still odd, in flux)."""
    from checkpointing.backends.memory import backend

    backend.fill_snapshot = trap.after_calls(1)(backend.fill_snapshot)


def _dist_mid_data(trap: Trap) -> None:
    """A dist publisher copies its shards into a snapshot slot in one batched ``snapshot.fill``:
    copy the first half of the tensors, then die (the slot half new, half stale)."""
    from checkpointing.backends.dist import snapshot

    real = snapshot.fill

    def fill(views, sources):
        if not trap.armed:
            return real(views, sources)
        half = max(1, len(views) // 2)
        real(views[:half], sources[:half])
        die()

    snapshot.fill = fill


def _dist_before_commit(trap: Trap) -> None:
    """Every byte copied into the slot, the slot not yet stamped with its step."""
    from checkpointing.backends.dist import snapshot

    snapshot.fill = trap.after_calls(1)(snapshot.fill)


def _torch_checkpointing_mid_data(trap: Trap) -> None:
    """The torch_checkpointing plugin (plugins/torch_checkpointing) hands each file to
    torch-checkpointing's ``WriteStream.write`` in one call: die once half of the first file's
    bytes are written and flushed."""
    from torch_checkpointing.storage.filesystem import WriteStream

    real_write = WriteStream.write

    def write(stream, data):
        if trap.armed and trap.inside(stream._path):
            view = memoryview(data).cast("B")
            real_write(stream, view[: len(view) // 2])
            stream.flush()
            die()
        return real_write(stream, data)

    WriteStream.write = write


RECIPES: dict[tuple[str, str], Callable[[Trap], None]] = {
    ("dist", "mid_data"): _dist_mid_data,
    ("dist", "before_commit"): _dist_before_commit,
    ("dcp", "mid_data"): _dcp_mid_data,
    ("torch_checkpointing", "mid_data"): _torch_checkpointing_mid_data,
    ("hf", "mid_data"): _hf_mid_data,
    ("memory", "mid_data"): _memory_mid_data,
    ("memory", "before_commit"): _memory_before_commit,
}
"""(backend name, point) -> how to die there, where the generic recipe does not apply."""
