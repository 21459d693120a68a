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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ...backend import BackendContext, BackendSpec, Capabilities, StepState
from ...commit import MANIFEST, StepDirectory, StoredSteps, commit_directory, staged_directory, step_of
from ...dtypes import dtype_name
from ...errors import ConfigError, UnsafeCheckpointError
from ...safepath import check_no_escaping_links
from ...staging import apply_state, stage
from ...untrusted import exists_here
from ..dcp import DCPOptions, check_dcp_structure, describe_dcp_dir, write_dcp_dir
from .directory import INDEX, SINGLE_FILE, HFDirectory, is_hf_dir
from .model_writer import write_model
from .state_mapping import HFNaming, load_model, plan_load
from .training_state import SIDECAR, check_sidecar, has_sidecar, read_sidecar, sidecar_path

log = logging.getLogger(__name__)

MAX_SHARD_MB = 1 << 20


@dataclass
class HFOptions:
    """``[checkpoint.hf]``: Hugging Face safetensors model directories."""

    max_shard_size_mb: int = 2048
    """Largest ``model-XXXXX-of-YYYYY.safetensors`` shard, in MiB."""
    save_extras: bool = True
    """Keep optimizer / lr / dataloader / train state beside the safetensors (a DCP sidecar) so an
    ``hf`` checkpoint resumes training; model-only steps are plain HF directories either way."""

    def validate(self, prefix: str) -> None:
        if not 1 <= self.max_shard_size_mb <= MAX_SHARD_MB:
            raise ConfigError(f"{prefix}.max_shard_size_mb = {self.max_shard_size_mb}; allowed: 1 to {MAX_SHARD_MB} (1 TiB)")


SIDECAR_OPTIONS = DCPOptions()
"""The training-state sidecar is small: one DCP file per rank, TorchTitan's layout."""


class HFBackend(StoredSteps):
    capabilities = Capabilities(persistent=True, non_tensor_state=True, cross_process=True)

    def __init__(self, ctx: BackendContext):
        self.ctx = ctx
        self.options: HFOptions = ctx.options or HFOptions()
        self.verify_mode = ctx.verify
        self.naming = HFNaming(ctx.sd_adapter)
        self.store = StepDirectory(ctx.folder, ctx.name or "hf", foreign_marker=INDEX, process_group=ctx.process_group)
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
                write_dcp_dir(os.path.join(staging, SIDECAR), extras, SIDECAR_OPTIONS, self.ctx.process_group)

    def write_path(self, path: str, state: StepState, progress: Callable[[int], None] | None = None) -> None:
        """A new Hugging Face model directory (``ckpt convert --to hf``): transformers and vLLM
        load it; committed like a step, with a manifest."""
        if self.ctx.sd_adapter is None:
            raise ConfigError("a Hugging Face directory needs the model's TorchTitan state-dict adapter (to_hf); this model has none")
        with staged_directory(path) as staging:
            write_model(staging, state.model, self.naming, self.max_shard_bytes, self.ctx.process_group, progress=progress)
            commit_directory(staging, path, step_of(path), self.ctx.name or "hf")

    # -- inspecting (ckpt)
    def recognizes(self, path: str) -> bool:
        return is_hf_dir(path)

    def describe(self, path: str) -> dict[str, Any]:
        directory = HFDirectory.open(path)
        out: dict[str, Any] = {
            "tensors": [
                {"name": name, "dtype": dtype_name(e.dtype), "shape": list(e.shape), "bytes": e.nbytes,
                 "file": rel}
                for name, (rel, e) in sorted(directory.tensors.items())
            ]
        }
        if has_sidecar(path):
            out["sections"] = {f"{SIDECAR}/ (DCP sidecar)": describe_dcp_dir(sidecar_path(path))}
        return out

    def check_structure(self, path: str) -> str:
        directory = HFDirectory.open(path)
        summary = f"{len(directory.tensors)} tensors in {len(directory.shards)} shard(s)"
        if has_sidecar(path):
            check_dcp_structure(sidecar_path(path))
            summary += "; training_state ok"
        return summary

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
        if exists_here(os.path.join(path, MANIFEST)):  # of any kind: a FIFO is refused, not skipped
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
        # Then everything is read aside; the receiver is written only after all of it was read.
        staged_extras = read_sidecar(path, state.extras, self.ctx.process_group) if state.extras else None
        staged_model = None
        if directory is not None and plan is not None:
            staged_model = state.model if state.model_is_scratch else stage(state.model)
            load_model(directory, plan, staged_model)
        apply_state(state, staged_model, staged_extras)


SPEC = BackendSpec(
    name="hf",
    factory=HFBackend,
    capabilities=HFBackend.capabilities,
    options=HFOptions,
    summary="Hugging Face safetensors directories (transformers / vLLM load them), training state in a DCP sidecar",
)
