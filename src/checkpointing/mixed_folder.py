"""A checkpoint folder whose ``step-N`` directories mix Hugging Face and DCP steps: a trap for
TorchTitan's stock ``CheckpointManager`` (and for any reader configured for one of the two).

TorchTitan 0.2.2's step scan (``CheckpointManager._find_load_step``) takes every entry whose
name contains ``step-(\\d+)`` and that holds either ``.metadata`` (DCP) or
``model.safetensors.index.json`` (a Hugging Face directory), picks the highest number, and
loads it *as DCP*. When that step is one of our ``hf`` steps the load dies with
``AssertionError: metadata is None``. Our own Checkpointer lists only its own backend's steps
(by the backend each step's manifest names), so it does not fail there; it would instead pass
over newer steps of another backend without a word.

We keep ``hf`` steps standard Hugging Face directories (``transformers`` and vLLM load
``step-N`` as it is) and warn instead: :func:`warning` names the folder, the steps of each
kind and the fix (one ``checkpoint.folder`` per format). ``ckpt inspect`` prints it, and
TorchTitan's trainer logs it when it builds our Checkpointer (:mod:`checkpointing.torchtitan`).
Every Checkpointer that resumes logs :func:`newer_elsewhere_warning` when the step it resumes
from is older than another backend's steps in the same folder.
Why not a layout the stock scan skips: see docs/backends.md, "hf steps and TorchTitan's own
CheckpointManager".
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field

from .commit import manifest_backend, parse_step_name

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


def newer_elsewhere_warning(folder: str, backend: str, steps: list[int]) -> str | None:
    """The warning for a resume that would pass over newer steps another backend wrote in the
    same folder (a job whose ``checkpoint.backend`` changed, ``last_save_in_hf``'s export), or
    None. ``steps``: the steps ``backend`` lists there. Only ``step-N`` directories newer than
    the newest of them are looked at (a reader that loads every step reads no manifest twice)."""
    newest = steps[-1] if steps else -1
    newer: dict[str, list[int]] = {}
    try:
        names = os.listdir(folder)
    except (FileNotFoundError, NotADirectoryError):
        return None
    for name in names:
        step = parse_step_name(name)
        path = os.path.join(folder, name)
        if step is None or step <= newest or os.path.islink(path) or not os.path.isdir(path):
            continue
        owner = manifest_backend(path)
        if owner is not None and owner != backend:
            newer.setdefault(owner, []).append(step)
    if not newer:
        return None
    listed = "; ".join(f"{name} steps {sorted(found)}" for name, found in sorted(newer.items()))
    resumes = f"resumes from step {newest}" if steps else "finds nothing to resume from"
    return (
        f"{folder} holds {listed}, newer than any {backend} step there, which a {backend} Checkpointer "
        f"does not read: this load {resumes}. To resume from them, set checkpoint.backend to the backend "
        "that wrote them; to keep the formats apart, give each its own checkpoint.folder."
    )


def warn_if_mixed(folder: str, writes: str | None, log: logging.Logger) -> bool:
    """Log :func:`warning` once, if there is one; returns whether it did."""
    message = warning(folder, writes)
    if message:
        log.warning(message)
    return message is not None
