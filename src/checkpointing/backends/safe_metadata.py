"""Reading DCP's ``.metadata`` without running code.

torch 2.13's ``FileSystemReader.read_metadata`` calls ``pickle.load`` on the file, so a crafted
checkpoint executes arbitrary code the moment it is loaded. This unpickler resolves only the
handful of classes DCP's metadata is made of; anything else (``os.system``, ``builtins.eval``,
``subprocess.Popen``...) raises :class:`UnsafeCheckpointError` before it can be called.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

import torch

from ..errors import CorruptCheckpointError, UnsafeCheckpointError

_ALLOWED: dict[str, set[str]] = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "MetadataIndex",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.distributed.checkpoint._extension": {"StreamTransformExtension"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "PurePosixPath", "Path", "WindowsPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
    "builtins": {"set", "frozenset", "slice", "complex"},
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, source: str):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise UnsafeCheckpointError(
            f"{self.source} asks to load {module}.{name}, which is not part of DCP metadata; "
            "refusing to unpickle it (a crafted checkpoint could run code this way)",
            self.source,
        )

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeCheckpointError(f"{self.source} uses pickle persistent ids; refusing", self.source)


def safe_load_metadata(data: bytes, source: str) -> Any:
    from torch.distributed.checkpoint.metadata import Metadata

    try:
        obj = _RestrictedUnpickler(io.BytesIO(data), source).load()
    except UnsafeCheckpointError:
        raise
    except Exception as e:  # truncated / garbage bytes
        raise CorruptCheckpointError(f"{source} is not readable DCP metadata: {e!r}", source) from None
    if not isinstance(obj, Metadata):
        raise CorruptCheckpointError(f"{source} does not hold DCP Metadata (got {type(obj).__name__})", source)
    return obj
