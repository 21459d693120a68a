"""``[rl] process_mode = "separate"``: the generator in its own process on this host.

The worker re-reads the same TOML (path + overrides) and builds the very same
:class:`rl.generator.Generator`, so its weights arrive through ``[weight_sync]`` exactly as in
the colocated mode: shared memory, DCP or safetensors files, whatever the TOML names. Only
prompts and finished rollouts (small tensors) cross the torch.multiprocessing queues.
"""

from __future__ import annotations

import os
import queue
import traceback
from dataclasses import dataclass, field

import torch
import torch.multiprocessing as mp

from .engines import Rollout, SamplingParams


@dataclass(frozen=True)
class ConfigSource:
    """How to rebuild the job config in another process."""

    path: str | None
    overrides: tuple[str, ...] = field(default_factory=tuple)


class RemoteGeneratorError(RuntimeError):
    pass


def _serve(source: ConfigSource, requests, results, parent_pid: int) -> None:
    try:
        from checkpointing import load_job_config

        from .generator import Generator
        from .loop import configure_threads
        from .model import resolve_device
        from .tokenizer import load_tokenizer

        cfg = load_job_config(source.path, list(source.overrides), default_module="rl.config")
        configure_threads(cfg)
        generator = Generator(cfg, resolve_device(cfg.rl.device), load_tokenizer())
    except BaseException:
        results.put(("error", traceback.format_exc()))
        return
    results.put(("ready", os.getpid()))
    try:
        while True:
            try:
                msg = requests.get(timeout=1.0)
            except queue.Empty:
                if os.getppid() != parent_pid:  # the trainer died (e.g. SIGKILL): do not linger
                    return
                continue
            if msg is None:
                return
            prompts, params, seed, expected_version = msg
            rollout, sync_seconds = generator.rollout(prompts, params, seed, expected_version)
            results.put(("rollout", (rollout, sync_seconds)))
    except BaseException:
        results.put(("error", traceback.format_exc()))
    finally:
        generator.close()


class RemoteGenerator:
    """The trainer's handle on a generator process; same ``rollout`` / ``close`` as Generator."""

    def __init__(self, source: ConfigSource, start_timeout_s: float = 300.0):
        ctx = mp.get_context("spawn")
        self._requests = ctx.Queue()
        self._results = ctx.Queue()
        self._process = ctx.Process(
            target=_serve, args=(source, self._requests, self._results, os.getpid()), name="rl-generator", daemon=True
        )
        self._process.start()
        self.pid = self._receive("ready", start_timeout_s)

    def _receive(self, kind: str, timeout_s: float):
        waited = 0.0
        while True:
            try:
                got, payload = self._results.get(timeout=1.0)
                break
            except queue.Empty:
                waited += 1.0
                if not self._process.is_alive():
                    raise RemoteGeneratorError(f"the generator process exited with code {self._process.exitcode}") from None
                if waited > timeout_s:
                    raise RemoteGeneratorError(f"no answer from the generator process in {timeout_s:.0f} s") from None
        if got == "error":
            raise RemoteGeneratorError("the generator process failed:\n" + payload)
        assert got == kind, (got, kind)
        return payload

    def rollout(self, prompts: torch.Tensor, params: SamplingParams, seed: int, expected_version: int) -> tuple[Rollout, float]:
        self._requests.put((prompts, params, seed, expected_version))
        rollout, sync_seconds = self._receive("rollout", timeout_s=600.0)
        return rollout, sync_seconds

    def close(self) -> None:
        if self._process.is_alive():
            self._requests.put(None)
            self._process.join(timeout=30)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(timeout=10)
