"""Paths taken from checkpoint metadata are untrusted: they must stay inside their directory."""

from __future__ import annotations

import os

from .errors import UnsafeCheckpointError


def safe_join(root: str, relpath: str) -> str:
    """``root/relpath``, refusing absolute paths, ``..``, and symlinks that lead outside ``root``."""
    if not isinstance(relpath, str) or not relpath:
        raise UnsafeCheckpointError(f"checkpoint names an empty or non-string path {relpath!r}", root)
    if "\x00" in relpath or os.path.isabs(relpath) or relpath.startswith(("/", "\\")):
        raise UnsafeCheckpointError(f"checkpoint names an absolute path {relpath!r}; only paths inside {root} are allowed", root)
    parts = relpath.replace("\\", "/").split("/")
    if any(p in ("..",) for p in parts):
        raise UnsafeCheckpointError(f"checkpoint path {relpath!r} escapes its directory {root} ('..')", root)
    joined = os.path.join(root, *parts)
    real_root = os.path.realpath(root)
    real = os.path.realpath(joined)
    if os.path.commonpath([real_root, real]) != real_root:
        raise UnsafeCheckpointError(
            f"checkpoint path {relpath!r} resolves to {real}, outside its directory {real_root} (symlink?)", joined
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
