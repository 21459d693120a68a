"""The weight-sync world: where its ranks meet, and the process groups the transfers run on.

Publisher rank 0 hosts a ``torch.distributed.TCPStore`` at ``init_method``; the other
publishers and every reader connect to it. The store carries only small records (layouts once,
then a few version numbers per sync: :mod:`.protocol`); tensors move over process groups built
on that store, one per reader: the N publishers are ranks 0..N-1, the reader is rank N. A
per-reader group means readers join late, leave, or die without touching each other's groups,
and a reader restarted under the same name is simply a new group.

These groups are *not* the processes' torch.distributed world: a trainer's world is its FSDP
group, and a generator may have a world of its own (tensor parallel) or none. So they are built
directly on the store (:func:`checkpointing._compat.standalone_process_group`), never registered
globally, and torch.distributed's own state is left alone.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
from typing import Any

import torch

from ..._compat import standalone_process_group
from ...errors import ConfigError
from .errors import PeerGoneError
from .options import INIT_METHOD, DistOptions

log = logging.getLogger(__name__)

FOREVER = datetime.timedelta(days=365)
"""The store timeout of a wait that is ended by a message, not by a clock (an idle server)."""


def seconds(s: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=s)


def address(opts: DistOptions, prefix: str) -> tuple[str, int]:
    """(host, port) of the weight-sync store."""
    match = INIT_METHOD.fullmatch(opts.init_method)
    assert match is not None  # validated
    if match.group("port") is not None:
        return match.group("host").strip("[]"), int(match.group("port"))
    host = os.environ.get("MASTER_ADDR", "127.0.0.1")
    port = os.environ.get("WEIGHT_SYNC_PORT")
    if port is None and os.environ.get("MASTER_PORT"):
        port = str(int(os.environ["MASTER_PORT"]) + 1)
    if port is None or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(
            f"{prefix}.init_method = 'env://' needs WEIGHT_SYNC_PORT (or MASTER_PORT, as torchrun sets it) to be a "
            f"port number; got WEIGHT_SYNC_PORT={os.environ.get('WEIGHT_SYNC_PORT')!r}, "
            f"MASTER_PORT={os.environ.get('MASTER_PORT')!r}. Or set {prefix}.init_method = 'tcp://HOST:PORT'"
        )
    return host, int(port)


def publisher_rank(opts: DistOptions, prefix: str) -> int:
    """This publisher's rank: its torch.distributed rank (``RANK`` under torchrun), checked
    against ``publishers``."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        rank, size = dist.get_rank(), dist.get_world_size()
        if size != opts.publishers:
            raise ConfigError(
                f"{prefix}.publishers = {opts.publishers}, but this trainer's torch.distributed world has {size} ranks; "
                f"every rank of the trainer publishes its own shards: set {prefix}.publishers = {size}"
            )
        return rank
    rank = int(os.environ.get("RANK", "0") or 0)
    if not 0 <= rank < opts.publishers:
        raise ConfigError(f"this process is RANK {rank}, outside {prefix}.publishers = {opts.publishers} (ranks 0..{opts.publishers - 1})")
    return rank


def pick_backend(setting: str, device: torch.device) -> str:
    if setting != "auto":
        return setting
    return "nccl" if device.type == "cuda" and torch.distributed.is_nccl_available() else "gloo"


def transfer_device(backend: str, device: torch.device) -> torch.device:
    """Where snapshots and staging live: on the accelerator for NCCL, in host memory for gloo."""
    return device if backend == "nccl" else torch.device("cpu")


# ---------------------------------------------------------------------------- the store
def host_store(host: str, port: int, timeout_s: float) -> Any:
    from torch.distributed import TCPStore

    try:
        return TCPStore(host, port, None, True, seconds(timeout_s), wait_for_workers=False)
    except RuntimeError as e:
        raise ConfigError(
            f"publisher rank 0 cannot host the weight-sync store on port {port}: {e}. Another job (or an earlier "
            "publisher that has not exited) holds it; pick another port in init_method / WEIGHT_SYNC_PORT"
        ) from None


def listening(host: str, port: int) -> bool:
    """Is anything accepting connections there? (A refused connect is instant, where a store
    client would retry until its timeout and log every attempt.)"""
    try:
        with socket.create_connection((host, port), timeout=2.0):
            return True
    except OSError:
        return False


def connect_store(host: str, port: int, timeout_s: float, wait_s: float) -> Any:
    """A client of the store; waits up to ``wait_s`` for it to come up."""
    from torch.distributed import TCPStore

    try:
        return TCPStore(host, port, None, False, seconds(max(wait_s, 0.1)))
    except RuntimeError as e:
        raise PeerGoneError(
            f"no weight-sync store at {host}:{port} after {wait_s:.0f} s (publisher rank 0 hosts it): {e}", "publisher 0"
        ) from None


def client(host: str, port: int, timeout_s: float, wait_s: float) -> Any:
    store = connect_store(host, port, timeout_s, wait_s)
    store.set_timeout(seconds(timeout_s))
    return store


# ---------------------------------------------------------------------------- transfer groups
def reader_group(store: Any, reader_id: str, rank: int, publishers: int, backend: str, timeout_s: float, join_s: float, device: torch.device) -> Any:
    """The process group of one reader: publishers are ranks 0..N-1, the reader rank N. Every
    member must call this; it returns once all have (or raises after ``join_s``)."""
    from torch.distributed import PrefixStore

    store.set_timeout(seconds(join_s))
    try:
        return standalone_process_group(backend, PrefixStore(f"pg/{reader_id}/", store), rank, publishers + 1, seconds(timeout_s), device)
    except RuntimeError as e:
        who = "the publishers" if rank == publishers else f"reader {reader_id}"
        raise PeerGoneError(f"the weight-sync group of reader {reader_id} did not form within {join_s:.0f} s ({who} never joined): {e}", who) from None
    finally:
        store.set_timeout(seconds(timeout_s))


def send_bucket(group: Any, tensor: torch.Tensor, dst: int, tag: int) -> Any:
    """One bucket to rank ``dst`` (asynchronous; the returned work is waited on)."""
    return group.send([tensor], dst, tag)


def recv_bucket(group: Any, tensor: torch.Tensor, src: int, tag: int) -> Any:
    return group.recv([tensor], src, tag)


def wait_all(works: list, timeout_s: float, peer_of, what: str) -> None:
    """Wait for every transfer; the first failure or silence longer than ``timeout_s`` is a
    PeerGoneError naming the peer. Works already started are still waited on (bounded), so no
    transfer is left writing into a buffer after we return."""
    failure: PeerGoneError | None = None
    for index, work in enumerate(works):
        try:
            work.wait(seconds(timeout_s if failure is None else 0.05))
        except RuntimeError as e:
            if failure is None:
                peer = peer_of(index)
                failure = PeerGoneError(f"{what}: {peer} failed or went silent for {timeout_s:g} s ({_first_line(e)})", peer)
    if failure is not None:
        raise failure


def abandon(group: Any) -> None:
    """Drop a group after a failure: its connections to a dead peer are useless."""
    if group is None:
        return
    try:
        group.abort()
    except RuntimeError as e:  # best effort: the peer is gone either way
        log.debug("aborting a weight-sync group: %s", e)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__
