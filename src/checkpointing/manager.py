"""The Checkpointer: TorchTitan's CheckpointManager surface, every checkpoint *policy* once.

Interval, first-step and last-step saves, model-only exports in ``export_dtype``, retention
(``keep_latest_k``), ``exclude_from_loading``, ``load_step``, initial loads (DCP or Hugging Face),
seed checkpoints, ``load_only`` and async saves are decided here, for every backend. A backend
(:mod:`checkpointing.backend`) only moves one step's state in and out of storage.

The RL generator uses this same class over just its model: ``load()`` pulls the newest step.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Iterable

import torch
import torch.nn as nn

from .backend import Backend, BackendContext, StepState, create_backend
from .config import CheckpointConfig, validate_checkpoint_config
from .errors import AsyncSaveError, ConfigError, StepNotFoundError
from .state import (
    DATALOADER,
    LR_SCHEDULER,
    MODEL,
    OPTIMIZER,
    TRAIN_STATE,
    ModelState,
    apply_state,
    cast_tensors,
    plain_state,
)

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Checkpointer:
    """Save and load training state through the backend named by ``checkpoint_config.backend``.

    Arguments follow TorchTitan 0.2.2's ``CheckpointManager``; all but ``model_parts`` and
    ``checkpoint_config`` may be None, so a generator builds one over just its model.
    ``sd_adapter`` is a TorchTitan state-dict adapter *instance* (needed by ``hf`` and by
    ``initial_load_in_hf``).
    """

    def __init__(
        self,
        dataloader: Any = None,
        model_parts: nn.Module | Iterable[nn.Module] | None = None,
        optimizers: Any = None,
        lr_schedulers: Any = None,
        states: dict[str, Any] | None = None,
        checkpoint_config: Any = None,
        sd_adapter: Any = None,
        base_folder: str = "",
        ft_manager: Any = None,
    ) -> None:
        if model_parts is None:
            raise ConfigError("Checkpointer needs model_parts: the nn.Module(s) whose weights it saves/loads")
        if ft_manager is not None:
            raise ConfigError("torchft (ft_manager) is not supported by this Checkpointer")
        self.config = checkpoint_config if checkpoint_config is not None else CheckpointConfig(enable=True)
        validate_checkpoint_config(self.config, "checkpoint")
        self.backend_name: str = getattr(self.config, "backend", "dcp")
        self.enable: bool = self.config.enable
        self.load_only: bool = self.config.load_only
        self.folder = os.path.join(base_folder, self.config.folder)
        self.sd_adapter = sd_adapter
        self.export_dtype = _DTYPES[self.config.export_dtype]
        self.async_mode = self.config.async_mode.lower()

        self.model = ModelState(model_parts)
        self.states: dict[str, Any] = dict(states or {})
        for key, obj in ((OPTIMIZER, optimizers), (LR_SCHEDULER, lr_schedulers), (DATALOADER, dataloader)):
            if obj is not None:
                self.states[key] = obj
        if MODEL in self.states:
            raise ConfigError(f"states may not use the reserved key {MODEL!r}")
        self._check_exclusions()

        self.loaded_step: int = -1
        """Step of the last successful load (the generator's policy version); -1 before any."""
        self.last_save_seconds = 0.0
        self.last_load_seconds = 0.0
        self._backend: Backend | None = None
        self._pending: Future | None = None
        self._staging: Future | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._closed = False
        if not self.enable:
            return
        self._process_group = self._make_process_group()
        self._backend = self._build_backend(self.backend_name, self.folder)
        caps = self._backend.capabilities
        if self.states and not caps.non_tensor_state:
            raise ConfigError(
                f"checkpoint.backend = {self.backend_name!r} holds model tensors only, but this Checkpointer "
                f"also has {sorted(self.states)}; use a backend that keeps training state (dcp, hf) for "
                "resumable checkpoints, or build this Checkpointer over the model alone"
            )
        if self.async_mode != "disabled":
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-async")
        cleanup = getattr(self._backend, "cleanup_partials", None)
        if cleanup and not self.load_only:
            cleanup()

    # ------------------------------------------------------------------ construction helpers
    def _check_exclusions(self) -> None:
        # TorchTitan's own keys may be named even when not held here: a generator built over just
        # its model reads the trainer's TOML, and there is simply nothing to skip. Other names
        # are typos.
        allowed = list(dict.fromkeys([MODEL, OPTIMIZER, LR_SCHEDULER, DATALOADER, TRAIN_STATE, *self.states]))
        for key in self.config.exclude_from_loading:
            if key not in allowed:
                raise ConfigError(
                    f"checkpoint.exclude_from_loading names {key!r}, which is not a state of this Checkpointer; "
                    f"allowed: {', '.join(allowed)}"
                )

    def _make_process_group(self):
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return None
        if self.async_mode != "disabled":
            # Background saves run collectives off the main thread: give them their own group.
            return dist.new_group(backend="gloo")
        return None

    def _build_backend(self, name: str, folder: str) -> Backend:
        ctx = BackendContext(
            folder=folder, config=self.config, sd_adapter=self.sd_adapter, process_group=self._process_group
        )
        return create_backend(name, ctx)

    @property
    def backend(self) -> Backend:
        if self._backend is None:
            raise ConfigError("checkpointing is disabled (checkpoint.enable = false)")
        return self._backend

    # ------------------------------------------------------------------ state assembly
    def _full_state(self) -> StepState:
        return StepState(
            model=dict(self.model.state_dict()),
            extras={k: plain_state(v) for k, v in self.states.items()},
        )

    def _model_only_state(self, dtype: torch.dtype | None = None) -> StepState:
        model = dict(self.model.state_dict())
        if dtype is not None and dtype != torch.float32:
            model = cast_tensors(model, dtype)
        return StepState(model=model)

    def _state_to_load(self, model_only: bool) -> StepState:
        if model_only:
            return StepState(model=dict(self.model.state_dict()))
        excluded = set(self.config.exclude_from_loading)
        model = {} if MODEL in excluded else dict(self.model.state_dict())
        extras = {k: plain_state(v) for k, v in self.states.items() if k not in excluded}
        return StepState(model=model, extras=extras)

    def _apply(self, state: StepState) -> None:
        if state.model:
            self.model.load_state_dict(state.model)
        for key, loaded in state.extras.items():
            self.states[key] = apply_state(self.states[key], loaded)

    # ------------------------------------------------------------------ save
    def _should_save(self, curr_step: int, last_step: bool) -> bool:
        if not self.enable or self.load_only:
            return False
        if curr_step == 1 and self.config.enable_first_step_checkpoint:
            return True
        return last_step or curr_step % self.config.interval == 0

    @torch.no_grad()
    def save(self, curr_step: int, last_step: bool = False) -> None:
        """Save (or, async, start saving) ``curr_step`` if the policy says so.

        ``last_step`` forces a save; with ``last_save_model_only`` it is a model-only export in
        ``export_dtype``. A failed background save is raised here, never dropped.
        """
        self._raise_if_closed()
        self._raise_finished_failure()
        if not self._should_save(curr_step, last_step):
            return  # a write in flight keeps overlapping training until the next save step
        self._wait_pending()
        begin = time.monotonic()
        if last_step and self.config.last_save_model_only:
            state = self._model_only_state(self.export_dtype)
        else:
            state = self._full_state()
        if self.async_mode == "disabled" or last_step:
            self._write_and_purge(curr_step, state)
        else:
            self._save_async(curr_step, state)
        self.last_save_seconds = time.monotonic() - begin

    def create_seed_checkpoint(self) -> None:
        """Step 0, model only, full precision: what ``checkpoint.create_seed_checkpoint`` asks for."""
        self._raise_if_closed()
        self._wait_pending()
        self._write_and_purge(0, self._model_only_state())

    def _write_and_purge(self, step: int, state: StepState) -> None:
        self.backend.write(step, state)
        self._purge_stale()

    def _purge_stale(self) -> None:
        k = self.config.keep_latest_k
        if k <= 0:
            return
        steps = self.backend.steps()
        for step in steps[:-k]:  # the newest k, the newest included, always stay
            self.backend.delete(step)

    def _save_async(self, step: int, state: StepState) -> None:
        """Stage to CPU (pinned with async_with_pinned_mem), then write in the background."""
        from torch.distributed._state_dict_utils import _copy_state_dict, _create_cpu_state_dict

        pin = self.async_mode == "async_with_pinned_mem" and torch.cuda.is_available()
        flat = state.flat()
        staged_flat = _create_cpu_state_dict(flat, pin_memory=pin)
        model_keys = set(state.model)

        def stage() -> StepState:
            _copy_state_dict(flat, staged_flat, non_blocking=pin)
            if pin:
                torch.cuda.synchronize()
            return StepState(
                model={k: v for k, v in staged_flat.items() if k in model_keys},
                extras={k: v for k, v in staged_flat.items() if k not in model_keys},
            )

        assert self._executor is not None
        if self.async_mode == "async_with_pinned_mem":
            staging = self._executor.submit(stage)
            self._staging = staging
            self._pending = self._executor.submit(lambda: self._write_and_purge(step, staging.result()))
        else:
            staged = stage()
            self._pending = self._executor.submit(self._write_and_purge, step, staged)

    def maybe_wait_for_staging(self) -> None:
        """Block until the in-flight save no longer reads the live tensors (safe to step the
        optimizer). A no-op unless ``async_with_pinned_mem`` is staging."""
        staging, self._staging = self._staging, None
        if staging is not None:
            try:
                staging.result()
            except BaseException as e:
                self._pending = None  # the write needs the staged copy: it fails with this cause
                raise AsyncSaveError(f"staging of an async checkpoint failed: {e!r}") from e

    def _raise_finished_failure(self) -> None:
        """Report a background save that has already failed, without waiting for one in flight."""
        pending = self._pending
        if pending is not None and pending.done() and pending.exception() is not None:
            self._wait_pending()

    def _wait_pending(self) -> None:
        self.maybe_wait_for_staging()
        pending, self._pending = self._pending, None
        if pending is not None:
            try:
                pending.result()
            except BaseException as e:
                raise AsyncSaveError(f"a background checkpoint save failed: {e!r}") from e

    # ------------------------------------------------------------------ load
    @torch.no_grad()
    def load(self, step: int = -1) -> bool:
        """Load ``step`` (-1: ``checkpoint.load_step``, or the newest). False when there is
        nothing to load; an error when a named step is missing or the checkpoint is damaged."""
        self._raise_if_closed()
        if not self.enable:
            log.warning("Checkpointer.load() called with checkpoint.enable = false: nothing loaded")
            return False
        self._wait_pending()
        begin = time.monotonic()
        requested = step if step != -1 else self.config.load_step
        steps = self.backend.steps()
        if not steps:
            if requested != -1:
                raise StepNotFoundError(f"checkpoint.load_step = {requested}, but {self.folder} has no committed steps")
            loaded = self._initial_load()
        else:
            loaded = self._load_step(requested, steps)
        if loaded:
            self.last_load_seconds = time.monotonic() - begin
        return loaded

    def _load_step(self, requested: int, steps: list[int]) -> bool:
        for attempt in range(3):
            target = steps[-1] if requested == -1 else requested
            if target not in steps:
                where = getattr(self.backend, "location", self.folder)
                raise StepNotFoundError(f"step {target} is not a committed checkpoint in {where}; committed steps: {steps}")
            state = self._state_to_load(model_only=target == 0)
            try:
                self.backend.read(target, state)
            except StepNotFoundError:
                # The newest step was retired between listing and reading (a fast publisher):
                # list again and take the new newest. A named step is an error.
                steps = self.backend.steps() if requested == -1 and attempt < 2 else []
                if not steps:
                    raise
                continue
            self._apply(state)
            self.loaded_step = target
            return True
        return False  # pragma: no cover

    def _initial_load(self) -> bool:
        path = self.config.initial_load_path
        if not path:
            return False
        if not os.path.isdir(path):
            raise ConfigError(f"checkpoint.initial_load_path = {path!r} is not a directory")
        reader_name = "hf" if self.config.initial_load_in_hf else "dcp"
        reader = self._build_backend(reader_name, os.path.dirname(os.path.abspath(path)))
        try:
            if not hasattr(reader, "read_path"):
                raise ConfigError(f"backend {reader_name!r} cannot read an initial_load_path")
            state = self._state_to_load(model_only=self.config.initial_load_model_only)
            reader.read_path(path, state)  # type: ignore[attr-defined]
            self._apply(state)
        finally:
            reader.close()
        log.info("loaded initial checkpoint from %s (%s)", path, reader_name)
        return True

    def latest_step(self) -> int:
        """Newest committed step, -1 when none (cheap: no data is read)."""
        if not self.enable:
            return -1
        steps = self.backend.steps()
        return steps[-1] if steps else -1

    # ------------------------------------------------------------------ lifetime
    def _raise_if_closed(self) -> None:
        if self._closed:
            raise RuntimeError("this Checkpointer is closed")

    def close(self) -> None:
        """Finish an in-flight save (raising its error), then release the backend."""
        if self._closed:
            return
        self._closed = True
        try:
            self._wait_pending()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
            if self._backend is not None:
                self._backend.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            try:
                self.close()
            except Exception:  # the original exception matters more
                log.exception("error while closing the Checkpointer after another error")

    def __del__(self) -> None:  # best effort, like TorchTitan's
        try:
            if not self._closed and self._backend is not None:
                self.close()
        except Exception:
            pass
