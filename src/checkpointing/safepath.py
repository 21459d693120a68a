"""Paths taken from checkpoint metadata are untrusted: they must stay inside their directory."""

from __future__ import annotations

import os
import stat

from .errors import UnsafeCheckpointError
from .untrusted import describe


def relative_parts(root: str, relpath: str) -> list[str]:
    """The components of ``relpath``, refusing (without touching the filesystem) anything that
    is not a plain relative path: empty, non-string, absolute, ``..``, a NUL byte."""
    if not isinstance(relpath, str) or not relpath:
        raise UnsafeCheckpointError(f"checkpoint names an empty or non-string path {describe(relpath)}", root)
    if "\x00" in relpath or os.path.isabs(relpath) or relpath.startswith(("/", "\\")):
        raise UnsafeCheckpointError(
            f"checkpoint names an absolute path {describe(relpath)}; only paths inside {root} are allowed", root
        )
    parts = relpath.replace("\\", "/").split("/")
    if any(p == ".." for p in parts):
        raise UnsafeCheckpointError(f"checkpoint path {describe(relpath)} escapes its directory {root} ('..')", root)
    return parts


def safe_join(root: str, relpath: str) -> str:
    """``root/relpath``, refusing absolute paths, ``..``, and symlinks that lead outside ``root``."""
    joined = os.path.join(root, *relative_parts(root, relpath))
    real_root = os.path.realpath(root)
    real = os.path.realpath(joined)
    if os.path.commonpath([real_root, real]) != real_root:
        raise UnsafeCheckpointError(
            f"checkpoint path {describe(relpath)} resolves to {real}, outside its directory {real_root} (symlink?)", joined
        )
    return joined


def check_no_escaping_links(root: str) -> None:
    """Refuse a directory holding any symlink that points outside it."""
    real_root = os.path.realpath(root)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            if os.path.islink(p):
                target = os.path.realpath(p)
                if os.path.commonpath([real_root, target]) != real_root:
                    raise UnsafeCheckpointError(
                        f"{p} is a symlink to {target}, outside the checkpoint directory {real_root}", p
                    )


def check_plain_files(root: str) -> None:
    """Refuse a step directory holding anything but regular files and directories (after
    links): a FIFO blocks whoever opens it, a device reads forever. For readers that open a
    step's files through a library of their own, in every verify mode; our own readers open
    each file with :func:`checkpointing.untrusted.open_regular` instead."""
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            try:
                mode = os.stat(p).st_mode
            except OSError as e:
                raise UnsafeCheckpointError(f"{p} cannot be examined: {e.strerror}", p) from None
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                raise UnsafeCheckpointError(f"{p} is not a regular file (a FIFO, device or socket); refusing to read it", p)
