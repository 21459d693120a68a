"""One reader's side: plan once, then pull a version into staging and apply it in one copy.

The first ``load`` reads every publisher's layout from the store, writes its own, and plans
(:mod:`.plan`); it also joins its process group with the publishers. Each later ``load`` of the
same receiver replays that plan: take a ticket, wait for every publisher's ack, say go, receive
every bucket straight into the staging buffer (laid out in plan order, so each bucket lands in
one contiguous range and needs no unpacking), then copy the pieces into the receiver's own
tensors in one batched copy, casting to their dtype.

**Atomicity by staging** (not double-buffering the model): the receiver's tensors are written
only after every bucket of the version has arrived. A publisher that dies, hangs or refuses
mid-sync leaves the receiver exactly as it was, with a typed error; the staging buffer costs one
copy of this reader's *own* share of the weights (its shards, not the model), allocated once.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ...errors import CheckpointError, StepNotFoundError
from . import protocol as keys
from . import world
from .apply import Binding, bind
from .errors import PeerGoneError
from .layout import RankLayout, build_layout, structure
from .options import DistOptions
from .plan import PairPlan, piece_view, plan_reader, staging_offsets
from .world import abandon, client, listening, reader_group, seconds, transfer_device, wait_all

log = logging.getLogger(__name__)


@dataclass
class ReaderPlan:
    """A plan bound to this reader's receiving tensors and its staging buffer."""

    number: int
    plans: list[PairPlan]
    digests: tuple[str, ...]
    staging: torch.Tensor
    receives: list[tuple[int, int, torch.Tensor]]
    """(publisher rank, tag, staging range) per bucket, in plan order."""
    binding: Binding
    """Piece views: receiver tensors and their staged data, for the one batched copy."""
    staged: list
    """(piece, its view in staging), to bind other tensors of the same layout without planning."""
    signature: list
    """The receiver layout the plan was made for (names, shapes, boxes, ties, dtypes)."""
    backend: str
    model_ids: tuple[int, ...]
    model_refs: list[Any] = field(default_factory=list)


class Reader:
    def __init__(self, opts: DistOptions, host: str, port: int) -> None:
        self.opts, self.host, self.port = opts, host, port
        self.name = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._store: Any = None
        self._world = ""
        self._plan: ReaderPlan | None = None
        self._plans_made = 0
        self._group: Any = None
        self._last_ticket = 0
        self.plans_computed = 0
        """Plans this reader computed: one per receiver (and per publisher world)."""
        self.syncs = 0
        self.last_seconds: dict[str, float] = {}
        """Where the last sync's time went: ``handshake`` (versions agreed, slots pinned),
        ``receive`` (every bucket in staging), ``apply`` (the one copy into the receiver)."""

    @property
    def kept_bytes(self) -> int:
        """Memory this side keeps between syncs: the staging copy of its own share."""
        return self._plan.staging.numel() if self._plan is not None else 0

    @property
    def label(self) -> str:
        return f"dist weight-sync world at {self.host}:{self.port}"

    # ------------------------------------------------------------------ connection
    def _connect(self) -> Any:
        """The store, or None when no publisher world is up there (never was, or closed)."""
        if self._store is not None:
            return self._store
        if not listening(self.host, self.port):
            return None
        store = client(self.host, self.port, self.opts.timeout_s, self.opts.timeout_s)
        world = store.get(keys.WORLD).decode()
        if world != self._world:  # a new publisher world (a restarted trainer): plan again
            self._reset()
            self._world = world
        self._store = store
        return store

    def _reset(self) -> None:
        self._drop_group()
        self._last_ticket = 0

    def _drop_group(self) -> None:
        """After a failure the group may hold a dead peer's connections: leave it, and come back
        under a new name (a new group, a new plan: the publishers dropped theirs)."""
        abandon(self._group)
        self._group, self._plan = None, None
        self.name = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"

    def _lost(self, error: BaseException) -> PeerGoneError:
        """The store connection broke: publisher rank 0 closed or died."""
        self._store = None
        self._drop_group()
        return PeerGoneError(f"{self.label}: the publishers went away ({error})", "publisher 0")

    # ------------------------------------------------------------------ versions
    def versions(self) -> list[int]:
        """Versions every publisher holds complete ([] when no publisher world is up)."""
        store = self._connect()
        if store is None:
            return []
        names = [keys.held_key(s) for s in range(self.opts.publishers)]
        try:
            if not store.check(names):
                return []
            held = [set(keys.decode_versions(raw, self._world)) for raw in store.multi_get(names)]
        except RuntimeError:
            self._store = None  # closed or died; a read says which, listing just finds nothing
            return []
        return sorted(set.intersection(*held))

    # ------------------------------------------------------------------ one sync
    def read(self, step: int, model: Mapping[str, Any]) -> None:
        store = self._connect()
        if store is None:
            raise PeerGoneError(f"{self.label}: no publisher is up (nothing listens there)", "publisher 0")
        begin = time.perf_counter()
        try:
            plan = self._plan_for(store, model)
            n = store.add(keys.TICKET, 1)
            store.set(keys.request_key(n), keys.Request(self.name, plan.number, step, plan.digests).encode())
            if self._group is None:
                self._group = reader_group(
                    store, self.name, self.opts.publishers, self.opts.publishers, plan.backend, self.opts.timeout_s,
                    self.opts.join_timeout_s, plan.staging.device,
                )
            self._handshake(store, n, step)
        except PeerGoneError:
            self._drop_group()
            raise
        except RuntimeError as e:
            raise self._lost(e) from None
        agreed = time.perf_counter()
        self._receive(plan, step)
        received = time.perf_counter()
        plan.binding.apply(self.label)  # every byte arrived: now, and only now, the receiver
        self.last_seconds = {"handshake": agreed - begin, "receive": received - agreed, "apply": time.perf_counter() - received}
        self.syncs += 1

    def _handshake(self, store: Any, n: int, step: int) -> None:
        acks = [keys.ack_key(n, s) for s in range(self.opts.publishers)]
        try:
            store.wait(acks, seconds(self.opts.timeout_s))
        except RuntimeError:
            store.set(keys.go_key(n), b"0")
            silent = [s for s in range(self.opts.publishers) if not store.check([acks[s]])]
            raise PeerGoneError(
                f"{self.label}: publisher rank(s) {silent} did not answer version {step}'s request within "
                f"{self.opts.timeout_s:g} s", f"publisher {silent[0] if silent else '?'}",
            ) from None
        answers = [raw.decode() for raw in store.multi_get(acks)]
        self._tidy(store, n)
        if any(a != keys.OK for a in answers):
            store.set(keys.go_key(n), b"0")
            if all(a in (keys.OK, keys.GONE) for a in answers):
                raise StepNotFoundError(f"version {step} is no longer held by every publisher of {self.label}")
            refusal = next(a for a in answers if a not in (keys.OK, keys.GONE))
            raise CheckpointError(f"{self.label}: a publisher refused version {step}: {refusal}")
        store.set(keys.go_key(n), b"1")

    def _tidy(self, store: Any, n: int) -> None:
        """Every publisher has read request n and the previous go: drop them (the store stays
        small over a long run)."""
        stale = [keys.request_key(n)] + [keys.ack_key(n, s) for s in range(self.opts.publishers)]
        if self._last_ticket:
            stale.append(keys.go_key(self._last_ticket))
        for key in stale:
            store.delete_key(key)
        self._last_ticket = n

    def _receive(self, plan: ReaderPlan, step: int) -> None:
        group = self._group
        works = [world.recv_bucket(group, staged, src, tag) for src, tag, staged in plan.receives]
        try:
            wait_all(works, self.opts.timeout_s, lambda i: f"publisher {plan.receives[i][0]}", f"{self.label}, version {step}")
        except PeerGoneError:
            self._drop_group()
            raise

    # ------------------------------------------------------------------ planning (once)
    def _plan_for(self, store: Any, model: Mapping[str, Any]) -> ReaderPlan:
        ids = tuple(map(id, model.values()))
        plan = self._plan
        if plan is not None and plan.model_ids == ids:
            return plan
        target, local = build_layout(model)
        if plan is not None and plan.signature == _signature(target):
            # The same layout in other tensors (a sink's fresh buffers each load): bind them to
            # the plan, do not plan again.
            plan.binding = bind(plan.staged, local, target.aliases)
            plan.model_ids, plan.model_refs = ids, list(model.values())
            return plan
        return self._plan_new(store, model, target, local, ids)

    def _plan_new(self, store: Any, model: Mapping[str, Any], target: RankLayout, local: dict, ids: tuple) -> ReaderPlan:
        begin = time.monotonic()
        publishers = [RankLayout.from_json(store.get(keys.layout_key(s)), f"publisher {s}") for s in range(self.opts.publishers)]
        plans = plan_reader(publishers, target, self.name, self.label)
        self._plans_made += 1
        store.set(keys.reader_layout_key(self.name, self._plans_made), target.to_json())
        backend = publishers[0].backend
        device = transfer_device(backend, next(iter(local.values())).device if local else torch.device("cpu"))
        offsets, size = staging_offsets(plans)
        staging = torch.empty(size, dtype=torch.uint8, device=device)
        receives, staged = [], []
        for plan, row in zip(plans, offsets, strict=True):
            for tag, (bucket, at) in enumerate(zip(plan.buckets, row, strict=True)):
                receives.append((plan.source, tag, staging[at : at + bucket.nbytes]))
                staged += [(piece, piece_view(staging, at + piece.at, piece)) for piece in bucket.pieces]
        self._plan = ReaderPlan(
            self._plans_made, plans, tuple(p.digest() for p in plans), staging, receives,
            bind(staged, local, target.aliases), staged, _signature(target), backend, ids, list(model.values()),
        )
        self.plans_computed += 1
        log.info(
            "dist reader %s: planned %d buckets from %d publishers (%.1f MB staging) in %.1f ms",
            self.name, len(receives), len(plans), size / 1e6, 1e3 * (time.monotonic() - begin),
        )
        return self._plan

    def close(self) -> None:
        abandon(self._group)
        self._group, self._store, self._plan = None, None, None


def _signature(layout: RankLayout) -> list:
    return [structure(layout), [str(t.dtype) for t in layout.tensors]]
