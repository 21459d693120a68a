"""The distributed weight-sync backend (``backend = "dist"``): N trainer ranks -> M generator
ranks over torch.distributed, with a reshard plan computed once and replayed every sync.

Modules, one concept each: :mod:`.options` (the TOML table), :mod:`.layout` (what a rank holds
of each tensor), :mod:`.plan` (the reshard plan and its buckets), :mod:`.snapshot` (a
publisher's versions), :mod:`.protocol` (store records and the handshake of one sync),
:mod:`.world` (rendezvous and process groups), :mod:`.publisher` and :mod:`.reader` (the two
sides), :mod:`.backend` (the Backend protocol and its ``SPEC``).
"""

from .backend import SPEC, DistBackend
from .errors import PeerGoneError
from .options import DistOptions

__all__ = ["SPEC", "DistBackend", "DistOptions", "PeerGoneError"]
