"""What a forked child does: runs in a process that is expected to die (or to be polled).

Each job rebuilds the known versions itself (see :mod:`versions`), so the parent checks the
result against the same bytes without being told anything.
"""

from __future__ import annotations

import os
import time

from tests.checkpointing.cases import case_backend
from tests.checkpointing.faults import killpoints
from tests.checkpointing.faults.versions import BASE_SEED, Side, base_weights

NOT_REACHED = 3
"""Exit code of a child whose doomed save completed: the kill point was never passed."""
NO_RECIPE = 4
"""Exit code of a child that does not know how to die at that point on this backend."""


def crash(case: str, base_folder: str, channel: str, point: str) -> None:
    """Commit the previous step(s), then die at ``point`` during the next save."""
    kp = killpoints.BY_NAME[point]
    trap = killpoints.Trap(point, os.path.join(base_folder, "checkpoint"), case_backend(case))
    try:
        trap.install()
    except LookupError as e:
        print(e, flush=True)
        os._exit(NO_RECIPE)
    base = base_weights()
    side = Side(case, base_folder, channel, seed=BASE_SEED, keep_latest_k=2)
    previous = [1, 2] if kp.purge else [1]
    for version in previous:
        side.save_version(base, version)
    trap.arm()
    side.save_version(base, previous[-1] + 1)
    os._exit(NOT_REACHED)


def publish(case: str, base_folder: str, channel: str, versions: int, handshake: str, pause_s: float = 0.0) -> None:
    """Commit versions 1..N back to back (keep_latest_k=2, so old steps are retired under the
    reader's feet), starting once the reader is polling and closing only once it has checked the
    last version (a memory channel goes away with its publisher).

    ``handshake`` is a directory: the reader creates ``go`` and ``release`` and keeps the newest
    step it loaded in ``seen``; we create ``published``. Before the next version we wait (briefly)
    for the reader to have loaded the last one, so even on a loaded machine the reader's loads
    overlap our writes many times instead of only ever catching the final version."""
    base = base_weights()
    side = Side(case, base_folder, channel, seed=BASE_SEED, keep_latest_k=2)
    _wait_for(os.path.join(handshake, "go"))
    for version in range(1, versions + 1):
        side.save_version(base, version)
        _wait_until_seen(os.path.join(handshake, "seen"), version, timeout_s=1.0)
        if pause_s:
            time.sleep(pause_s)
    open(os.path.join(handshake, "published"), "w").close()
    _wait_for(os.path.join(handshake, "release"))
    side.close()


def _wait_until_seen(path: str, version: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with open(path) as f:
                if int(f.read() or -1) >= version:
                    return
        except (FileNotFoundError, ValueError):
            pass
        time.sleep(0.002)


def _wait_for(path: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.005)
