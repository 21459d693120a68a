"""``backend = "torch_checkpointing"``: each step written and read by torch-checkpointing 0.1.1.

``{folder}/step-N/`` holds::

    model.safetensors    the model state dict (tied weights stored once, see layout.json)
    extras.safetensors   the tensors of the training state (optimizer moments, ...), if any
    layout.json          the training state's structure (tagged JSON, see .structure) and aliases
    manifest.json        the kit's manifest: every file's size and digest (xxh3)

The first three are written by torch-checkpointing's ``CheckpointWriter`` into the kit's staging
directory, which the kit then seals and renames into ``step-N`` (:class:`StepDirectory`), so a
step is atomic and checksummed like a built-in one. Reading checks everything first with the
kit's safe readers (manifest, symlinks, safetensors headers, the strict JSON structure, the
receiver's names, shapes and dtypes), then lets torch-checkpointing's ``CheckpointReader`` copy
the tensors into the receiver's own tensors.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import torch

from checkpointing.plugin import (
    BackendContext,
    CheckpointError,
    ConfigError,
    CorruptCheckpointError,
    StateMismatchError,
    StepDirectory,
    StepState,
    StoredSteps,
    TensorSpec,
    check_fit,
    check_no_escaping_links,
    check_plain_files,
    commit_directory,
    parse_json_strict,
    read_regular,
    read_safetensors_header,
    safe_join,
    staged_directory,
    step_of,
    world_size,
)

from . import structure
from .library import EXTRAS, EXTRAS_FILE, LAYOUT, LAYOUT_FILE, MODEL, MODEL_FILE, VERSION, Library
from .spec import CAPABILITIES, NAME, TorchCheckpointingOptions

LAYOUT_FORMAT = "titan-checkpointing/torch_checkpointing/1"


class TorchCheckpointingBackend(StoredSteps):
    capabilities = CAPABILITIES

    def __init__(self, ctx: BackendContext):
        if world_size(ctx.process_group) > 1:
            raise ConfigError(
                f"checkpoint.backend = {NAME!r} runs in one process only, but this job has "
                f"{world_size(ctx.process_group)} ranks: torch-checkpointing 0.1.1 keeps sharded or per-rank state "
                "only through pickled metadata, and one rank's files would silently drop the others' state "
                "(e.g. their dataloader positions); use the dcp backend for multi-rank jobs"
            )
        self.options: TorchCheckpointingOptions = ctx.options or TorchCheckpointingOptions()
        self.verify_mode = ctx.verify
        self.name = ctx.name or NAME
        self.store = StepDirectory(ctx.folder, self.name, process_group=ctx.process_group)
        self.library = Library(write_threads=self.options.write_threads)

    def close(self) -> None:
        self.library.close()

    # ------------------------------------------------------------------ writing
    def write(self, step: int, state: StepState) -> None:
        payload = self._payload(state)
        with self.store.stage(step) as staging:
            self._save(staging, payload)

    def write_path(self, path: str, state: StepState, progress: Callable[[int], None] | None = None) -> None:
        """A new directory in this layout outside the step folder (``ckpt convert --to``)."""
        payload = self._payload(state)
        with staged_directory(path) as staging:
            self._save(staging, payload)
            commit_directory(staging, path, step_of(path), self.name)
        if progress is not None:
            progress(sum(t.numel() * t.element_size() for t in payload[MODEL].values()))

    def _payload(self, state: StepState) -> dict[str, Any]:
        """What torch-checkpointing is handed: checked and split before the step directory exists."""
        for key, tensor in state.model.items():
            if not isinstance(tensor, torch.Tensor):
                raise StateMismatchError(f"model state {key!r} is a {type(tensor).__name__}, not a tensor", [key])
            structure.refuse_dtensor(tensor, key)
        model, model_aliases = structure.split_aliases({k: v.detach() for k, v in state.model.items()})
        layout: dict[str, Any] = {"format": LAYOUT_FORMAT, "writer": f"torch_checkpointing {VERSION}",
                                  "model_aliases": model_aliases, "extras": None}
        payload: dict[str, Any] = {MODEL: model, LAYOUT: layout}
        if state.extras:
            encoded = structure.encode_extras(state.extras)
            tensors, aliases = structure.split_aliases(encoded.tensors)
            layout["extras"] = {"state": encoded.state, "aliases": aliases}
            if tensors:
                payload[EXTRAS] = tensors
        return payload

    def _save(self, directory: str, payload: Mapping[str, Any]) -> None:
        try:
            self.library.save(directory, payload)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"torch-checkpointing failed to write {directory}: {e!r}") from e

    # ------------------------------------------------------------------ reading
    def read(self, step: int, state: StepState) -> None:
        path = self.store.committed_path(step)
        self.store.verify(path, self.verify_mode)
        self._read_dir(path, state)

    def read_path(self, path: str, state: StepState) -> None:
        """A step directory of this layout outside the folder (``ckpt convert`` from it)."""
        StepDirectory(os.path.dirname(os.path.abspath(path)), self.name).verify(path, self.verify_mode)
        self._read_dir(path, state)

    def _read_dir(self, path: str, state: StepState) -> None:
        check_no_escaping_links(path)  # also with verify = "off": torch-checkpointing follows links
        check_plain_files(path)  # and opens files with a plain open(): a FIFO would block it
        layout = read_layout(path)
        into: dict[str, dict[str, Any]] = {}
        groups: dict[str, dict[str, list[torch.Tensor]]] = {}
        extras_plan = None
        if state.model:
            specs, aliases = stored_model_specs(path, layout)
            wanted = {}
            for key, tensor in state.model.items():
                structure.refuse_dtensor(tensor, key)
                wanted[key] = TensorSpec.of(tensor)
            check_fit(wanted, specs, path)
            targets: dict[str, list[torch.Tensor]] = {}
            for key, tensor in state.model.items():
                targets.setdefault(aliases.get(key, key), []).append(tensor)
            into[MODEL], groups[MODEL] = _library_targets(targets, set())
        if state.extras:
            extras_plan = plan_extras(path, layout, state.extras)
            if extras_plan.targets or extras_plan.fresh:
                into[EXTRAS], groups[EXTRAS] = _library_targets(extras_plan.targets, extras_plan.fresh)
        loaded = self._load(path, into) if into else {}
        for item, by_name in groups.items():
            for name, targets in by_name.items():
                for target in targets:
                    target.copy_(loaded[item][name])
        if extras_plan is not None:
            for key, value in extras_plan.values.items():
                state.extras[key] = structure.materialize(value, loaded.get(EXTRAS, {}))

    def _load(self, path: str, into: Mapping[str, Any]) -> Mapping[str, Any]:
        try:
            return self.library.load(path, into)
        except CheckpointError:
            raise
        except Exception as e:  # after the checks above only damage that appeared since
            raise CorruptCheckpointError(f"torch-checkpointing failed to read {path}: {e!r}", path) from e

    # ------------------------------------------------------------------ inspecting (ckpt)
    def recognizes(self, path: str) -> bool:
        return os.path.isfile(os.path.join(path, LAYOUT_FILE)) and os.path.isfile(os.path.join(path, MODEL_FILE))

    def describe(self, path: str) -> dict[str, Any]:
        layout = read_layout(path)
        model = read_safetensors_header(safe_join(path, MODEL_FILE))
        rows = [_row(e, MODEL_FILE) for e in model.entries.values()]
        rows += [{**_row(model.entries[target], MODEL_FILE), "name": alias, "file": f"{MODEL_FILE} (= {target})"}
                 for alias, target in dict(layout["model_aliases"]).items() if target in model.entries]
        out: dict[str, Any] = {"tensors": sorted(rows, key=lambda r: r["name"])}
        extras = layout["extras"]
        if extras is not None:
            header = read_safetensors_header(safe_join(path, EXTRAS_FILE)) if _has_extras_file(path) else None
            section = [_row(e, EXTRAS_FILE) for e in header.entries.values()] if header else []
            for key, node in extras["state"].items():
                values = _count_values(node)
                if values:
                    section.append({"name": f"{key} ({values} non-tensor values)", "dtype": "object", "shape": None,
                                    "bytes": 0, "file": LAYOUT_FILE})
            out["sections"] = {"training state (extras.safetensors + layout.json)": sorted(section, key=lambda r: r["name"])}
        return out

    def check_structure(self, path: str) -> str:
        """Beyond the manifest: headers and layout parse, aliases resolve, and the training-state
        structure and its tensor file name each other exactly."""
        layout = read_layout(path)
        specs, aliases = stored_model_specs(path, layout)
        summary = f"{len(specs) - len(aliases)} model tensors ({len(aliases)} tied)"
        extras = layout["extras"]
        if extras is not None:
            source = safe_join(path, LAYOUT_FILE)
            stored = {key: structure.decode(node, source) for key, node in extras["state"].items()}
            extra_specs = stored_extras_specs(path)
            plan = structure.plan_extras(stored, dict.fromkeys(stored), extra_specs, extras["aliases"], path)
            unused = sorted(set(extra_specs) - plan.fresh)
            if unused:
                file = safe_join(path, EXTRAS_FILE)
                raise CorruptCheckpointError(f"{file} holds tensors {unused[:5]} that {LAYOUT_FILE} never names", file)
            summary += f"; training state {sorted(stored)}: {len(extra_specs)} tensors, structure ok"
        return summary


# ---------------------------------------------------------------------- reading helpers
def read_layout(path: str) -> dict[str, Any]:
    """``layout.json``, parsed strictly and checked for shape; CorruptCheckpointError otherwise."""
    file = safe_join(path, LAYOUT_FILE)
    try:
        raw = read_regular(file, 64 << 20, "step layout")
    except FileNotFoundError:
        raise CorruptCheckpointError(f"{file} is missing", file) from None
    except OSError as e:
        raise CorruptCheckpointError(f"{file} cannot be read: {e}", file) from None
    layout = parse_json_strict(raw, file, "the step layout")

    def bad(why: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"{file}: {why}", file)

    if not isinstance(layout, dict) or layout.get("format") != LAYOUT_FORMAT:
        raise bad(f"not a {LAYOUT_FORMAT} layout")
    if not _str_map(layout.get("model_aliases")):
        raise bad("model_aliases must map names to names")
    if "extras" not in layout:
        raise bad("has no extras entry (null, or {state: {...}, aliases: {...}})")
    extras = layout["extras"]
    if extras is not None and not (
        isinstance(extras, dict) and isinstance(extras.get("state"), dict) and _str_map(extras.get("aliases"))
    ):
        raise bad("extras must be null or {state: {...}, aliases: {...}}")
    return layout


def _str_map(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())


def stored_model_specs(path: str, layout: Mapping[str, Any]) -> tuple[dict[str, TensorSpec], dict[str, str]]:
    """(name -> spec for every model tensor, aliases included; alias -> stored name)."""
    header = read_safetensors_header(safe_join(path, MODEL_FILE))
    specs = {name: TensorSpec(e.shape, e.dtype) for name, e in header.entries.items()}
    aliases = dict(layout["model_aliases"])
    for alias, target in aliases.items():
        if target not in specs or alias in specs:
            file = safe_join(path, LAYOUT_FILE)
            raise CorruptCheckpointError(f"{file}: alias {alias!r} -> {target!r} does not match {MODEL_FILE}", file)
        specs[alias] = specs[target]
    return specs, aliases


def _has_extras_file(path: str) -> bool:
    return os.path.lexists(os.path.join(path, EXTRAS_FILE))


def stored_extras_specs(path: str) -> dict[str, TensorSpec]:
    if not _has_extras_file(path):
        return {}
    header = read_safetensors_header(safe_join(path, EXTRAS_FILE))
    return {name: TensorSpec(e.shape, e.dtype) for name, e in header.entries.items()}


def plan_extras(path: str, layout: Mapping[str, Any], receiver: Mapping[str, Any]) -> structure.ExtrasPlan:
    extras = layout["extras"]
    if extras is None:
        raise StateMismatchError(
            f"{path} holds model weights only, so it cannot restore {sorted(receiver)}; load it model-only or list "
            "them in checkpoint.exclude_from_loading",
            sorted(receiver),
        )
    source = safe_join(path, LAYOUT_FILE)
    stored = {key: structure.decode(node, source) for key, node in extras["state"].items() if key in receiver}
    return structure.plan_extras(stored, receiver, stored_extras_specs(path), extras["aliases"], path)


def _library_targets(
    targets: Mapping[str, list[torch.Tensor]], fresh: set[str]
) -> tuple[dict[str, torch.Tensor | None], dict[str, list[torch.Tensor]]]:
    """(what torch-checkpointing fills: stored name -> the receiver's tensor, or None for a new
    one; stored name -> receiver tensors we fill from that new one). A stored tensor with one
    receiver tensor is copied straight into it; tied receiver tensors (several for one stored
    name) are filled from one transient copy, so a dtype cast never happens twice."""
    into: dict[str, torch.Tensor | None] = {name: None for name in fresh}
    later: dict[str, list[torch.Tensor]] = {}
    for name, tensors in targets.items():
        distinct = list({id(t): t for t in tensors}.values())
        if len(distinct) == 1 and name not in fresh:
            into[name] = distinct[0]
        else:
            into[name] = None
            later[name] = distinct
    return into, later


def _row(entry: Any, file: str) -> dict[str, Any]:
    return {"name": entry.name, "dtype": str(entry.dtype).replace("torch.", ""), "shape": list(entry.shape),
            "bytes": entry.nbytes, "file": file}


def _count_values(node: Any) -> int:
    """Non-tensor leaves in a tagged JSON value (for ``ckpt inspect``)."""
    if isinstance(node, dict) and len(node) == 1:
        ((tag, body),) = node.items()
        if tag == "tensor":
            return 0
        if tag in ("list", "tuple") and isinstance(body, list):
            return sum(_count_values(v) for v in body)
        if tag == "dict" and isinstance(body, list):
            return sum(_count_values(p[1]) for p in body if isinstance(p, list) and len(p) == 2)
    return 1

