"""Reading files and values nobody vouches for: checkpoint files, indexes, config files, shm
segments.

One opener for all of them, because the failure it prevents is the same everywhere: ``open()``
on a FIFO blocks until a writer appears (forever, if the FIFO was planted), a character device
can stream without end, a directory or socket fails with an error nobody expects, and a symlink
swaps in a file from elsewhere. :func:`open_regular` opens with ``O_NOFOLLOW | O_NONBLOCK`` (so
the open itself can neither follow a link nor wait) and then ``fstat``s the descriptor it got:
anything but a regular file is refused *by what was opened*, with no window between a check
and the use.

Then bounds: :func:`read_regular` refuses a file larger than the caller's cap before reading
it (a sparse multi-GiB file is not read whole to find out), :func:`parse_json` turns every way
JSON can fail (bad UTF-8, bad syntax, nesting past the interpreter's limit, a repeated key, too
many entries) into the caller's typed error, and :func:`describe` names an untrusted value in
an error message in bounded time and length (``repr`` of a crafted object can take exponential
time, or recurse past the limit).
"""

from __future__ import annotations

import errno
import json
import os
import stat
from collections.abc import Callable
from typing import Any

from .errors import CheckpointError, CorruptCheckpointError, UnsafeCheckpointError

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISLNK, "a symbolic link"),
)


def kind_of(mode: int) -> str:
    for test, name in _KINDS:
        if test(mode):
            return name
    return "a regular file" if stat.S_ISREG(mode) else "a special file"


def open_regular(path: str, what: str = "checkpoint file", writable: bool = False) -> int:
    """A descriptor on the regular file ``path``, or an :class:`UnsafeCheckpointError` naming
    what is there instead (a symlink, a FIFO, a device, a directory, a socket). Never blocks.

    ``FileNotFoundError`` passes through: whether a missing file is an error, and which one, is
    the caller's to say."""
    flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UnsafeCheckpointError(f"{what} {path} is a symlink; refusing to follow it", path) from None
        if e.errno in (errno.EISDIR, errno.ENXIO, errno.EOPNOTSUPP, errno.ENODEV, errno.ETXTBSY):
            raise _not_regular(path, what, _lstat_mode(path)) from None
        raise
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise _not_regular(path, what, mode)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _lstat_mode(path: str) -> int | None:
    try:
        return os.lstat(path).st_mode
    except OSError:
        return None


def _not_regular(path: str, what: str, mode: int | None) -> UnsafeCheckpointError:
    kind = kind_of(mode) if mode is not None else "not a regular file"
    return UnsafeCheckpointError(
        f"{what} {path} is {kind}, not a regular file; refusing to open it (reading a FIFO or device "
        "could block forever or never end)",
        path,
    )


def open_binary(path: str, what: str = "checkpoint file"):
    """:func:`open_regular` as an unbuffered binary file object (seekable, ``readinto``)."""
    return os.fdopen(open_regular(path, what), "rb", buffering=0)


def regular_size(path: str, what: str = "checkpoint file") -> int:
    """Size of the regular file ``path`` (refusing anything else, as :func:`open_regular`)."""
    fd = open_regular(path, what)
    try:
        return os.fstat(fd).st_size
    finally:
        os.close(fd)


def exists_here(path: str) -> bool:
    """Is there *anything* at ``path`` (a dangling link, a FIFO included)? ``os.path.isfile``
    says False for all of those, which let a FIFO or a directory named ``manifest.json`` pass
    for "no manifest" and skip verification."""
    return os.path.lexists(path)


def read_regular(path: str, limit: int, what: str = "checkpoint file") -> bytes:
    """The whole content of the regular file ``path``, refused (before reading) when it holds
    more than ``limit`` bytes."""
    fd = open_regular(path, what)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise CorruptCheckpointError(
                f"{what} {path} has {size} bytes; at most {limit} are allowed, so it is not read", path
            )
        chunks, total = [], 0
        while True:  # the size can change under us: never read more than limit + 1
            chunk = os.read(fd, min(limit + 1 - total, 1 << 24))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:
                raise CorruptCheckpointError(f"{what} {path} grew past {limit} bytes while it was read", path)
    finally:
        os.close(fd)
    return b"".join(chunks)


# ------------------------------------------------------------------------------------- JSON
MAX_JSON_ENTRIES = 1 << 21
"""Object members plus array items one JSON document may hold (a manifest of a million files
fits); a bigger one is refused without building it."""


class _Counter:
    def __init__(self, limit: int, fail: Callable[[str], CheckpointError]):
        self.left = limit
        self.fail = fail

    def take(self, n: int) -> None:
        self.left -= n
        if self.left < 0:
            raise self.fail(f"holds more than {MAX_JSON_ENTRIES} entries")


def parse_json(
    raw: bytes,
    path: str,
    what: str,
    error: type[CheckpointError] = CorruptCheckpointError,
    max_entries: int = MAX_JSON_ENTRIES,
) -> Any:
    """JSON from untrusted bytes. A repeated key is an error (not "last one wins": two readers
    could disagree on which value counts); so are bad UTF-8, nesting deeper than the
    interpreter's recursion limit and more than ``max_entries`` members and items. Every failure
    is ``error`` naming ``path``."""

    def fail(why: str) -> CheckpointError:
        return _make(error, f"{path}: {what} {why}", path)

    counter = _Counter(max_entries, fail)

    def pairs_hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        counter.take(len(pairs))
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise fail(f"names {describe(key)} twice; refusing an ambiguous file")
            out[key] = value
        return out

    try:
        text = raw.decode("utf-8") if isinstance(raw, (bytes, bytearray, memoryview)) else raw
        doc = json.loads(text, object_pairs_hook=pairs_hook)
    except CheckpointError:
        raise
    except UnicodeDecodeError as e:
        raise fail(f"is not UTF-8 text (byte {e.start})") from None
    except RecursionError:
        raise fail("is nested too deeply") from None
    except ValueError as e:  # JSONDecodeError
        raise fail(f"is not valid JSON: {str(e)[:200]}") from None
    counter.take(_count_array_items(doc, counter.left + 1))
    return doc


def _count_array_items(doc: Any, stop_after: int) -> int:
    """Array items in ``doc`` (iteratively; stops counting once past ``stop_after``)."""
    total, todo = 0, [doc]
    while todo and total <= stop_after:
        value = todo.pop()
        if isinstance(value, list):
            total += len(value)
            todo.extend(v for v in value if isinstance(v, (list, dict)))
        elif isinstance(value, dict):
            todo.extend(v for v in value.values() if isinstance(v, (list, dict)))
    return total


def _make(error: type[CheckpointError], message: str, path: str) -> CheckpointError:
    if issubclass(error, CorruptCheckpointError):
        return error(message, path)
    return error(message)


# ------------------------------------------------------------------------------------- messages
def describe(value: Any, depth: int = 2, width: int = 80) -> str:
    """A short, safe rendering of an untrusted value for an error message.

    Builtin scalars and strings are shown (strings cut at ``width``), lists, tuples and dicts
    to ``depth`` levels and four items; anything else by its type name only: ``repr`` of an
    unpickled object can recurse through shared references in exponential time."""
    if value is None or isinstance(value, (bool, float)):
        return repr(value)
    if isinstance(value, int):
        if value.bit_length() > 64:
            return f"<an int of {value.bit_length()} bits>"
        return repr(int(value))
    if isinstance(value, str):
        return repr(value[:width]) + ("..." if len(value) > width else "")
    if isinstance(value, (bytes, bytearray)):
        return repr(bytes(value[:width])) + ("..." if len(value) > width else "")
    if type(value) in (list, tuple) or _is_size(value):
        if depth <= 0:
            return f"<{type(value).__name__} of {len(value)}>"
        items = ", ".join(describe(v, depth - 1, width) for v in list(value[:4]))
        more = ", ..." if len(value) > 4 else ""
        return f"[{items}{more}]" if isinstance(value, list) else f"({items}{more})"
    if type(value) is dict:
        if depth <= 0:
            return f"<dict of {len(value)}>"
        shown = list(value.items())[:4]
        items = ", ".join(f"{describe(k, 0, width)}: {describe(v, depth - 1, width)}" for k, v in shown)
        more = ", ..." if len(value) > 4 else ""
        return f"{{{items}{more}}}"
    return f"<{type(value).__name__}>"


def _is_size(value: Any) -> bool:
    import torch

    return type(value) is torch.Size
