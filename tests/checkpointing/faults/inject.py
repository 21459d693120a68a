"""Failures raised *inside* a backend's write, in this process: the disk fills up halfway
through a data file, or fsync reports an I/O error at commit.

Each recipe wraps one real function the backend's write path calls (the backend itself runs
unchanged) and raises on its ``n``-th call once armed. ``Injected.fired`` proves the failure was
actually hit: a recipe that no longer matches the backend's code fails the test instead of
passing vacuously.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

MARKER = "injected-fault-7f3a"


@dataclass
class Injected:
    error: BaseException
    fired: int = 0
    calls: list = field(default_factory=list)


# where -> backend -> (module, attribute path, failing call number)
RECIPES: dict[str, dict[str, tuple[str, str, int]]] = {
    "data": {
        "dcp": ("checkpointing.backends.dcp_writer", "RecordingFileSystemWriter._write_item", 2),
        "hf": ("checkpointing.backends.hf.safetensors_io", "_write_all", 2),
        "memory": ("checkpointing.backends.memory.layout", "SnapshotViews.__call__", 3),
        "dist": ("checkpointing.backends.dist.snapshot", "fill", 1),
        # the plugin (plugins/torch_checkpointing): torch-checkpointing writes each file in one call
        "torch_checkpointing": ("torch_checkpointing.storage.filesystem", "WriteStream.write", 1),
    },
    "commit": {
        # Every backend that commits through checkpointing.commit fsyncs each file there.
        "dcp": ("checkpointing.commit", "fsync_path", 1),
        "hf": ("checkpointing.commit", "fsync_path", 1),
        "torch_checkpointing": ("checkpointing.commit", "fsync_path", 1),
    },
}


def no_space() -> OSError:
    return OSError(errno.ENOSPC, f"No space left on device ({MARKER})")


def io_error() -> OSError:
    return OSError(errno.EIO, f"Input/output error ({MARKER})")


def worker_killed() -> BaseException:
    return SystemExit(f"worker thread killed ({MARKER})")


def recipe_for(where: str, backend: str) -> tuple[str, str, int]:
    recipe = RECIPES[where].get(backend)
    if recipe is None:
        pytest.skip(f"no {where!r} failure recipe for backend {backend!r} (add one to faults/inject.py if it has that stage)")
    return recipe


@contextlib.contextmanager
def failing(monkeypatch: pytest.MonkeyPatch, where: str, backend: str, error: BaseException) -> Iterator[Injected]:
    module_name, attr_path, nth = recipe_for(where, backend)
    owner = importlib.import_module(module_name)
    *parents, attr = attr_path.split(".")
    for name in parents:
        owner = getattr(owner, name)
    real = getattr(owner, attr)
    injected = Injected(error)

    def wrapper(*a, **kw):
        injected.calls.append(1)
        if len(injected.calls) == nth:
            injected.fired += 1
            raise injected.error
        return real(*a, **kw)

    with monkeypatch.context() as m:
        m.setattr(owner, attr, wrapper)
        yield injected


def chain_holds(error: BaseException, needle: BaseException) -> bool:
    """Is ``needle`` (or its message) somewhere in ``error``'s causes, contexts, or DCP's
    per-rank ``failures``?"""
    seen, todo = set(), [error]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if e is needle or MARKER in str(e):
            return True
        todo += [e.__cause__, e.__context__]
        failures = getattr(e, "failures", None)
        if isinstance(failures, dict):
            todo += [f for f in failures.values() if isinstance(f, BaseException)]
    return False
