"""The one module that talks to torch-checkpointing (``torch_checkpointing``, PyPI
``torch-checkpointing==0.1.1``): a ``CheckpointManager`` configured so that what it writes can be
read back without unpickling, and so that the step's atomicity is the kit's, not its own.

How it is configured, and why (each point checked against the 0.1.1 source and on this machine):

* every item has an explicit layout: the model and the training-state tensors as
  ``SafetensorsSerialization`` files, the training-state structure as ``JsonSerialization``.
  Its default layout (``<item>_<rank>.pt`` by ``torch.save``) is read back with plain
  ``pickle`` (``torch.serialization._load(pickle_module=pickle)``), which would run code from a
  crafted checkpoint;
* no resharder on any item, so no metadata manager: nothing writes or reads ``metadata.pkl``
  (``pickle.loads`` on load);
* the synchronous saver with ``write_to_temp_dir=False`` and no barrier: it writes straight into
  the kit's staging directory, which the kit fsyncs, checksums and renames into ``step-N``. Its
  own commit (``tmp_<name>`` renamed onto the final path) fsyncs nothing and would leave
  ``tmp_*`` directories no cleanup knows about after a crash;
* buffered I/O (``use_direct_io=False``): its default ``O_DIRECT`` writes fail with EINVAL on
  ext4 for every file whose size is not a multiple of the block size.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch_checkpointing
from torch_checkpointing import CheckpointManager, ItemSpec
from torch_checkpointing.checkpoint_layout import JsonSerialization, LayoutInfo, SafetensorsSerialization
from torch_checkpointing.checkpoint_writer import CheckpointWriterConfig
from torch_checkpointing.config import CheckpointLoaderConfig, SyncCheckpointSaverConfig
from torch_checkpointing.storage.filesystem import LocalFileSystemStorageConfig

VERSION = torch_checkpointing.__version__

MODEL_FILE = "model.safetensors"
EXTRAS_FILE = "extras.safetensors"
LAYOUT_FILE = "layout.json"

MODEL, EXTRAS, LAYOUT = "model", "extras", "layout"
"""torch-checkpointing item keys (one file each)."""

ITEMS = {
    MODEL: LayoutInfo(MODEL_FILE, SafetensorsSerialization(metadata={"format": "pt"})),
    EXTRAS: LayoutInfo(EXTRAS_FILE, SafetensorsSerialization(metadata={"format": "pt"})),
    LAYOUT: LayoutInfo(LAYOUT_FILE, JsonSerialization()),
}


class Library:
    """A torch-checkpointing ``CheckpointManager`` writing into / reading from one directory."""

    def __init__(self, write_threads: int = 1):
        self.config = config = CheckpointManager.Config(
            items={key: ItemSpec(requires_copy=False, layout=layout, required=False) for key, layout in ITEMS.items()},
            default=None,  # strict: an item we did not declare is an error, never a pickled default
            save=SyncCheckpointSaverConfig(
                writer_config=CheckpointWriterConfig(
                    barrier_config=None, write_to_temp_dir=False, file_write_max_threads=write_threads
                )
            ),
            load=CheckpointLoaderConfig(use_mmap=False),
            storage_config=LocalFileSystemStorageConfig(use_direct_io=False),
        )
        self.manager = CheckpointManager(config)

    def save(self, directory: str, payload: Mapping[str, Any]) -> None:
        """Write ``payload`` (item key -> value) into the existing ``directory``."""
        self.manager.save(os.fspath(directory), dict(payload))

    def load(self, directory: str, into: Mapping[str, Any]) -> Mapping[str, Any]:
        """Read the items named in ``into``: tensors are copied into the tensors given there
        (``None`` leaves: new tensors); a missing key is an error (``strict``)."""
        return self.manager.load(os.fspath(directory), into=dict(into), strict=True)

    def close(self) -> None:
        self.manager.close()
