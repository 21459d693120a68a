"""``[checkpoint.dist]`` / ``[weight_sync.dist]``: the distributed weight-sync backend's keys.

No ``from __future__ import annotations``: TorchTitan's ConfigManager and tyro read these
annotations as real types.
"""

import math
import re
from dataclasses import dataclass
from typing import Literal

from ...errors import ConfigError

MIN_BUCKET_BYTES = 4096
INIT_METHOD = re.compile(r"env://|tcp://(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(?P<port>[0-9]{1,5})")


@dataclass
class DistOptions:
    """N publisher ranks (a trainer) serve versioned weights to any number of readers (generator
    ranks, each with its own layout) over torch.distributed; see docs/architecture.md."""

    init_method: str = "env://"
    """Where the weight-sync world meets: ``tcp://HOST:PORT`` is the store publisher rank 0
    hosts (readers and the other publishers connect to it); ``env://`` takes HOST from
    ``MASTER_ADDR`` and PORT from ``WEIGHT_SYNC_PORT``, else ``MASTER_PORT + 1`` (torchrun's
    variables; the trainer's own world keeps ``MASTER_PORT``)."""
    publishers: int = 1
    """How many ranks publish: the trainer's ranks 0..N-1, each serving its own shards. A
    publisher's rank is its torch.distributed rank (``RANK`` under torchrun)."""
    role: Literal["auto", "publish", "read"] = "auto"
    """``auto``: a ``load_only`` Checkpointer reads; any other publishes on its first save and
    reads on its first load. Set it to pin a process to one side."""
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """Process-group backend of the transfers: ``auto`` is NCCL when the weights are on CUDA,
    else gloo. The publishers' choice rules; readers follow it."""
    bucket_size_mb: float = 64.0
    """Largest message, in MiB: tensors move in buckets of at most this size (a tensor bigger
    than one bucket is split), and at most two packed buckets per rank exist at a time."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Dtype the publisher snapshots and sends floating tensors in; ``auto`` keeps the model's.
    Readers cast into their own tensors' dtype."""
    keep_versions: int = 1
    """Snapshots a publisher holds (each one copy of *its own shard*). With 1, a save waits for a
    reader still pulling the previous version; with 2 it does not."""
    timeout_s: float = 60.0
    """A peer that answers nothing for this long is gone: typed error, never a hang."""
    join_timeout_s: float = 300.0
    """How long a rank waits for the others to start and join the world (first save/load)."""

    @property
    def bucket_bytes(self) -> int:
        return int(self.bucket_size_mb * (1 << 20))

    def validate(self, prefix: str) -> None:
        match = INIT_METHOD.fullmatch(self.init_method) if isinstance(self.init_method, str) else None
        if match is None:
            raise ConfigError(f"{prefix}.init_method = {self.init_method!r}; allowed: 'env://' or 'tcp://HOST:PORT'")
        if match.group("port") is not None and not 0 < int(match.group("port")) < 65536:
            raise ConfigError(f"{prefix}.init_method = {self.init_method!r}: port {match.group('port')} is not in 1..65535")
        for key in ("publishers", "keep_versions"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{prefix}.{key} = {getattr(self, key)}; it must be >= 1")
        if not (math.isfinite(self.bucket_size_mb) and self.bucket_size_mb * (1 << 20) >= MIN_BUCKET_BYTES):
            raise ConfigError(f"{prefix}.bucket_size_mb = {self.bucket_size_mb}; it must be >= {MIN_BUCKET_BYTES / (1 << 20):g} (4 KiB)")
        for key in ("timeout_s", "join_timeout_s"):
            if not (math.isfinite(getattr(self, key)) and getattr(self, key) > 0):
                raise ConfigError(f"{prefix}.{key} = {getattr(self, key)}; it must be a finite number > 0")
