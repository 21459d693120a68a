"""One load of a (possibly hostile) checkpoint, judged against the loader's promise:

    a typed error or a bit-exact load; the receiver untouched on error; no hang; bounded time
    and memory.

The load runs in a separate worker process (:class:`LoadWorker`): a hang that holds the GIL
(an exponential ``repr`` or hash inside C code) cannot be interrupted in-process, a crash
(SIGBUS, segfault) must not take the test run with it, and an address-space cap must not leak
into the test process. The worker pays the torch/TorchTitan imports once (forking a fresh
child per load is not an option: importing TorchTitan's models starts a native thread) and is
killed and replaced when a load hangs or crashes. It answers each load with a
:class:`Verdict`; :func:`problems` says what, if anything, broke the promise.

"Bit-exact" is only owed when the loader can know the bytes are the writer's: the step's
manifest untouched and ``verify = "checksum"`` (or a memory channel with data checksums). A
step that lost its manifest, or was resealed, or is read with ``verify = "size" | "off"``, may
legitimately load other weights; it must still never half-load: then every receiver element
must have been written ("stale" counts elements still holding their old value that the saved
version would have changed).
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

LOAD_LIMIT_S = 20.0
"""Longest a single load of the tiny test model may take, on a loaded 2-core machine, before it
counts as unbounded (they take ~0.1 s)."""
MEMORY_HEADROOM = 1 << 30
"""Address space a load may add (the model is ~1 MB): a loader that believes a size it read
fails against this cap instead of reserving it."""
RSS_LIMIT = 512 << 20


@dataclass
class Verdict:
    loaded: bool | None = None
    loaded_step: int = -1
    error_type: str | None = None
    error_typed: bool = False
    error_message: str = ""
    memory_error: bool = False
    untouched: bool = True
    exact: bool = False
    stale: int = 0
    seconds: float = 0.0
    rss_growth: int = 0
    notes: list[str] = field(default_factory=list)


def _status(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak_rss() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (the peak) to the current RSS
    except OSError:
        pass


def judge_one(case: str, base_folder: str, channel: str, verify: str = "checksum", verify_data: bool = False) -> Verdict:
    """Build a stranger receiver, load into it, and describe what happened."""
    import torch

    from checkpointing import Checkpointer, CheckpointError
    from tests.checkpointing.cases import make_config
    from tests.checkpointing.faults.crafted import address_space_headroom, raised_memory_error
    from tests.checkpointing.faults.versions import (
        STRANGER_SEED,
        base_weights,
        expected_tensor,
        holds_training_state,
        snapshot,
        titan_adapter,
        train_state_for,
    )
    from tests.helpers import TrainState, build_titan_model

    verdict = Verdict()
    base = base_weights()
    model = build_titan_model(seed=STRANGER_SEED)
    full = holds_training_state(case, channel)
    ts = TrainState(step=-7) if full else None
    before = snapshot(model)
    ckpt = None
    _reset_peak_rss()
    rss_before = _status("VmRSS")
    begin = time.monotonic()
    try:
        with address_space_headroom(MEMORY_HEADROOM):
            cfg = make_config(case, channel, load_only=True, verify=verify)
            cfg.memory.verify_data = verify_data
            ckpt = Checkpointer(model_parts=[model], states={"train_state": ts} if full else None, checkpoint_config=cfg,
                                sd_adapter=titan_adapter(model), base_folder=base_folder)
            verdict.loaded = ckpt.load()
            verdict.loaded_step = ckpt.loaded_step
    except BaseException as e:  # judged below, whatever it is
        verdict.error_type = f"{type(e).__module__}.{type(e).__qualname__}"
        verdict.error_typed = isinstance(e, CheckpointError)
        try:
            verdict.error_message = str(e)[:600]
        except BaseException:
            verdict.error_message = "<str() failed>"
        verdict.memory_error = raised_memory_error(e)
        verdict.loaded_step = ckpt.loaded_step if ckpt is not None else -1
    verdict.seconds = time.monotonic() - begin
    verdict.rss_growth = max(0, _status("VmHWM") - rss_before)
    after = model.state_dict()
    changed = [k for k, v in after.items() if not torch.equal(v, before[k])]
    ts_changed = ts is not None and (ts.step, ts.losses) != (-7, [])
    verdict.untouched = not changed and not ts_changed and verdict.loaded_step == -1
    mismatched = [k for k, v in after.items() if not torch.equal(v, expected_tensor(base[k], 1))]
    want_ts = train_state_for(1)
    # A step named step-0 is a seed checkpoint: loaded model-only, by policy (the manager's).
    ts_ok = ts is None or (ts.step, ts.losses) == (want_ts.step, want_ts.losses) or (
        verdict.loaded_step == 0 and (ts.step, ts.losses) == (-7, [])
    )
    verdict.exact = not mismatched and ts_ok
    for key, value in after.items():
        expected = expected_tensor(base[key], 1)
        verdict.stale += int(((value == before[key]) & (expected != before[key])).sum())
    if changed and verdict.error_type is not None:
        verdict.notes.append(f"changed on error: {changed[:5]}")
    if mismatched:
        verdict.notes.append(f"not version 1: {mismatched[:5]}")
    if ckpt is not None:
        try:
            ckpt.close()
        except BaseException:
            pass
    return verdict


def problems(verdict: Verdict, exact_owed: bool) -> list[str]:
    """Every way ``verdict`` breaks the promise (empty: it holds)."""
    out = []
    if verdict.error_type is not None:
        if not verdict.error_typed:
            out.append(f"untyped error {verdict.error_type}: {verdict.error_message[:300]}")
        if verdict.memory_error:
            out.append(f"tried a huge allocation: {verdict.error_message[:300]}")
        if not verdict.untouched:
            out.append(f"receiver modified by a failed load ({verdict.error_type}); {verdict.notes}")
    elif verdict.loaded:
        if exact_owed and not verdict.exact:
            out.append(f"loaded weights that are not the saved version (verified mode); {verdict.notes}")
        if verdict.stale:
            out.append(f"loaded, but {verdict.stale} receiver elements were never written (a half load)")
    elif not verdict.untouched:
        out.append(f"load() returned {verdict.loaded} but the receiver changed; {verdict.notes}")
    if verdict.seconds > LOAD_LIMIT_S:
        out.append(f"took {verdict.seconds:.1f} s (limit {LOAD_LIMIT_S} s)")
    if verdict.rss_growth > RSS_LIMIT:
        out.append(f"resident memory grew by {verdict.rss_growth >> 20} MiB (limit {RSS_LIMIT >> 20} MiB)")
    return out


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


class LoadWorker:
    """Client side: ``judge(...)`` sends one load to the worker and waits at most ``timeout_s``.
    A load that takes longer is a hang: the worker is killed (the next ``judge`` starts a new
    one) and the problem reported; so is a worker that dies (a crash)."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self._log = tempfile.NamedTemporaryFile(prefix="load-worker-", suffix=".log", delete=False)

    def _start(self) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.checkpointing.faults.judge"], cwd=REPO_ROOT, env=env, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=self._log, start_new_session=True, text=True, bufsize=1,
        )
        if self._readline(300.0).strip() != "ready":
            raise RuntimeError(f"load worker did not start:\n{self.log_tail()}")

    def log_tail(self) -> str:
        with open(self._log.name, errors="replace") as f:
            return f.read()[-3000:]

    def _readline(self, timeout: float) -> str:
        assert self.proc is not None and self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise TimeoutError
        return self.proc.stdout.readline()

    def judge(self, timeout_s: float, exact_owed: bool, **load: Any) -> tuple[Verdict | None, list[str]]:
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(load) + "\n")
        self.proc.stdin.flush()
        try:
            line = self._readline(timeout_s)
        except TimeoutError:
            self.kill()
            return None, [f"the load did not finish within {timeout_s:.0f} s (hang)"]
        if not line:
            code = self.proc.wait()
            return None, [f"the loading process died ({'signal ' + str(-code) if code < 0 else 'exit ' + str(code)}):\n{self.log_tail()}"]
        verdict = Verdict(**json.loads(line))
        return verdict, problems(verdict, exact_owed)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # the worker's own session only
            except ProcessLookupError:
                pass
            self.proc.wait()

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()
        os.unlink(self._log.name)


def _serve() -> None:
    """Worker side: warm up (imports, the model code), then judge one load per input line."""
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # stray prints go to the log; stdout carries verdicts only
    import checkpointing.backends.dcp
    import checkpointing.backends.hf.backend
    import checkpointing.backends.memory.shm  # noqa: F401
    from tests.checkpointing.faults.versions import base_weights, titan_adapter
    from tests.helpers import build_titan_model

    base_weights()
    titan_adapter(build_titan_model())
    print("ready", file=protocol)
    for line in sys.stdin:
        verdict = judge_one(**json.loads(line))
        print(json.dumps(asdict(verdict)), file=protocol)


if __name__ == "__main__":
    _serve()
