"""Model weights from one backend's on-disk format to another's (``ckpt convert``).

Generic over the registry: any backend that can read a directory (``ReadsExternal``) converts
into any backend that can write one (``WritesExternal``), through a TorchTitan model's state
dict in memory. The model is known without its weights (:mod:`.titan_models`), so the source
is checked against ``--model``/``--flavor`` (names, shapes) before a byte of data is read, and
the output appears atomically with a manifest, like a committed step. Only model weights are
converted: optimizer state stays behind (and is reported), and a directory written from model
weights alone is what TorchTitan's seed checkpoints are.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import torch

from .backend import Inspects, ReadsExternal, StepState, WritesExternal
from .errors import ConfigError
from .state import tensor_bytes
from .titan_models import TitanModel


def convert_step(
    src: str,
    reader: Any,
    dst: str,
    writer: Any,
    model: TitanModel,
    dtype: torch.dtype | None = None,
    progress: Callable[[int], Callable[[int], None]] | None = None,
) -> dict[str, Any]:
    """Read ``src`` with ``reader`` into ``model``'s tensors, write them to ``dst`` with ``writer``.
    ``progress(total_bytes)`` returns the callback the writer reports written bytes to."""
    if not isinstance(reader, ReadsExternal):
        raise ConfigError(f"{type(reader).__name__} cannot read a directory outside its folder, so it cannot convert {src}")
    if not isinstance(writer, WritesExternal):
        raise ConfigError(f"{type(writer).__name__} cannot write a new directory; choose another --to backend")
    described = reader.describe(src) if isinstance(reader, Inspects) else {"tensors": []}
    state = model.empty_state(dtype or stored_floating_dtype(described["tensors"]))
    reader.read_path(src, StepState(model=state))
    writer.write_path(dst, StepState(model=state), progress(tensor_bytes(state)) if progress else None)
    return {"tensors": len(state), "bytes": tensor_bytes(state), "skipped": _not_model_weights(described, model)}


def stored_floating_dtype(rows: list[dict[str, Any]]) -> torch.dtype | None:
    """The floating dtype most of the stored bytes have, so a bf16 checkpoint stays bf16."""
    counts: Counter[str] = Counter()
    for row in rows:
        dtype = getattr(torch, str(row.get("dtype")), None)
        if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
            counts[str(row["dtype"])] += int(row.get("bytes", 0))
    return getattr(torch, counts.most_common(1)[0][0]) if counts else None


def _not_model_weights(described: dict[str, Any], model: TitanModel) -> list[str]:
    known = set(model.specs)
    if model.adapter is not None:
        meta = {k: torch.empty(s.shape, dtype=s.dtype, device="meta") for k, s in model.specs.items()}
        known |= set(model.adapter.to_hf(meta))
    return sorted(r["name"] for r in described["tensors"] if r["name"] not in known)
