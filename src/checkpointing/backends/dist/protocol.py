"""The records the weight-sync world keeps in its store, and the handshake of one sync.

Keys (all small; tensors never go through the store)::

    world                  id of this publisher world (a restarted trainer is a new world)
    layout/p{s}            publisher s's layout (JSON), written at its first save
    held/p{s}              the versions publisher s holds complete, rewritten on every change
    layout/r/{reader}/{k}  a reader's layout (its k-th plan), written once per plan
    ticket                 counter: a reader takes the next number for each sync
    req/{n}                {reader, plan k, version, digest per publisher}
    ack/{n}/p{s}           publisher s: "ok" (version pinned), "gone" (not held), or an error
    go/{n}                 the reader: "1" transfer now, "0" give up (someone said no)
    closed/p{s}            publisher s has stopped serving (rank 0 keeps the store until then)

One sync: the reader takes ticket n and writes ``req/n``; every publisher, serving tickets in
order, pins the version (its snapshot cannot be overwritten until the transfer ends) and acks;
the reader says go only if all acked "ok"; then the buckets move. So a reader receives one
version from every publisher or nothing, and a version retired meanwhile is a
StepNotFoundError the manager answers by listing again. A publisher that closes takes a ticket
too, with a stop record for its own server.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ...errors import CorruptCheckpointError

WORLD = "world"
TICKET = "ticket"
OK, GONE = "ok", "gone"


def layout_key(rank: int) -> str:
    return f"layout/p{rank}"


def held_key(rank: int) -> str:
    return f"held/p{rank}"


def reader_layout_key(reader: str, plan: int) -> str:
    return f"layout/r/{reader}/{plan}"


def request_key(n: int) -> str:
    return f"req/{n}"


def ack_key(n: int, rank: int) -> str:
    return f"ack/{n}/p{rank}"


def go_key(n: int) -> str:
    return f"go/{n}"


def closed_key(rank: int) -> str:
    return f"closed/p{rank}"


@dataclass(frozen=True)
class Request:
    reader: str
    plan: int
    version: int
    digests: tuple[str, ...]
    stop: int = -1
    """A closing publisher's own rank: its server stops here; the others skip the ticket."""

    def encode(self) -> bytes:
        return json.dumps(
            {"reader": self.reader, "plan": self.plan, "version": self.version, "digests": list(self.digests), "stop": self.stop}
        ).encode()

    @classmethod
    def decode(cls, raw: bytes, source: str) -> Request:
        try:
            doc = json.loads(raw.decode("utf-8"))
            request = cls(str(doc["reader"]), int(doc["plan"]), int(doc["version"]), tuple(map(str, doc["digests"])), int(doc["stop"]))
        except (ValueError, KeyError, TypeError) as e:
            raise CorruptCheckpointError(f"weight-sync request {source} is not valid: {e}", source) from None
        return request


def encode_versions(world: str, versions: list[int]) -> bytes:
    return json.dumps({"world": world, "versions": versions}).encode()


def decode_versions(raw: bytes, world: str) -> list[int]:
    """Versions a publisher holds; a record of another world (stale) holds none."""
    try:
        doc: Any = json.loads(raw.decode("utf-8"))
        if doc.get("world") != world:
            return []
        return [int(v) for v in doc["versions"]]
    except (ValueError, KeyError, TypeError, AttributeError):
        return []
