"""The lock on one in-process slot: many readers or one writer, and nobody waits.

A reader that finds the slot being written is told so (the version is gone, it asks for another)
rather than blocked behind a publish; a writer that finds readers tries another slot. Used by the
memory backend's ``local`` transport and by the dist backend's snapshots, which take their slots
the same way (:mod:`.transport`'s slot protocol).
"""

from __future__ import annotations

import threading


class SlotLock:
    """Non-blocking reader/writer lock: ``try_*`` answers at once, ``release_*`` wakes waiters."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writing = False

    def try_shared(self) -> bool:
        with self._cond:
            if self._writing:
                return False
            self._readers += 1
            return True

    def release_shared(self) -> None:
        with self._cond:
            self._readers -= 1
            self._cond.notify_all()

    def try_exclusive(self) -> bool:
        with self._cond:
            if self._writing or self._readers:
                return False
            self._writing = True
            return True

    def release_exclusive(self) -> None:
        with self._cond:
            self._writing = False
            self._cond.notify_all()
