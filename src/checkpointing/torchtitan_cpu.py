"""Run TorchTitan 0.2.2's own ``Trainer`` on a machine without an accelerator.

TorchTitan assumes a GPU in three places that have nothing to do with checkpointing; each gets
the smallest stand-in that keeps the trainer's code path (model, optimizer, data, loss, the
checkpointer calls) exactly as it is:

1. **Device type.** ``torchtitan.tools.utils`` computes ``device_type =
   _get_available_device_type() or "cuda"`` once, at import, and other TorchTitan modules copy
   the name (``from torchtitan.tools.utils import device_type, device_module``). On a CPU-only
   torch that is ``"cuda"``: ``torch.cuda.set_device`` fails, the process group would be NCCL.
   We set ``"cpu"`` / ``torch.cpu`` in ``torchtitan.tools.utils`` and in every already-imported
   TorchTitan module holding a copy; modules imported later copy the new value themselves.
   ``torch.cpu`` has ``set_device``/``current_device``/``synchronize``, and DeviceMesh and gloo
   take ``"cpu"``.
2. **Device memory monitor.** ``torch.cpu`` has no ``get_device_name``/``memory_stats``, which
   ``build_device_memory_monitor`` calls. It is replaced by :class:`CPUMemoryMonitor`, which
   reports the process's peak resident memory against the machine's RAM in the same fields.
3. **``set_pg_timeouts``** runs ``barrier(device_ids=[current_device()])`` after step 1; gloo
   refuses ``device_ids``. The stand-in runs the same barrier without them and keeps the
   process groups' initial timeout (``comm.init_timeout_seconds``) for the whole run.

Nothing here changes TorchTitan's files or any torch function; only TorchTitan module
attributes are rebound, in this process, and only by :func:`apply_if_no_accelerator`, which
``titan-train`` calls before it starts TorchTitan's ``main``. With an accelerator present it
does nothing.
"""

from __future__ import annotations

import logging
import os
import resource
import sys
from datetime import timedelta
from types import ModuleType
from typing import Any

import torch

log = logging.getLogger(__name__)

SHIMS = ("device type 'cpu'", "RSS-based memory monitor", "set_pg_timeouts without device_ids")


def has_accelerator() -> bool:
    return torch.accelerator.is_available()


def apply_if_no_accelerator() -> bool:
    """Apply the CPU shims when torch sees no accelerator; returns whether they were applied."""
    if has_accelerator():
        return False
    apply()
    return True


def apply() -> None:
    """Apply all three shims (idempotent) and say so in the log."""
    _use_cpu_device()
    import torchtitan.components.metrics as metrics
    import torchtitan.distributed.utils as dist_utils

    metrics.build_device_memory_monitor = build_cpu_memory_monitor
    dist_utils.set_pg_timeouts = set_pg_timeouts_cpu
    log.warning(
        "No accelerator found: running TorchTitan's trainer on CPU with gloo. CPU shims applied "
        "(checkpointing.torchtitan_cpu): %s.",
        "; ".join(SHIMS),
    )


def _use_cpu_device() -> None:
    import torchtitan.tools.utils as utils

    stock_type, stock_module = utils.device_type, utils.device_module
    for module in _torchtitan_modules():
        if vars(module).get("device_type") is stock_type and isinstance(stock_type, str):
            vars(module)["device_type"] = "cpu"
        if vars(module).get("device_module") is stock_module and isinstance(stock_module, ModuleType):
            vars(module)["device_module"] = torch.cpu
    utils.device_type, utils.device_module = "cpu", torch.cpu


def _torchtitan_modules() -> list[ModuleType]:
    return [m for name, m in list(sys.modules.items()) if name.split(".")[0] == "torchtitan" and m is not None]


class CPUMemoryMonitor:
    """TorchTitan's ``DeviceMemoryMonitor`` surface, for the CPU: "device memory" is this
    process's peak resident set (``ru_maxrss``) out of the machine's physical RAM. Allocator
    retries and OOMs do not exist here and read 0."""

    def __init__(self) -> None:
        self.device_name = "cpu"
        self.device_capacity = _physical_memory_bytes()
        self.device_capacity_gib = self.device_capacity / (1 << 30)

    def get_peak_stats(self):
        from torchtitan.components.metrics import DeviceMemStats

        peak = _peak_rss_bytes()
        gib = peak / (1 << 30)
        pct = 100.0 * peak / self.device_capacity if self.device_capacity else 0.0
        return DeviceMemStats(gib, pct, gib, pct, 0, 0)

    def reset_peak_stats(self) -> None:
        """The kernel keeps one high-water mark per process; it cannot be reset."""


def build_cpu_memory_monitor() -> CPUMemoryMonitor:
    monitor = CPUMemoryMonitor()
    log.info("CPU capacity: %.2fGiB of RAM (memory figures are this process's peak RSS)", monitor.device_capacity_gib)
    return monitor


def set_pg_timeouts_cpu(timeout: timedelta, parallel_dims: Any) -> None:
    """TorchTitan's ``set_pg_timeouts`` for gloo: the same synchronization, no ``device_ids``."""
    import torch.distributed as dist

    log.info("CPU: synchronizing ranks; keeping the initial process-group timeout (not %s)", timeout)
    if dist.is_initialized():
        dist.barrier()


def _physical_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 0


def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB
