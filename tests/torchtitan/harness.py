"""Run TorchTitan 0.2.2's own trainer, unmodified, several times in one process, and record what
happened. A test process would spend ~6 s importing torch and TorchTitan per run; one harness
process runs a whole plan of runs to keep the suite fast.

    python tests/torchtitan/harness.py PLAN.json

Each run is what ``python -m torchtitan.train ARGV`` does: ``runpy`` executes ``torchtitan.train``
as ``__main__`` and its ``main(Trainer)`` parses ARGV. What the harness adds, none of it inside
the trainer:

* the CPU shims (:mod:`checkpointing.torchtitan_cpu`), once, as ``titan-train`` applies them;
* ``checkpointing.torchtitan`` is dropped from ``sys.modules`` before each run, so the TOML's
  ``[experimental] custom_import`` imports it afresh, as in a new process (the switch happens at
  import);
* observation: each logged loss (``MetricsProcessor.log``, exact floats, not the rounded log
  text), the checkpointer class whose ``save`` ran, what ``load`` returned (and our
  ``loaded_step``), and a run's exception (type, message);
* TorchTitan's ``train()`` ends with ``time.sleep(2)`` "for other ranks to complete"; with one
  rank there are none, and the harness skips that wait (2 s per run, nothing else is slept);
* ``kill_after_save: N``: right after the trainer's ``save(N)`` returns, the process sends
  itself SIGKILL: no cleanup, no ``close()``, no atexit, exactly a crash after a save. Such a
  run must be the last of its plan.

Results are written to ``PLAN.results.json`` after every run (before a kill too).
"""

from __future__ import annotations

import json
import os
import runpy
import signal
import sys
import time
import traceback
import warnings

RESULTS: list[dict] = []
CURRENT: dict = {}


def _flush(path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(RESULTS, f)
    os.replace(tmp, path)


def instrument(results_path: str) -> None:
    import torchtitan.components.checkpoint as stock
    import torchtitan.components.metrics as metrics

    import checkpointing.manager as ours

    log = metrics.MetricsProcessor.log

    def record_loss(self, step, global_avg_loss, *args, **kwargs):
        CURRENT["losses"][str(step)] = float(global_avg_loss)
        return log(self, step, global_avg_loss, *args, **kwargs)

    metrics.MetricsProcessor.log = record_loss

    def watch_save(cls):
        save = cls.save

        def save_then_maybe_die(self, curr_step, last_step=False):
            CURRENT.setdefault("checkpointer", f"{type(self).__module__}.{type(self).__name__}")
            save(self, curr_step, last_step=last_step)
            if CURRENT.get("kill_after_save") == curr_step:
                CURRENT["killed_after_save"] = curr_step
                _flush(results_path)
                os.kill(os.getpid(), signal.SIGKILL)

        cls.save = save_then_maybe_die

    def watch_load(cls):
        load = cls.load

        def load_and_record(self, step=-1):
            loaded = load(self, step)
            CURRENT["loaded"] = {"returned": loaded, "step": getattr(self, "loaded_step", None)}
            return loaded

        cls.load = load_and_record

    for cls in (ours.Checkpointer, stock.CheckpointManager):
        watch_save(cls)
        watch_load(cls)

    sleep = time.sleep
    time.sleep = lambda seconds: None if seconds == 2 else sleep(seconds)


def run_one(run: dict) -> None:
    from torchtitan.config import ConfigManager

    sys.modules.pop("checkpointing.torchtitan", None)
    # What `python -m torchtitan.train ARGV` would parse: TorchTitan's parse_args() reads the
    # sys.argv[1:] bound when its module was imported, so each run's ARGV is handed over here.
    ConfigManager.parse_args.__defaults__ = (list(run["argv"]),)
    runpy.run_module("torchtitan.train", run_name="__main__", alter_sys=True)


def main(plan_path: str) -> None:
    from checkpointing import torchtitan_cpu
    from checkpointing.titan_train import single_process_env

    warnings.filterwarnings("ignore", message=".*found in sys.modules after import of package.*")
    results_path = plan_path.replace(".json", "") + ".results.json"
    with open(plan_path) as f:
        plan = json.load(f)
    single_process_env()
    torchtitan_cpu.apply_if_no_accelerator()
    instrument(results_path)
    import torch.distributed as dist

    for run in plan["runs"]:
        CURRENT.clear()
        CURRENT.update(name=run["name"], losses={}, kill_after_save=run.get("kill_after_save"), error=None)
        RESULTS.append(CURRENT)
        begin = time.monotonic()
        try:
            run_one(run)
        except BaseException as e:  # SystemExit from tyro included: the test reads it
            CURRENT["error"] = {"type": type(e).__name__, "module": type(e).__module__, "message": str(e)}
            CURRENT["traceback"] = traceback.format_exc()
            if dist.is_initialized():  # main() re-raises without tearing the group down
                dist.destroy_process_group()
        CURRENT["seconds"] = round(time.monotonic() - begin, 2)
        RESULTS[-1] = dict(CURRENT)
        _flush(results_path)


if __name__ == "__main__":
    main(sys.argv[1])
