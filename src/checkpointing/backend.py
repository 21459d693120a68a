"""The backend seam: the only thing a checkpoint library has to implement to plug in.

A backend moves one step's state in and out of storage. It knows nothing about intervals,
retention, async saves, model-only exports or initial loads: those policies live once in
:mod:`checkpointing.manager`. Backends are found by name in a registry that third parties
extend through the ``titan_checkpointing.backends`` entry point group, so adding a library
touches neither this package nor ``rl``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from importlib import metadata
from typing import TYPE_CHECKING, Any, Callable, Protocol, runtime_checkable

from .errors import BackendNotFoundError, ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from .config import CheckpointConfig

ENTRY_POINT_GROUP = "titan_checkpointing.backends"


@dataclass
class StepState:
    """One step's state, split the way every backend needs it split.

    ``model`` is the flattened model state dict (FQN -> tensor or DTensor), exactly TorchTitan's
    ``ModelWrapper.state_dict()``. ``extras`` holds the rest (optimizer, lr_scheduler,
    dataloader, train_state, user states) as *plain* nested state dicts: the manager has
    already called ``state_dict()`` on every Stateful, so backends never see live objects.
    ``flat()`` is TorchTitan's on-disk layout: model keys at the top level, extras beside them.
    """

    model: dict[str, Any] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)

    def flat(self) -> dict[str, Any]:
        clash = self.model.keys() & self.extras.keys()
        if clash:
            raise ValueError(f"state keys used by both the model and extra states: {sorted(clash)}")
        return {**self.extras, **self.model}

    @property
    def model_only(self) -> bool:
        return not self.extras


@dataclass(frozen=True)
class Capabilities:
    """What a backend can promise, so the manager refuses a config instead of losing state."""

    persistent: bool
    """Steps survive the writing process (files), so training can resume from them."""
    non_tensor_state: bool
    """Can hold optimizer / lr_scheduler / dataloader / train_state, not just model tensors."""
    cross_process: bool = True
    """Another process can read what this one wrote."""


@dataclass
class BackendContext:
    """Everything a backend may need to build itself, handed over by the manager."""

    folder: str
    """``{base_folder}/{checkpoint.folder}``: where a persistent backend keeps ``step-N``."""
    config: "CheckpointConfig"
    sd_adapter: Any = None
    """A TorchTitan ``BaseStateDictAdapter`` instance (``to_hf``/``from_hf``), or None."""
    process_group: Any = None
    """The torch.distributed group for collectives, or None when not distributed."""

    def options(self, name: str) -> Any:
        """The backend's own nested table, e.g. ``[checkpoint.memory]``."""
        return getattr(self.config, name, None)


@runtime_checkable
class Backend(Protocol):
    """Storage for committed steps. Steps are ints; a step is visible only once complete."""

    capabilities: Capabilities

    def write(self, step: int, state: StepState) -> None:
        """Store ``state`` as ``step``; it becomes visible to ``steps()`` only when complete."""

    def read(self, step: int, state: StepState) -> None:
        """Fill ``state`` in place from ``step``: copy into its tensors, replace non-tensor leaves.

        Must raise :class:`~checkpointing.errors.StateMismatchError` (naming keys) rather than
        leave a target tensor unwritten, and must not touch ``state`` when it fails a check."""

    def steps(self) -> list[int]:
        """Committed steps, ascending."""

    def delete(self, step: int) -> None:
        """Forget ``step``; deleting a missing step is a no-op."""

    def close(self) -> None:
        """Release files, threads, segments."""


class ExternalReader(Protocol):
    """Optional: a persistent backend that can read a checkpoint outside its folder (an
    ``initial_load_path``: a DCP ``step-N`` directory or a Hugging Face model directory)."""

    def read_path(self, path: str, state: StepState) -> None: ...


BackendFactory = Callable[[BackendContext], Backend]

_registry: dict[str, BackendFactory] = {}
_entry_points_loaded = False
_lock = threading.Lock()


def register_backend(name: str, factory: BackendFactory, *, replace: bool = False) -> None:
    """Register ``factory`` (a class or callable taking a BackendContext) under ``name``."""
    if not name or not name.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"backend name must be a non-empty identifier, got {name!r}")
    with _lock:
        if name in _registry and not replace and _registry[name] is not factory:
            raise ValueError(f"a backend named {name!r} is already registered")
        _registry[name] = factory


def _load_entry_points() -> None:
    global _entry_points_loaded
    with _lock:
        if _entry_points_loaded:
            return
        _entry_points_loaded = True
        found = list(metadata.entry_points(group=ENTRY_POINT_GROUP))
    for ep in found:
        if ep.name in _registry:
            continue
        # Loaded lazily: a broken third-party plugin only fails when someone selects it.
        _registry.setdefault(ep.name, _LazyEntryPoint(ep))


class _LazyEntryPoint:
    def __init__(self, ep: metadata.EntryPoint):
        self.ep = ep

    def __call__(self, ctx: BackendContext) -> Backend:
        return self.resolve()(ctx)

    def resolve(self) -> BackendFactory:
        try:
            factory = self.ep.load()
        except Exception as e:  # the plugin's own bug: name it, as a config problem of this key
            raise ConfigError(
                f"checkpoint backend {self.ep.name!r} is registered by the entry point {self.ep.value!r} "
                f"(group {ENTRY_POINT_GROUP!r}) but cannot be loaded: {e!r}"
            ) from e
        _registry[self.ep.name] = factory
        return factory


def _ensure_builtins() -> None:
    # Importing the package registers dcp / hf / memory even when the distribution is not
    # installed (e.g. running from a source tree), so the entry points are a superset.
    from . import backends  # noqa: F401

    _load_entry_points()


def available_backends() -> list[str]:
    _ensure_builtins()
    return sorted(_registry)


def get_backend_factory(name: str) -> BackendFactory:
    _ensure_builtins()
    try:
        factory = _registry[name]
    except KeyError:
        raise BackendNotFoundError(
            f"unknown checkpoint backend {name!r}; registered backends: {', '.join(available_backends())} "
            f"(third-party backends register through the {ENTRY_POINT_GROUP!r} entry point group)"
        ) from None
    if isinstance(factory, _LazyEntryPoint):
        factory = factory.resolve()
    return factory


def create_backend(name: str, ctx: BackendContext) -> Backend:
    return get_backend_factory(name)(ctx)


def backend_capabilities(name: str) -> Capabilities | None:
    """Capabilities declared on the factory (a class attribute), if any, without building it."""
    return getattr(get_backend_factory(name), "capabilities", None)
