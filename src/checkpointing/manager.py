"""The Checkpointer: TorchTitan's CheckpointManager surface, every checkpoint *policy* once.

Interval, first-step and last-step saves, model-only exports in ``export_dtype``, retention
(``keep_latest_k``), ``exclude_from_loading``, ``load_step``, initial loads (DCP or Hugging Face),
seed checkpoints, ``load_only``, async saves, and how a load reaches its receiver (a copy into
the module, adopting a lent snapshot, or a sink) are decided here, for every backend. A backend
(:mod:`checkpointing.backend`) only moves one step's state in and out of storage.

The RL generator uses this same class over just its model, or over a :class:`TensorSink` (an
engine that owns its weights, like vLLM): ``load()`` pulls the newest step.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from . import _compat, distributed, mixed_folder
from .backend import (
    Backend,
    BackendContext,
    Capabilities,
    CleansPartials,
    Lease,
    ReadsExternal,
    StepState,
    ViewReader,
    backend_spec,
)
from .config import backend_options, hf_export_backend, initial_load_reader, validate_checkpoint_config
from .distributed import is_distributed
from .dtypes import torch_dtype
from .errors import AsyncSaveError, CheckpointError, ConfigError, StepNotFoundError
from .receiver import TensorSink
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
    tensor_bytes,
)
from .units import human_bytes

log = logging.getLogger(__name__)


@dataclass
class CheckpointStats:
    """What the last save and load cost, and how the load reached its receiver."""

    saves: int = 0
    loads: int = 0
    last_save_step: int = -1
    last_save_seconds: float = 0.0
    """Wall time of the last ``save`` call (for an async save: until the write was handed off)."""
    last_save_bytes: int = 0
    last_load_step: int = -1
    last_load_seconds: float = 0.0
    last_load_bytes: int = 0
    last_load_path: str = ""
    """``copy`` (into the receiver's tensors), ``adopt`` (the receiver now views the published
    snapshot: no copy), ``sink`` (delivered to a TensorSink) or ``initial`` (initial_load_path)."""


class Checkpointer:
    """Save and load training state through the backend named by ``checkpoint_config.backend``.

    Arguments follow TorchTitan 0.2.2's ``CheckpointManager``; all but ``model_parts`` and
    ``checkpoint_config`` may be None, so a generator builds one over just its model.
    ``sd_adapter`` is a TorchTitan state-dict adapter *instance* (needed by ``hf`` and by
    ``initial_load_in_hf``). ``sink`` replaces ``model_parts`` for a receiver that is not an
    ``nn.Module``; such a Checkpointer only loads.
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
        *,
        sink: TensorSink | None = None,
    ) -> None:
        if (model_parts is None) == (sink is None):
            raise ConfigError(
                "Checkpointer needs exactly one receiver: model_parts (the nn.Module(s) whose weights it saves/loads) "
                "or sink (a TensorSink that takes loaded tensors)"
            )
        if sink is not None and not isinstance(sink, TensorSink):
            raise ConfigError(f"sink must implement checkpointing.TensorSink (specs, receive), got {type(sink).__name__}")
        if ft_manager is not None:
            raise ConfigError("torchft (ft_manager) is not supported by this Checkpointer")
        if checkpoint_config is None:
            from .config import CheckpointConfig

            checkpoint_config = CheckpointConfig(enable=True)
        self.config = checkpoint_config
        validate_checkpoint_config(self.config, "checkpoint")
        self.backend_name: str = self.config.backend
        self.enable: bool = self.config.enable
        self.load_only: bool = self.config.load_only
        self.folder = os.path.join(base_folder, self.config.folder)
        self.sd_adapter = sd_adapter
        self.export_dtype = torch_dtype(self.config.export_dtype)
        self.async_mode = self.config.async_mode.lower()

        self.sink = sink
        self.model = ModelState(model_parts) if model_parts is not None else None
        self.states: dict[str, Any] = dict(states or {})
        for key, obj in ((OPTIMIZER, optimizers), (LR_SCHEDULER, lr_schedulers), (DATALOADER, dataloader)):
            if obj is not None:
                self.states[key] = obj
        if MODEL in self.states:
            raise ConfigError(f"states may not use the reserved key {MODEL!r}")
        if sink is not None and (self.states or not self.load_only):
            raise ConfigError(
                "a Checkpointer over a sink only loads model tensors: set checkpoint.load_only = true and give no "
                f"other states (got {sorted(self.states)})"
            )
        self._check_exclusions()

        self.loaded_step: int = -1
        """Step of the last successful load (the generator's policy version); -1 before any."""
        self.stats = CheckpointStats()
        self._backend: Backend | None = None
        self._exporter: Backend | None = None
        self._lease: Lease | None = None
        self._pending: Future | None = None
        self._staging: Future | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._closed = False
        if not self.enable:
            return
        self._process_group = self._make_process_group()
        self._backend = self._build_backend(self.backend_name, self.folder)
        caps = self._backend.capabilities
        if self.states and not caps.non_tensor_state:
            raise ConfigError(
                f"checkpoint.backend = {self.backend_name!r} holds model tensors only, but this Checkpointer "
                f"also has {sorted(self.states)}; use a backend that keeps training state for resumable "
                "checkpoints, or build this Checkpointer over the model alone"
            )
        if self.async_mode != "disabled":
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-async")
        if self.config.last_save_in_hf and sd_adapter is None and not self.load_only:
            raise ConfigError(
                "checkpoint.last_save_in_hf = true writes the last step as a Hugging Face directory, which needs the "
                "model's TorchTitan state-dict adapter (sd_adapter)"
            )
        if isinstance(self._backend, CleansPartials) and not self.load_only:
            self._backend.cleanup_partials()

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
        if not is_distributed() or self.async_mode == "disabled":
            return None
        import torch.distributed as dist

        # Background saves run collectives off the main thread: give them their own group.
        return dist.new_group(backend="gloo")

    def _build_backend(self, name: str, folder: str, load_only: bool | None = None) -> Backend:
        spec = backend_spec(name)
        ctx = BackendContext(
            folder=folder,
            options=backend_options(self.config, name),
            verify=self.config.verify,
            sd_adapter=self.sd_adapter,
            process_group=self._process_group,
            load_only=self.load_only if load_only is None else load_only,
            name=name,
        )
        return spec.factory(ctx)

    @property
    def backend(self) -> Backend:
        if self._backend is None:
            raise ConfigError("checkpointing is disabled (checkpoint.enable = false)")
        return self._backend

    @property
    def capabilities(self) -> Capabilities:
        """What the configured backend promises (persistent, training state, cross-process)."""
        return self.backend.capabilities

    # ------------------------------------------------------------------ state assembly
    def _module(self) -> ModelState:
        if self.model is None:
            raise ConfigError("this Checkpointer delivers into a sink; it has no model to save")
        return self.model

    def _full_state(self) -> StepState:
        return StepState(
            model=dict(self._module().state_dict()),
            extras={k: plain_state(v) for k, v in self.states.items()},
        )

    def _model_only_state(self, dtype: torch.dtype | None = None) -> StepState:
        model = dict(self._module().state_dict())
        if dtype is not None and dtype != torch.float32:
            model = cast_tensors(model, dtype)
        return StepState(model=model)

    def _state_to_load(self, model_only: bool) -> StepState:
        model_state = self._module()
        if model_only:
            return StepState(model=dict(model_state.state_dict()))
        excluded = set(self.config.exclude_from_loading)
        model = {} if MODEL in excluded else dict(model_state.state_dict())
        extras = {k: plain_state(v) for k, v in self.states.items() if k not in excluded}
        return StepState(model=model, extras=extras)

    def _apply(self, state: StepState) -> None:
        if state.model:
            self._module().load_state_dict(state.model)
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
        if last_step and self.config.last_save_in_hf:
            self._write_and_purge(curr_step, state, begin, self._hf_exporter())
        elif self.async_mode == "disabled" or last_step:
            self._write_and_purge(curr_step, state, begin)
        else:
            self._save_async(curr_step, state)
        self.stats.last_save_seconds = time.monotonic() - begin

    def create_seed_checkpoint(self) -> None:
        """Step 0, model only, full precision: what ``checkpoint.create_seed_checkpoint`` asks for."""
        self._raise_if_closed()
        self._wait_pending()
        self._write_and_purge(0, self._model_only_state(), time.monotonic())

    def _write_and_purge(self, step: int, state: StepState, begin: float, writer: Backend | None = None) -> None:
        writer = writer or self.backend
        writer.write(step, state)
        nbytes = tensor_bytes(state.flat())
        seconds = time.monotonic() - begin
        self.stats.saves += 1
        self.stats.last_save_step, self.stats.last_save_bytes = step, nbytes
        log.info(
            "Finished saving the checkpoint step %d (backend %s, %s) in %.2f seconds, %s.",
            step, self.backend_name if writer is self.backend else hf_export_backend(), writer.location, seconds,
            human_bytes(nbytes),
        )
        self._purge_stale()

    def _hf_exporter(self) -> Backend:
        """``last_save_in_hf``: TorchTitan's last-step export as a Hugging Face directory, in the
        same folder as the steps (``step-N``), whatever backend writes the other steps."""
        if self._exporter is None:
            self._exporter = self._build_backend(hf_export_backend(), self.folder)
        return self._exporter

    def _purge_stale(self) -> None:
        k = self.config.keep_latest_k
        if k <= 0:
            return
        steps = self.backend.steps()
        for step in steps[:-k]:  # the newest k, the newest included, always stay
            self.backend.delete(step)

    def clear(self) -> None:
        """Forget every committed step (a weight-sync channel or folder left by an earlier,
        possibly killed, run whose steps may be newer than the one training resumes from)."""
        self._raise_if_closed()
        self._wait_pending()
        for step in self.backend.steps():
            self.backend.delete(step)

    def _save_async(self, step: int, state: StepState) -> None:
        """Stage to CPU (pinned with async_with_pinned_mem), then write in the background."""
        pin = self.async_mode == "async_with_pinned_mem" and torch.cuda.is_available()
        flat = state.flat()
        staged_flat = _compat.cpu_state_dict_like(flat, pin_memory=pin)
        model_keys = set(state.model)
        begin = time.monotonic()

        def stage() -> StepState:
            _compat.copy_state_dict(flat, staged_flat, non_blocking=pin)
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
            self._pending = self._executor.submit(lambda: self._write_and_purge(step, staging.result(), begin))
        else:
            staged = stage()
            self._pending = self._executor.submit(self._write_and_purge, step, staged, begin)

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
            log.info("Checkpointer.load() called with checkpoint.enable = false: nothing loaded")
            return False
        self._wait_pending()
        begin = time.monotonic()
        requested = step if step != -1 else self.config.load_step
        steps = self.backend.steps()
        if requested == -1 and self.capabilities.persistent and distributed.rank() == 0:
            passed_over = mixed_folder.newer_elsewhere_warning(self.folder, self.backend_name, steps)
            if passed_over:
                log.warning(passed_over)
        if not steps:
            if requested != -1:
                raise StepNotFoundError(
                    f"checkpoint.load_step = {requested}, but {self.backend.location} has no committed steps"
                )
            loaded = self._initial_load()
        else:
            loaded = self._load_step(requested, steps)
        if loaded:
            self._record_load(time.monotonic() - begin)
        return loaded

    def _record_load(self, seconds: float) -> None:
        stats = self.stats
        stats.loads += 1
        stats.last_load_seconds, stats.last_load_step = seconds, self.loaded_step
        log.info(
            "Finished loading the checkpoint step %d (backend %s, %s, %s) in %.2f seconds, %s.",
            self.loaded_step, self.backend_name, self.backend.location, stats.last_load_path, seconds,
            human_bytes(stats.last_load_bytes),
        )

    def _load_step(self, requested: int, steps: list[int]) -> bool:
        for attempt in range(3):
            target = steps[-1] if requested == -1 else requested
            if target not in steps:
                raise StepNotFoundError(
                    f"step {target} is not a committed checkpoint in {self.backend.location}; committed steps: {steps}"
                )
            try:
                self._read_step(target)
            except StepNotFoundError:
                # The newest step was retired between listing and reading (a fast publisher):
                # list again and take the new newest. A named step is an error.
                steps = self.backend.steps() if requested == -1 and attempt < 2 else []
                if not steps:
                    raise
                continue
            self.loaded_step = target
            return True
        return False  # pragma: no cover

    def _read_step(self, step: int) -> None:
        """One committed step into the receiver, by the cheapest path that keeps every promise."""
        if self.sink is not None:
            self._deliver_to_sink(step)
        elif not (self._can_adopt(step) and self._adopt(step)):
            # A copy writes into the receiver's own tensors, never into a lent snapshot.
            self._release_lease()
            state = self._state_to_load(model_only=step == 0)
            self.backend.read(step, state)
            self._apply(state)
            self.stats.last_load_path, self.stats.last_load_bytes = "copy", tensor_bytes(state.flat())

    # -- into a sink
    def _deliver_to_sink(self, step: int) -> None:
        assert self.sink is not None
        specs = dict(self.sink.specs())
        if isinstance(self.backend, ViewReader):
            lease = self.backend.open_views(step, specs)
            try:
                self._hand_to_sink(step, lease.tensors)
            finally:
                lease.release()
        else:
            # A file backend reads into fresh tensors shaped by the specs (one transient copy,
            # freed when the sink has taken them, and scratch: the backend need not stage
            # another): the backend's own checks run before any byte reaches the sink.
            staged = {k: torch.empty(s.shape, dtype=s.dtype) for k, s in specs.items()}
            self.backend.read(step, StepState(model=staged, model_is_scratch=True))
            self._hand_to_sink(step, staged)
        self.stats.last_load_path = "sink"
        self.stats.last_load_bytes = sum(s.nbytes for s in specs.values())

    def _hand_to_sink(self, step: int, tensors: Any) -> None:
        assert self.sink is not None
        try:
            self.sink.receive(step, tensors.items())
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{type(self.sink).__name__}.receive failed on step {step}: {e!r}") from e

    # -- adopting a lent snapshot
    def _can_adopt(self, step: int) -> bool:
        """Only a pure reader adopts: a trainer that adopted would train *into* the snapshot."""
        return (
            step != 0
            and self.load_only
            and self.config.load_mode == "auto"
            and not self.states
            and MODEL not in self.config.exclude_from_loading
            and isinstance(self.backend, ViewReader)
            and self._module().adoptable
        )

    def _adopt(self, step: int) -> bool:
        """The receiver's weights become the leased version's tensors; False (nothing changed,
        nothing held) when they cannot (another dtype or device, a different tie): the caller
        copies instead, with every check of the copy path."""
        model = self._module()
        lease = self.backend.open_views(step, model.specs())  # type: ignore[attr-defined]
        try:
            adopted = model.adopt(lease.tensors)
        except BaseException:
            lease.release()
            raise
        if not adopted:
            lease.release()
            return False
        previous, self._lease = self._lease, lease
        if previous is not None:
            previous.release()
        self.stats.last_load_path = "adopt"
        self.stats.last_load_bytes = sum(s.nbytes for s in model.specs().values())
        return True

    def _release_lease(self) -> None:
        """Give the receiver its own copy of adopted weights, then let the publisher reuse the
        snapshot: nothing the receiver holds may point into a buffer that goes away."""
        lease, self._lease = self._lease, None
        if lease is not None:
            try:
                if self.model is not None:
                    self.model.own_weights()
            finally:
                lease.release()

    # -- initial load
    def _initial_load(self) -> bool:
        path = self.config.initial_load_path
        if not path and self.config.initial_load_in_hf:
            # As TorchTitan: the Hugging Face weights beside the tokenizer (model.hf_assets_path,
            # which TorchTitan's state-dict adapter carries).
            path = getattr(self.sd_adapter, "hf_assets_path", None)
            if not path:
                raise ConfigError(
                    "checkpoint.initial_load_in_hf = true with no checkpoint.initial_load_path reads model.hf_assets_path "
                    "through the state-dict adapter, but this Checkpointer has no adapter with an hf_assets_path"
                )
        if not path:
            return False
        if not os.path.isdir(path):
            raise ConfigError(f"checkpoint.initial_load_path = {path!r} is not a directory")
        reader_name = initial_load_reader(self.config)
        reader = self._build_backend(reader_name, os.path.dirname(os.path.abspath(path)), load_only=True)
        try:
            if not isinstance(reader, ReadsExternal):
                raise ConfigError(f"backend {reader_name!r} cannot read an initial_load_path")
            if self.sink is not None:
                specs = dict(self.sink.specs())
                staged = {k: torch.empty(s.shape, dtype=s.dtype) for k, s in specs.items()}
                reader.read_path(path, StepState(model=staged, model_is_scratch=True))
                self._hand_to_sink(-1, staged)
                nbytes = tensor_bytes(staged)
            else:
                state = self._state_to_load(model_only=self.config.initial_load_model_only)
                reader.read_path(path, state)
                self._apply(state)
                nbytes = tensor_bytes(state.flat())
        finally:
            reader.close()
        self.stats.last_load_path, self.stats.last_load_bytes = "initial", nbytes
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
            try:
                self._release_lease()
            finally:
                for backend in (self._exporter, self._backend):
                    if backend is not None:
                        backend.close()

    def __enter__(self) -> Checkpointer:
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
