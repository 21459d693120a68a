"""``backend = "hf"``: every step is a Hugging Face model directory.

``{folder}/step-N/`` holds ``model-XXXXX-of-YYYYY.safetensors`` + ``model.safetensors.index.json``
+ ``config.json`` (what ``transformers`` and vLLM load), the training state in a DCP sidecar
``training_state/`` when the step has any, and our ``manifest.json`` with each file's CRC32,
all committed by one rename (:mod:`checkpointing.commit`). Directories written by other tools
(``save_pretrained``, TorchTitan's HF export) are listed and loaded too, without checksums.

Everything read from disk is checked first (:mod:`.directory`, :mod:`.safetensors_io`), and
the receiver is compared with the checkpoint before any tensor is touched
(:mod:`.state_mapping`).
"""

from __future__ import annotations

import functools
import logging
import os

from ...backend import BackendContext, Capabilities, StepState
from ...commit import MANIFEST, StepDirectory, StoredSteps
from ...config import HFOptions
from ...errors import ConfigError, UnsafeCheckpointError
from ...safepath import check_no_escaping_links
from .directory import INDEX, SINGLE_FILE, HFDirectory, is_hf_dir
from .model_writer import write_model
from .state_mapping import HFNaming, load_model, plan_load
from .training_state import SIDECAR, check_sidecar, read_sidecar

log = logging.getLogger(__name__)


class HFBackend(StoredSteps):
    capabilities = Capabilities(persistent=True, non_tensor_state=True, cross_process=True)

    def __init__(self, ctx: BackendContext):
        self.ctx = ctx
        self.options: HFOptions = ctx.options("hf") or HFOptions()
        self.verify_mode = getattr(ctx.config, "verify", "checksum")
        self.naming = HFNaming(ctx.sd_adapter)
        self.store = StepDirectory(ctx.folder, "hf", foreign_marker=INDEX, process_group=ctx.process_group)
        self._sidecar_writer = None
        self._warned_no_extras = False
        if ctx.sd_adapter is None:
            log.info(
                "hf backend without a state-dict adapter: tensors keep their TorchTitan names and no "
                "config.json is written (resumable, but not loadable by transformers)"
            )

    @property
    def max_shard_bytes(self) -> int:
        return int(self.options.max_shard_size_mb) << 20

    # -- writing
    def write(self, step: int, state: StepState) -> None:
        extras = state.extras
        if extras and not self.options.save_extras:
            if not self._warned_no_extras:
                log.warning(
                    "checkpoint.hf.save_extras = false: %s are NOT saved; these hf steps cannot resume training",
                    sorted(extras),
                )
                self._warned_no_extras = True
            extras = {}
        with self.store.stage(step) as staging:
            record = functools.partial(self.store.record_checksum, staging)
            write_model(staging, state.model, self.naming, self.max_shard_bytes, self.ctx.process_group, record_checksum=record)
            if extras:
                self._dcp().write_dir(os.path.join(staging, SIDECAR), extras)

    def _dcp(self):
        if self._sidecar_writer is None:
            from ..dcp import DCPBackend

            self._sidecar_writer = DCPBackend(self.ctx)
        return self._sidecar_writer

    # -- reading
    def read(self, step: int, state: StepState) -> None:
        path = self.store.committed_path(step)
        self.store.verify(path, self.verify_mode)
        self._read_dir(path, state)

    def read_path(self, path: str, state: StepState) -> None:
        """An initial load: one of our steps, or any HF model directory (``save_pretrained``)."""
        if os.path.islink(path):
            raise UnsafeCheckpointError(f"{path} is a symlink; refusing to follow it", path)
        if not os.path.isdir(path):
            raise ConfigError(f"{path} is not a directory; expected a Hugging Face model directory")
        if not is_hf_dir(path):
            raise ConfigError(
                f"{path} is not a Hugging Face model directory (no {INDEX} and no {SINGLE_FILE}); "
                "a DCP checkpoint is read with initial_load_in_hf = false"
            )
        if os.path.isfile(os.path.join(path, MANIFEST)):
            StepDirectory(os.path.dirname(os.path.abspath(path)), "hf", foreign_marker=INDEX).verify(path, self.verify_mode)
        else:
            log.info("%s has no %s (written by another tool): checksums not verified", path, MANIFEST)
            check_no_escaping_links(path)
        self._read_dir(path, state)

    def _read_dir(self, path: str, state: StepState) -> None:
        # Check everything first, so a mismatch or damage leaves the receiver as it was.
        directory = plan = None
        if state.model:
            directory = HFDirectory.open(path)
            plan = plan_load(directory, state.model, self.naming)
        if state.extras:
            check_sidecar(path, state.extras)
        # The sidecar first: its non-tensor values (the only part that can still be refused
        # after the checks above) are read before any tensor, so a refusal changes nothing.
        if state.extras:
            read_sidecar(path, state.extras, self.ctx.process_group)
        if directory is not None and plan is not None:
            load_model(directory, plan, state.model)
