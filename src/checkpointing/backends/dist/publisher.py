"""One trainer rank's side: snapshot its shards on ``save``, serve readers in the background.

``save(step)`` is local and fast: one batched copy of this rank's shards into a snapshot slot
(:mod:`.snapshot`), then one store write announcing the versions it holds. No collective runs
in ``save``, so the trainer never waits for a generator that is busy, late, or gone.

A server thread answers readers' tickets in order (:mod:`.protocol`). The first ticket of a
reader joins that reader's process group and plans (:mod:`.plan`), reading the reader's layout
from the store once; every later ticket replays the plan: pin the version, ack, send the
buckets (span buckets straight from the snapshot, packed buckets through two rotating buffers),
unpin. A reader that fails mid-transfer costs its group, never the trainer: the failure is
raised once, as :class:`~.errors.PeerGoneError`, by the next ``save``.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Mapping
from typing import Any

import torch

from ..._compat import foreach_copy
from ...dtypes import torch_dtype
from ...errors import CheckpointError, ConfigError, StateMismatchError, StepNotFoundError
from . import protocol as keys
from . import world
from .apply import bind
from .errors import PeerGoneError
from .layout import RankLayout, build_layout, structure
from .options import DistOptions
from .plan import PairPlan, local_view, piece_view, plan_reader
from .snapshot import Slot, Snapshots
from .world import FOREVER, abandon, client, host_store, pick_backend, reader_group, seconds, transfer_device, wait_all

log = logging.getLogger(__name__)

CLOSE_WAIT_S = 30.0
"""How long publisher rank 0, which hosts the store, waits at close for the other ranks."""


class Publisher:
    def __init__(self, opts: DistOptions, rank: int, host: str, port: int) -> None:
        self.opts, self.rank, self.host, self.port = opts, rank, host, port
        self.cast_to = None if opts.dtype == "auto" else torch_dtype(opts.dtype)
        self.snapshots = Snapshots(opts.keep_versions, opts.timeout_s)
        self.layout: RankLayout | None = None
        self.device = torch.device("cpu")
        self._index: dict[str, int] = {}
        self._sources: list[torch.Tensor] = []
        self._model_ids: tuple[int, ...] = ()
        self._model_refs: list[Any] = []
        self._store: Any = None
        self._world = ""
        self._server: threading.Thread | None = None
        self._failure: PeerGoneError | None = None
        self._failure_lock = threading.Lock()
        self._groups: dict[str, Any] = {}
        self._plans: dict[tuple[str, int], PairPlan] = {}
        self._publisher_layouts: list[RankLayout] | None = None
        self._pack: list[torch.Tensor] = []
        self._pack_views: dict[tuple, tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]] = {}
        """(bucket views, slot views, buffer) per (plan, bucket, slot): see :meth:`_packing`."""
        self.plans_computed = 0
        """Plans this rank computed (one per reader layout; later syncs replay them)."""
        self.syncs_served = 0

    # ------------------------------------------------------------------ save
    def write(self, step: int, model: Mapping[str, Any]) -> None:
        failure = self._take_failure()
        if failure is not None:
            raise failure
        sources = self._sources_for(model)
        assert self.layout is not None
        self.snapshots.write(step, self.layout, sources, self.device)
        if self._store is None:
            self._join()
        self._announce()

    def _sources_for(self, model: Mapping[str, Any]) -> list[torch.Tensor]:
        """This rank's local tensors in layout order. Built once: later saves of the same
        state dict (the manager's, aliasing the parameters) skip the per-tensor work."""
        ids = tuple(map(id, model.values()))
        if ids == self._model_ids:
            return self._sources
        device = _one_device(model)
        backend = pick_backend(self.opts.backend, device)
        layout, local = build_layout(
            model, self.cast_to, snapshot=True, bucket_bytes=self.opts.bucket_bytes, backend=backend
        )
        if self.layout is None:
            self.layout, self.device = layout, transfer_device(backend, device)
            self._index = {t.name: i for i, t in enumerate(layout.tensors)}
        elif structure(layout) != structure(self.layout):
            changed = _changed_keys(self.layout, layout)
            raise StateMismatchError(
                f"publisher rank {self.rank}: the model's tensors changed since the first save ({changed[:20]}); readers "
                "planned against the first layout. Publish a different model on another init_method port",
                changed,
            )
        self._sources = [local[t.name] for t in self.layout.tensors]
        self._model_ids, self._model_refs = ids, list(model.values())
        return self._sources

    def _join(self) -> None:
        """First save: rank 0 hosts the store, every rank records its layout and starts serving."""
        assert self.layout is not None
        opts = self.opts
        if self.rank == 0:
            store = host_store(self.host, self.port, opts.timeout_s)
            store.set(keys.WORLD, uuid.uuid4().hex)
        else:
            store = client(self.host, self.port, opts.timeout_s, opts.join_timeout_s)
        store.set_timeout(seconds(opts.join_timeout_s))
        self._world = store.get(keys.WORLD).decode()
        store.set_timeout(seconds(opts.timeout_s))
        store.set(keys.layout_key(self.rank), self.layout.to_json())
        self._store = store
        self._server = threading.Thread(target=self._serve, name=f"dist-publisher-{self.rank}", daemon=True)
        self._server.start()

    def _announce(self) -> None:
        self._store.set(keys.held_key(self.rank), keys.encode_versions(self._world, self.snapshots.versions()))

    def steps(self) -> list[int]:
        return self.snapshots.versions()

    def delete(self, step: int) -> None:
        self.snapshots.retire(step)
        if self._store is not None:
            self._announce()

    # ------------------------------------------------------------------ reading its own snapshot
    def read_own(self, step: int, model: Mapping[str, Any]) -> None:
        """A publishing Checkpointer's ``load()``: copy from this rank's own snapshot, which works
        when it holds everything the receiver needs (one publisher, or the same shards)."""
        if self.layout is None:
            raise StepNotFoundError(f"publisher rank {self.rank} has published nothing yet")
        slot = self.snapshots.pin(step)
        if slot is None:
            raise StepNotFoundError(f"version {step} is not held by publisher rank {self.rank}; held: {self.steps()}")
        try:
            target, local = build_layout(model)
            try:
                (plan,) = plan_reader([self.layout], target, "self", f"publisher rank {self.rank} version {step}")
            except StateMismatchError as e:
                if self.opts.publishers > 1 and "do not cover" in str(e):
                    raise ConfigError(
                        f"publisher rank {self.rank} holds only its own shards; load version {step} through a reader "
                        "(a load_only Checkpointer, or [dist] role = 'read')"
                    ) from None
                raise
            pieces = [(p, local_view(slot.views[self._index[p.source.name]], p.src_box)) for b in plan.buckets for p in b.pieces]
            bind(pieces, local, target.aliases).apply(f"publisher rank {self.rank} version {step}")
        finally:
            self.snapshots.unpin(slot)

    # ------------------------------------------------------------------ serving
    def _serve(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        try:
            store = client(self.host, self.port, self.opts.timeout_s, self.opts.join_timeout_s)
        except PeerGoneError as e:
            self._fail(e)
            return
        n = 1
        while True:
            try:
                store.wait([keys.request_key(n)], FOREVER)
                request = keys.Request.decode(store.get(keys.request_key(n)), keys.request_key(n))
            except RuntimeError as e:  # the store is gone: publisher 0 closed or died
                if self._store is not None:
                    self._fail(PeerGoneError(f"publisher rank {self.rank} lost the weight-sync store: {e}", "publisher 0"))
                return
            if request.stop >= 0:
                if request.stop == self.rank:
                    return
            else:
                self._serve_one(store, n, request)
            n += 1

    def _serve_one(self, store: Any, n: int, request: keys.Request) -> None:
        reader = request.reader
        try:
            group = self._groups.get(reader)
            if group is None:
                group = self._groups[reader] = reader_group(
                    store, reader, self.rank, self.opts.publishers, self._backend, self.opts.timeout_s,
                    self.opts.join_timeout_s, self.device,
                )
            try:
                plan = self._plan(store, request)
            except CheckpointError as e:  # the reader's layout is refused: its problem, told to it
                store.set(keys.ack_key(n, self.rank), f"publisher rank {self.rank} cannot plan for it: {e}")
                return
            if request.digests[self.rank] != plan.digest():
                store.set(keys.ack_key(n, self.rank), f"plan digest differs: publisher rank {self.rank} planned other buckets")
                return
            self._pinned_transfer(store, n, group, plan, request)
        except Exception as e:  # a reader that died, hung, or broke the protocol: drop it, go on
            peer = f"reader {reader}"
            self._fail(e if isinstance(e, PeerGoneError) else PeerGoneError(f"serving {peer} failed: {e!r}", peer))
            abandon(self._groups.pop(reader, None))
            for key in [k for k in self._plans if k[0] == reader]:
                del self._plans[key]

    def _pinned_transfer(self, store: Any, n: int, group: Any, plan: PairPlan, request: keys.Request) -> None:
        """Pin the version, ack, and send once the reader says go; the pin holds until the
        last bucket is out, so no save can overwrite what is being sent."""
        slot = self.snapshots.pin(request.version)
        try:
            store.set(keys.ack_key(n, self.rank), keys.OK if slot is not None else keys.GONE)
            if slot is None:
                return
            store.wait([keys.go_key(n)], seconds(self.opts.timeout_s))
            if store.get(keys.go_key(n)) == b"1":
                self._send(group, plan, slot, request.reader, request.version)
                self.syncs_served += 1
        finally:
            if slot is not None:
                self.snapshots.unpin(slot)

    @property
    def _backend(self) -> str:
        assert self.layout is not None
        return self.layout.backend

    def _plan(self, store: Any, request: keys.Request) -> PairPlan:
        key = (request.reader, request.plan)
        plan = self._plans.get(key)
        if plan is not None:
            return plan
        begin = time.monotonic()
        if self._publisher_layouts is None:
            assert self.layout is not None  # set by the first save, before the server serves anyone
            self._publisher_layouts = [
                self.layout if s == self.rank else RankLayout.from_json(store.get(keys.layout_key(s)), f"publisher {s}")
                for s in range(self.opts.publishers)
            ]
        raw = store.get(keys.reader_layout_key(request.reader, request.plan))
        target = RankLayout.from_json(raw, f"reader {request.reader}")
        plan = plan_reader(self._publisher_layouts, target, request.reader, f"reader {request.reader}")[self.rank]
        self._plans = {k: v for k, v in self._plans.items() if k[0] != request.reader}  # its older plans are dead
        self._plans[key] = plan
        self.plans_computed += 1
        log.info(
            "dist publisher %d: planned %d buckets (%.1f MB) for reader %s in %.1f ms",
            self.rank, len(plan.buckets), plan.nbytes / 1e6, request.reader, 1e3 * (time.monotonic() - begin),
        )
        return plan

    def _send(self, group: Any, plan: PairPlan, slot: Slot, reader: str, version: int) -> None:
        assert slot.data is not None
        dst = self.opts.publishers
        works: list = []
        in_buffer: list[list] = [[], []]
        packed = 0
        for tag, bucket in enumerate(plan.buckets):
            if bucket.span >= 0:
                works.append(world.send_bucket(group, slot.data[bucket.span : bucket.span + bucket.nbytes], dst, tag))
                continue
            which = packed % 2
            packed += 1
            wait_all(in_buffer[which], self.opts.timeout_s, lambda i: f"reader {reader}", f"sending version {version}")
            targets, sources, buffer = self._packing(plan, tag, which, slot)
            foreach_copy(targets, sources)
            work = world.send_bucket(group, buffer, dst, tag)
            works.append(work)
            in_buffer[which] = [work]
        wait_all(works, self.opts.timeout_s, lambda i: f"reader {reader}", f"sending version {version}")

    def _packing(self, plan: PairPlan, tag: int, which: int, slot: Slot):
        """Views that pack one packed bucket into pack buffer ``which`` (cached per slot)."""
        key = (id(plan), tag, slot.index)
        cached = self._pack_views.get(key)
        if cached is None:
            bucket = plan.buckets[tag]
            limit = max(b.nbytes for b in plan.buckets if b.span < 0)
            if not self._pack or self._pack[0].numel() < limit:
                self._pack = [torch.empty(limit, dtype=torch.uint8, device=self.device) for _ in range(2)]
                self._pack_views.clear()
            buffer = self._pack[which][: bucket.nbytes]
            cached = (
                [piece_view(buffer, p.at, p) for p in bucket.pieces],
                [local_view(slot.views[self._index[p.source.name]], p.src_box) for p in bucket.pieces],
                buffer,
            )
            self._pack_views[key] = cached
        return cached

    # ------------------------------------------------------------------ failures and lifetime
    def _fail(self, error: PeerGoneError) -> None:
        log.warning("dist publisher %d: %s", self.rank, error)
        with self._failure_lock:
            if self._failure is None:
                self._failure = error

    @property
    def kept_bytes(self) -> int:
        """Memory this side keeps between syncs: its snapshots (of its own shards) and, when a
        reader needs packing, the two pack buffers."""
        return sum(s.data.numel() for s in self.snapshots if s.data is not None) + sum(b.numel() for b in self._pack)

    @property
    def pending_failure(self) -> PeerGoneError | None:
        """A reader failure noticed by the server, to be raised by the next ``save``."""
        return self._failure

    def _take_failure(self) -> PeerGoneError | None:
        with self._failure_lock:
            failure, self._failure = self._failure, None
        return failure

    def close(self) -> None:
        """Stop serving: withdraw this rank's versions, stop its server after the tickets
        already queued, and (rank 0, the store's host) keep the store up until the other
        publishers have stopped too, so none of them finds it gone mid-shutdown."""
        store, self._store = self._store, None
        if store is None:
            return
        try:
            store.set(keys.held_key(self.rank), keys.encode_versions(self._world, []))
            n = store.add(keys.TICKET, 1)
            store.set(keys.request_key(n), keys.Request("", -1, -1, (), stop=self.rank).encode())
        except RuntimeError as e:  # the store host is gone already: the server stopped with it
            log.debug("dist publisher %d: store gone at close: %s", self.rank, e)
            store = None
        if self._server is not None:
            self._server.join(self.opts.timeout_s + 5)
        for group in self._groups.values():
            abandon(group)
        self._groups.clear()
        if store is not None:
            self._leave(store)

    def _leave(self, store: Any) -> None:
        try:
            if self.rank != 0:
                store.set(keys.closed_key(self.rank), b"1")
            elif self.opts.publishers > 1:
                others = [keys.closed_key(s) for s in range(1, self.opts.publishers)]
                store.wait(others, seconds(min(self.opts.timeout_s, CLOSE_WAIT_S)))
        except RuntimeError as e:  # a publisher that died or never closes: leave anyway
            log.debug("dist publisher %d: leaving without the others: %s", self.rank, e)

def _one_device(model: Mapping[str, Any]) -> torch.device:
    devices = {t.device for t in model.values()}
    devices.discard(torch.device("meta"))
    if len(devices) > 1:
        raise ConfigError(f"the dist backend publishes from one device per rank; this model spans {sorted(map(str, devices))}")
    return devices.pop() if devices else torch.device("cpu")


def _changed_keys(old: RankLayout, new: RankLayout) -> list[str]:
    a = {t.name: (t.shape, t.box) for t in old.tensors}
    b = {t.name: (t.shape, t.box) for t in new.tensors}
    changed = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    return changed or sorted({key for key, _ in set(old.aliases.items()) ^ set(new.aliases.items())})
