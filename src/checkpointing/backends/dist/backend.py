"""``backend = "dist"``: N trainer ranks publish, any number of generator ranks pull, over
torch.distributed (gloo on CPU, NCCL on GPU).

What the backend promises, and why:

* **Roles.** A ``load_only`` Checkpointer (the generator's) is a *reader*; any other publishes
  on its first ``save`` and reads on its first ``load`` (``[dist] role`` pins one). A publisher
  rank serves its own shards; a reader receives exactly the boxes its tensors hold.
* **Versions, never a torn mix.** A reader lists the versions *every* publisher holds complete;
  a sync pins that version on every publisher before a byte moves (:mod:`.protocol`), so a
  reader gets one version whole or nothing. ``load()`` is the newest, ``load(step)`` a given one.
* **Planned once.** The first sync of a receiver plans from both sides' layouts (:mod:`.plan`);
  later syncs replay the same bucketed transfers: no layout exchange, no planning
  (``plans_computed`` counts, and a log line marks, every plan).
* **A failed sync leaves the receiver as it was**: buckets land in a staging buffer, applied in
  one copy once all arrived (:mod:`.reader`). A dead or silent peer is a
  :class:`~.errors.PeerGoneError` within ``timeout_s``: on the reader at once, on a publisher at
  its next save. A receiver that does not fit fails at planning with a StateMismatchError
  naming the keys.
* **Memory.** A publisher holds ``keep_versions`` snapshots of *its own shards*; a reader one
  staging copy of *its own share*; at most two packed buckets per rank on top. No rank ever
  gathers the full model unless it receives the full model.
* **Model tensors only** (like ``memory``): nothing here survives its processes.
"""

from __future__ import annotations

from typing import Any

import torch

from ...backend import BackendContext, BackendSpec, Capabilities, StepState
from ...errors import ConfigError, StateMismatchError
from .options import DistOptions
from .publisher import Publisher
from .reader import Reader
from .world import address, publisher_rank

PREFIX = "checkpoint.dist"


class DistBackend:
    capabilities = Capabilities(persistent=False, non_tensor_state=False, cross_process=True)

    def __init__(self, ctx: BackendContext):
        self.opts: DistOptions = ctx.options or DistOptions()
        self.host, self.port = address(self.opts, PREFIX)
        role = self.opts.role
        self.role: str | None = role if role != "auto" else ("read" if ctx.load_only else None)
        self._publisher: Publisher | None = None
        self._reader: Reader | None = None
        self.location = f"dist weight-sync world at {self.host}:{self.port}"
        """Where this backend's versions live, for messages."""

    # ------------------------------------------------------------------ roles
    def _claim(self, role: str) -> None:
        if self.role is None:
            self.role = role
        elif self.role != role:
            what = "publishes" if self.role == "publish" else "reads (load_only, or [dist] role = 'read')"
            raise ConfigError(f"this dist Checkpointer {what} on {self.location}; it cannot also {role} there")

    def publisher(self) -> Publisher:
        if self._publisher is None:
            self._publisher = Publisher(self.opts, publisher_rank(self.opts, PREFIX), self.host, self.port)
        return self._publisher

    def reader(self) -> Reader:
        if self._reader is None:
            self._reader = Reader(self.opts, self.host, self.port)
        return self._reader

    @property
    def plans_computed(self) -> int:
        """Reshard plans this Checkpointer computed: the proof that later syncs replay one."""
        side = self._publisher if self.role == "publish" else self._reader
        return side.plans_computed if side is not None else 0

    # ------------------------------------------------------------------ Backend protocol
    def write(self, step: int, state: StepState) -> None:
        self._claim("publish")
        self.publisher().write(step, state.tensors_only("dist", "publish"))

    def read(self, step: int, state: StepState) -> None:
        model = state.tensors_only("dist", "load")
        if self.role == "publish":
            self.publisher().read_own(step, model)
            return
        self._claim("read")
        self.reader().read(step, model)

    def steps(self) -> list[int]:
        if self.role == "publish":
            return self.publisher().steps()
        return self.reader().versions()

    def delete(self, step: int) -> None:
        if self.role == "publish":
            self.publisher().delete(step)

    def close(self) -> None:
        for side in (self._reader, self._publisher):
            if side is not None:
                side.close()


SPEC = BackendSpec(
    name="dist",
    factory=DistBackend,
    capabilities=DistBackend.capabilities,
    options=DistOptions,
    summary="weight sync (model only) from N trainer ranks to readers of any layout over torch.distributed, "
    "reshard planned once",
)
