"""A checkpoint folder whose ``step-N`` directories mix Hugging Face and DCP steps: a trap for
TorchTitan's stock ``CheckpointManager`` (and for any reader configured for one of the two).

TorchTitan 0.2.2's step scan (``CheckpointManager._find_load_step``) takes every entry whose
name contains ``step-(\\d+)`` and that holds either ``.metadata`` (DCP) or
``model.safetensors.index.json`` (a Hugging Face directory), picks the highest number, and
loads it *as DCP*. When that step is one of our ``hf`` steps the load dies with
``AssertionError: metadata is None``. Our own Checkpointer lists the steps of its folder
regardless of format, so a ``dcp`` Checkpointer over ``hf`` steps fails the same way.

We keep ``hf`` steps standard Hugging Face directories (``transformers`` and vLLM load
``step-N`` as it is) and warn instead: :func:`warning` names the folder, the steps of each
kind and the fix (one ``checkpoint.folder`` per format). ``ckpt inspect`` prints it, and
TorchTitan's trainer logs it when it builds our Checkpointer (:mod:`checkpointing.torchtitan`).
Why not a layout the stock scan skips: see docs/backends.md, "hf steps and TorchTitan's own
CheckpointManager".
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field

# What TorchTitan's scan looks for (torchtitan/components/checkpoint.py, _find_load_step).
TITAN_STEP = re.compile(r"step-(\d+)")
DCP_MARKER = ".metadata"
HF_MARKER = "model.safetensors.index.json"


@dataclass
class FolderFormats:
    """Steps of ``folder`` as TorchTitan's stock scan sees them, by on-disk format."""

    dcp: list[int] = field(default_factory=list)
    hf: list[int] = field(default_factory=list)

    @property
    def mixed(self) -> bool:
        return bool(self.dcp) and bool(self.hf)


def scan(folder: str) -> FolderFormats:
    found = FolderFormats()
    try:
        names = os.listdir(folder)
    except (FileNotFoundError, NotADirectoryError):
        return found
    for name in names:
        match = TITAN_STEP.search(name)
        path = os.path.join(folder, name)
        if not match or os.path.islink(path):
            continue
        if os.path.isfile(os.path.join(path, DCP_MARKER)):
            found.dcp.append(int(match.group(1)))
        elif os.path.isfile(os.path.join(path, HF_MARKER)):
            found.hf.append(int(match.group(1)))
    found.dcp.sort()
    found.hf.sort()
    return found


def warning(folder: str, writes: str | None = None) -> str | None:
    """The warning for ``folder``, or None when it is safe. ``writes`` ("dcp" or "hf"): the
    format about to be saved there, so a folder that *will* be mixed is reported before it is."""
    formats = scan(folder)
    other = {"dcp": formats.hf, "hf": formats.dcp}.get(writes or "", [])
    if not formats.mixed and not other:
        return None
    if formats.mixed:
        what = f"{folder} mixes hf steps {formats.hf} with DCP steps {formats.dcp}"
    else:
        kind = "hf" if writes == "dcp" else "DCP"
        what = f"{folder} holds {kind} steps {other}, and this job saves {writes} steps there"
    return (
        f"{what}. TorchTitan's stock CheckpointManager takes the highest step-N of either kind and loads it "
        "as DCP, failing on an hf step (AssertionError: metadata is None), and a Checkpointer configured for "
        "one format cannot read the other's steps. Give each format its own checkpoint.folder (or "
        "job.dump_folder)."
    )


def warn_if_mixed(folder: str, writes: str | None, log: logging.Logger) -> bool:
    """Log :func:`warning` once, if there is one; returns whether it did."""
    message = warning(folder, writes)
    if message:
        log.warning(message)
    return message is not None
