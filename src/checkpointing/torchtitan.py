"""Make TorchTitan's own trainer checkpoint through :class:`~checkpointing.Checkpointer`.

Two lines in a TorchTitan TOML switch it on, with no edit to TorchTitan::

    [job]
    custom_config_module = "checkpointing.config"   # adds [checkpoint] backend, verify, [checkpoint.<name>]
    [experimental]
    custom_import = "checkpointing.torchtitan"      # this module: the trainer builds our Checkpointer

Why the switch is made this way
-------------------------------
TorchTitan 0.2.2's ``Trainer.__init__`` (``torchtitan/train.py``) does, in this order:
``importlib.import_module(job_config.experimental.custom_import)``, then builds the model,
optimizers and dataloader, then ``self.checkpointer = CheckpointManager(dataloader=...,
model_parts=..., optimizers=..., lr_schedulers=..., states={"train_state": self},
checkpoint_config=job_config.checkpoint, sd_adapter=..., base_folder=...)``, where
``CheckpointManager`` is a *global name of the module that defines Trainer*, looked up when that
line runs. So importing this module is early enough to rebind that one global, and the trainer
then builds our :class:`~checkpointing.Checkpointer` with its own arguments; every later call
``train.py`` makes (``load(step=...)``, ``save(step, last_step=...)``, ``maybe_wait_for_staging``,
``close``, the seed-checkpoint ``save(curr_step=0, last_step=True)``) is the Checkpointer's
TorchTitan-shaped API.

Which global: ``CheckpointManager`` in ``torchtitan.train`` and, when the trainer runs as a
script (``python -m torchtitan.train``, ``torchrun ... -m torchtitan.train``), in ``__main__``
too, because runpy executes ``train.py`` as ``__main__`` and *that* module's ``Trainer`` is the
one running. Only names still bound to TorchTitan's own class are replaced. Trainers that
subclass ``torchtitan.train.Trainer`` run its ``__init__`` and so pick the switch up as well.

When: at import, that is, when ``Trainer.__init__`` imports ``custom_import``, before anything
is built; once per process, as imports are. Importing ``checkpointing`` itself never does this;
only naming this module (or calling :func:`install`, as ``titan-train`` does) does. A process
that executes ``train.py`` again after that (``runpy`` twice) calls :func:`install` again.

Without the config module: TorchTitan's parser then knows no ``backend`` key (a TOML that sets
one is refused by TorchTitan before the trainer starts), and the trainer hands us its plain
``Checkpoint`` config. :func:`build_checkpointer` refuses that with a
:class:`~checkpointing.errors.ConfigError` naming the missing ``custom_config_module`` line,
rather than silently picking a backend the TOML never chose.

Refused at start (when the trainer builds its checkpointer, before any step or load), with a
:class:`~checkpointing.errors.ConfigError` naming the key: an unknown backend name; a backend
whose capabilities cannot resume training (``memory`` holds model tensors only and keeps
nothing on disk; it is for weight sync to a generator); TorchTitan options this Checkpointer
does not implement (torchft, ``last_save_in_hf``, quantized HF loads, an HF initial load from
``model.hf_assets_path`` without ``initial_load_path``).
"""

from __future__ import annotations

import logging
import sys
from dataclasses import fields, is_dataclass
from typing import Any

from . import mixed_folder
from .errors import ConfigError
from .manager import Checkpointer

log = logging.getLogger(__name__)

CONFIG_MODULE = "checkpointing.config"
TRAIN_MODULE = "torchtitan.train"
STEP_FORMATS = {"dcp": "dcp", "hf": "hf"}
"""The built-in backends whose steps TorchTitan's own step scan recognizes, by on-disk format."""


def build_checkpointer(
    dataloader: Any = None,
    model_parts: Any = None,
    optimizers: Any = None,
    lr_schedulers: Any = None,
    states: dict[str, Any] | None = None,
    checkpoint_config: Any = None,
    sd_adapter: Any = None,
    base_folder: str = "",
    ft_manager: Any = None,
) -> Checkpointer:
    """What ``torchtitan.train`` calls in place of ``CheckpointManager(...)``: same arguments."""
    check_trainer_config(checkpoint_config)
    ckpt = Checkpointer(
        dataloader=dataloader,
        model_parts=model_parts,
        optimizers=optimizers,
        lr_schedulers=lr_schedulers,
        states=states,
        checkpoint_config=checkpoint_config,
        sd_adapter=sd_adapter,
        base_folder=base_folder,
        ft_manager=ft_manager,  # torchft: refused by the Checkpointer, naming it
    )
    if ckpt.enable:
        log.info(
            "Checkpointing active (titan-checkpointing, backend %r). Checkpoints will be loaded from and saved to %s",
            ckpt.backend_name,
            ckpt.folder,
        )
        writes = None if ckpt.load_only else STEP_FORMATS.get(ckpt.backend_name)
        mixed_folder.warn_if_mixed(ckpt.folder, writes, log)
    return ckpt


def _has_backend_field(cfg: Any) -> bool:
    """Whether ``cfg`` is a dataclass with a ``backend`` field (our config module's, or one that
    extends it); a helper so that ``cfg`` stays an untyped TorchTitan config to the caller."""
    return cfg is not None and is_dataclass(cfg) and "backend" in {f.name for f in fields(cfg)}


def check_trainer_config(cfg: Any) -> None:
    """Refuse, with the key named, what would otherwise be ignored or fail mid-run."""
    if not _has_backend_field(cfg):
        raise ConfigError(
            f"[experimental] custom_import = {__name__!r} needs [job] custom_config_module = {CONFIG_MODULE!r} "
            "(or a module whose JobConfig extends it) in the same TOML: without it TorchTitan's config has no "
            "[checkpoint] backend and the checkpoint backend would be chosen by nobody"
        )
    if cfg.initial_load_in_hf_quantized:
        raise ConfigError("checkpoint.initial_load_in_hf_quantized = true is not supported by titan-checkpointing")
    if not cfg.enable:
        return
    from .backend import BackendNotFoundError, available_backends, backend_spec

    try:
        caps = backend_spec(cfg.backend).capabilities
    except BackendNotFoundError:
        raise ConfigError(
            f"checkpoint.backend = {cfg.backend!r} is not a registered backend; allowed: {', '.join(available_backends())}"
        ) from None
    missing = [why for ok, why in ((caps.non_tensor_state, "it holds model tensors only"),
                                   (caps.persistent, "its steps do not outlive the process")) if not ok]
    if missing:
        raise ConfigError(
            f"checkpoint.backend = {cfg.backend!r} cannot checkpoint TorchTitan's trainer: {' and '.join(missing)}, "
            "so optimizer, lr_scheduler, dataloader and train_state could not be resumed; use a backend that "
            "persists training state (e.g. dcp or hf)"
        )


def install() -> list[str]:
    """Rebind ``CheckpointManager`` to :func:`build_checkpointer` in the trainer module(s);
    returns the names of the modules changed (idempotent)."""
    import torchtitan.train  # noqa: F401  (loaded, so a later `from torchtitan.train import Trainer` sees the switch)
    from torchtitan.components.checkpoint import CheckpointManager as Stock

    changed = []
    for name, module in _trainer_modules():
        if vars(module).get("CheckpointManager") is Stock:
            module.CheckpointManager = build_checkpointer
            changed.append(name)
    return changed


def _trainer_modules() -> list[tuple[str, Any]]:
    found = [(TRAIN_MODULE, sys.modules[TRAIN_MODULE])]
    main = sys.modules.get("__main__")
    if main is not None and main.__spec__ is not None and main.__spec__.name == TRAIN_MODULE:
        found.append(("__main__", main))
    return found


_installed = install()
if _installed:
    log.info("titan-checkpointing: TorchTitan's trainer builds checkpointing.Checkpointer (in %s)", ", ".join(_installed))
