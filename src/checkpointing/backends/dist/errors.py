"""The one error a distributed sync adds to :mod:`checkpointing.errors`."""

from __future__ import annotations

from ...errors import CheckpointError


class PeerGoneError(CheckpointError):
    """A rank of the weight-sync world died, closed, or said nothing within ``timeout_s``.

    Raised on the survivor: by a reader's ``load()`` (its receiver is left exactly as it was,
    ``loaded_step`` does not move), or by a publisher's next ``save()`` when a reader failed
    while it was being served. ``peer`` names the rank (``publisher 1``, ``reader host:pid``)."""

    def __init__(self, message: str, peer: str):
        super().__init__(message)
        self.peer = peer
