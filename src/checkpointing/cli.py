"""``ckpt``: look inside, check and convert checkpoints without writing Python.

    ckpt backends [--json]
    ckpt inspect PATH [--json]
    ckpt verify PATH [--mode checksum|size]
    ckpt convert SRC DST --to BACKEND --model NAME --flavor FLAVOR [--model-arg KEY=VALUE ...]

PATH is a checkpoint folder (holding ``step-N`` directories) or one step directory. Every
command goes through the backend registry: a step's manifest names the backend that wrote it,
and a step another tool wrote (TorchTitan's DCP steps, ``save_pretrained`` directories:
"foreign", no checksums) is claimed by the backend that recognizes it. So a plugin's steps are
inspected, verified and converted exactly like the built-in ones, by whatever the plugin
implements (:class:`~checkpointing.backend.Inspects`, ``ReadsExternal``, ``WritesExternal``);
the manifest alone already gives every manifested step sizes and checksums.

Exit status: 0 ok, 1 the checkpoint is damaged or unsafe, 2 a usage or config mistake (bad
arguments, missing path, unknown model, flavor or backend). Errors are one line on stderr,
never a traceback. ``--help`` imports neither torch nor any backend, so it answers at once.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

from .dtypes import FLOAT_DTYPE_NAMES as DTYPE_CHOICES

EXIT_OK, EXIT_CORRUPT, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """A mistake in the command line (exit 2)."""


# --------------------------------------------------------------------------------- backends
class Inspectors:
    """One read-only instance per registered backend, built on first use with default options,
    to answer questions about step directories on disk."""

    def __init__(self) -> None:
        self._built: dict[str, Any] = {}

    def get(self, name: str) -> Any:
        if name not in self._built:
            self._built[name] = self.build(name)
        return self._built[name]

    @staticmethod
    def build(name: str, sd_adapter: Any = None, options: Any = None, load_only: bool = True) -> Any:
        from .backend import BackendContext, backend_spec

        spec = backend_spec(name)
        if not spec.capabilities.persistent:
            raise UsageError(f"backend {name!r} keeps no files; there is nothing on disk to inspect or write")
        options = options if options is not None else spec.default_options()
        ctx = BackendContext(folder=".", options=options, sd_adapter=sd_adapter, load_only=load_only, name=name)
        return spec.factory(ctx)

    def recognizing(self, path: str) -> str | None:
        """The first persistent backend (built-ins first, then plugins by name) that claims a
        step directory without a manifest."""
        from .backend import Inspects, loadable_specs

        for spec in loadable_specs():
            if not spec.capabilities.persistent:
                continue
            backend = self.get(spec.name)
            if isinstance(backend, Inspects) and backend.recognizes(path):
                return spec.name
        return None


INSPECTORS = Inspectors()


# --------------------------------------------------------------------------------- discovery
@dataclass
class StepInfo:
    path: str
    name: str
    backend: str
    foreign: bool  # no manifest: written by another tool, not checksummed


@dataclass
class Located:
    path: str
    is_folder: bool
    steps: list[StepInfo] = field(default_factory=list)
    leftovers: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    """Names that look like steps but are not canonical ``step-N`` (``step-007``, a non-ASCII
    digit, a trailing newline): never listed or loaded as steps."""


def _step_kind(path: str) -> tuple[str, bool] | None:
    """(backend, foreign) for a step directory, or None when ``path`` is not one.

    A manifest of any file kind makes a step of ours (a FIFO or link there is refused, not
    taken for "no manifest"); one that cannot be parsed still does, with the backend that
    recognizes the files: ``verify`` then reports the damage for that step."""
    from .commit import MANIFEST, Manifest
    from .errors import CorruptCheckpointError, UnsafeCheckpointError
    from .untrusted import exists_here

    if exists_here(os.path.join(path, MANIFEST)):
        try:
            return Manifest.read(path).backend, False
        except UnsafeCheckpointError:
            raise  # a FIFO, a link: an attack to refuse, not a damaged step to describe
        except CorruptCheckpointError:
            name = INSPECTORS.recognizing(path)
            if name is None:
                raise
            return name, False
    name = INSPECTORS.recognizing(path)
    return (name, True) if name is not None else None


def locate(path: str) -> Located:
    from .commit import STAGING_PREFIX, TRASH_PREFIX, parse_step_name

    if not os.path.exists(path):
        raise UsageError(f"{path}: no such file or directory")
    if not os.path.isdir(path):
        raise UsageError(f"{path} is a file; give a checkpoint folder or a step directory")
    kind = _step_kind(path)
    if kind is not None:
        return Located(path, False, [StepInfo(path, os.path.basename(os.path.normpath(path)), *kind)])
    found = Located(path, True)
    numbered = []
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        step = parse_step_name(name)
        if step is not None and os.path.isdir(full) and not os.path.islink(full):
            kind = _step_kind(full)
            if kind is not None:
                numbered.append((step, StepInfo(full, name, *kind)))
        elif name.startswith((STAGING_PREFIX, TRASH_PREFIX)):
            found.leftovers.append(name)
        elif name.lower().startswith("step"):
            found.ignored.append(name)
    if not numbered and not found.leftovers:
        hint = f" (ignored, not canonical step-N names: {_names(found.ignored)})" if found.ignored else ""
        raise UsageError(f"{path} is neither a checkpoint step directory nor a folder of step-N directories{hint}")
    found.steps = [info for _, info in sorted(numbered, key=lambda pair: pair[0])]
    return found


def _names(names: list[str]) -> str:
    """Directory names as a reader can see them (a trailing newline or a non-ASCII digit is the
    point of listing them): ``ascii`` quoting, at most ten."""
    shown = ", ".join(ascii(n) for n in names[:10])
    return shown + (f" and {len(names) - 10} more" if len(names) > 10 else "")


def _inspector_for(step: StepInfo) -> Any:
    from .errors import BackendNotFoundError

    try:
        return INSPECTORS.get(step.backend)
    except BackendNotFoundError:
        raise UsageError(
            f"{step.path} was written by backend {step.backend!r}, which is not installed here "
            "(install the plugin that provides it)"
        ) from None


# --------------------------------------------------------------------------------- describing
def _manifest_rows(path: str) -> list[dict[str, Any]]:
    """What any manifested step tells without its backend's help: its files and sizes."""
    from .commit import Manifest

    return [
        {"name": rel, "dtype": "file", "shape": None, "bytes": entry["size"]}
        for rel, entry in sorted(Manifest.read(path).files.items())
    ]


def _disk_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def describe_step(step: StepInfo) -> dict[str, Any]:
    from .backend import Inspects

    backend = _inspector_for(step)
    described = backend.describe(step.path) if isinstance(backend, Inspects) else {"tensors": _manifest_rows(step.path)}
    out: dict[str, Any] = {"step": step.name, "path": step.path, "backend": step.backend, "foreign": step.foreign}
    out["tensors"] = described["tensors"]
    out["sections"] = described.get("sections", {})
    rows = out["tensors"] + [r for rows in out["sections"].values() for r in rows]
    out["tensor_bytes"] = sum(r["bytes"] for r in rows)
    out["disk_bytes"] = _disk_bytes(step.path)
    return out


def _print_rows(rows: list[dict[str, Any]], indent: str) -> None:
    width = max((len(r["name"]) for r in rows), default=0)
    for r in rows:
        shape = "object" if r["shape"] is None and r["dtype"] == "object" else f"{r['dtype']:<9} {r['shape'] or ''}"
        where = f"  {r['file']}" if "file" in r else ""
        print(f"{indent}{r['name']:<{width}}  {shape}{where}")


def cmd_inspect(args: argparse.Namespace) -> int:
    from .mixed_folder import warning
    from .units import human_bytes

    found = locate(args.path)
    described = [describe_step(s) for s in found.steps]
    mixed = warning(found.path) if found.is_folder else None
    if mixed:
        print(f"ckpt: warning: {mixed}", file=sys.stderr)
    if args.json:
        print(json.dumps({"path": found.path, "folder": found.is_folder, "steps": described, "leftovers": found.leftovers,
                          "warnings": [mixed] if mixed else [], "ignored": found.ignored}, indent=1))
        return EXIT_OK
    if found.is_folder:
        print(f"{found.path}: checkpoint folder, {len(found.steps)} committed step(s): {[s.name for s in found.steps]}")
    for d in described:
        origin = "foreign: no manifest, written by another tool" if d["foreign"] else "manifest"
        print(f"{d['step']}: backend {d['backend']} ({origin}); {len(d['tensors'])} entries, "
              f"{human_bytes(d['tensor_bytes'])} of tensors, {human_bytes(d['disk_bytes'])} on disk")
        _print_rows(d["tensors"], "  ")
        for title, rows in d["sections"].items():
            print(f"  {title}: {len(rows)} entries")
            _print_rows(rows, "    ")
    if found.leftovers:
        print(f"partial leftovers of interrupted writes (ignored, removed by the next writer): {found.leftovers}")
    if found.ignored:
        print(f"foreign names, ignored (not canonical step-N directories, never loaded): {_names(found.ignored)}")
    if len(described) > 1:
        print(f"total: {human_bytes(sum(d['tensor_bytes'] for d in described))} of tensors, "
              f"{human_bytes(sum(d['disk_bytes'] for d in described))} on disk")
    return EXIT_OK


# --------------------------------------------------------------------------------- verifying
def verify_step(step: StepInfo, mode: str) -> str:
    """Checksums (when there is a manifest), then the backend's own structure checks; returns a
    one-line summary."""
    from .backend import Inspects
    from .commit import Manifest
    from .safepath import check_no_escaping_links

    check_no_escaping_links(step.path)
    if step.foreign:
        checked = "no manifest (written by another tool): structure only"
    else:
        manifest = Manifest.read(step.path)  # never an empty file table
        manifest.verify(step.path, mode)
        checked = f"{len(manifest.files)} files match the manifest ({mode}), none unlisted"
    backend = _inspector_for(step)
    if isinstance(backend, Inspects):
        checked += f"; {backend.check_structure(step.path)}"
    return checked


def cmd_verify(args: argparse.Namespace) -> int:
    from .errors import CheckpointError, CorruptCheckpointError, UnsafeCheckpointError

    found = locate(args.path)
    bad = 0
    for step in found.steps:
        try:
            summary = verify_step(step, args.mode)
        except CorruptCheckpointError as e:
            bad += 1
            print(f"{step.name}: {'UNSAFE' if isinstance(e, UnsafeCheckpointError) else 'CORRUPT'} ({step.backend}): {e}")
        except CheckpointError as e:
            bad += 1
            print(f"{step.name}: UNREADABLE ({step.backend}): {e}")
        else:
            print(f"{step.name}: ok ({step.backend}): {summary}")
    if found.leftovers:
        print(f"note: partial leftovers of interrupted writes (never loaded): {found.leftovers}")
    if found.ignored:
        print(f"note: not canonical step-N names, ignored (never loaded): {_names(found.ignored)}")
    if bad:
        print(f"{bad} of {len(found.steps)} step(s) damaged", file=sys.stderr)
        return EXIT_CORRUPT
    if not found.steps:
        print(f"{found.path} has no committed steps", file=sys.stderr)
        return EXIT_CORRUPT
    return EXIT_OK


# --------------------------------------------------------------------------------- converting
class _ProgressBar:
    """A tqdm bar made once the total is known; closed by the command."""

    def __init__(self, desc: str) -> None:
        self.desc = desc
        self.bar: Any = None
        """The tqdm bar (tqdm has no type hints); None until the total is known."""

    def __call__(self, total: int):
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=self.desc, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr)
        return self.bar.update

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def cmd_convert(args: argparse.Namespace) -> int:
    import torch

    from .convert import convert_step
    from .titan_models import titan_model
    from .units import human_bytes

    options = _destination_options(args)  # an unknown --to backend is named before anything is read
    src = locate(args.src)
    if not src.steps:
        raise UsageError(f"{args.src} has no committed step to convert")
    step = src.steps[-1]  # a folder converts its newest step
    if step.backend == args.to:
        raise UsageError(f"{step.path} is already a {args.to} checkpoint")
    model = titan_model(args.model, args.flavor, args.model_arg or [])
    reader = INSPECTORS.build(step.backend, model.adapter)
    writer = INSPECTORS.build(args.to, model.adapter, options, load_only=False)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    bar = None if args.no_progress else _ProgressBar(f"writing {args.to}")
    try:
        result = convert_step(step.path, reader, args.dst, writer, model, dtype, bar)
    finally:
        if bar is not None:
            bar.close()
    print(f"converted {step.path} ({step.backend}) -> {args.dst} ({args.to}): {result['tensors']} tensors, "
          f"{human_bytes(result['bytes'])}")
    if result["skipped"]:
        print(f"not converted (not model weights): {len(result['skipped'])} entries, e.g. {result['skipped'][:3]}")
    return EXIT_OK


def _destination_options(args: argparse.Namespace) -> Any:
    """``--option KEY=VALUE`` (and ``--max-shard-size-mb``) into the destination backend's own
    options table, type-checked like the TOML table."""
    import dataclasses

    from .backend import backend_spec
    from .config import validated_options

    spec = backend_spec(args.to)
    if not spec.capabilities.persistent:
        raise UsageError(f"--to {args.to!r}: that backend keeps no files; choose one that writes directories")
    items = list(args.option or [])
    if args.max_shard_size_mb is not None:
        items.append(f"max_shard_size_mb={args.max_shard_size_mb}")
    if not items:
        return None
    if spec.options is None:
        raise UsageError(f"backend {args.to!r} has no options; --option {items[0]!r} does not apply")
    names = {f.name: f for f in dataclasses.fields(spec.options)}
    changes = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or key not in names:
            raise UsageError(f"--option {item!r}: expected KEY=VALUE with KEY one of {', '.join(sorted(names))} "
                             f"([checkpoint.{args.to}])")
        changes[key] = _option_value(text)
    return validated_options(dataclasses.replace(spec.default_options(), **changes), f"--option [{args.to}]")


def _option_value(text: str) -> Any:
    """TOML-like scalars: integers, floats, true/false, else the text."""
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for parse in (int, float):
        try:
            return parse(text)
        except ValueError:
            pass
    return text


# --------------------------------------------------------------------------------- listing backends
def cmd_backends(args: argparse.Namespace) -> int:
    from .backend import available_backends, backend_spec
    from .errors import ConfigError
    from .options_doc import option_rows

    listed: list[dict[str, Any]] = []
    for name in available_backends():
        try:
            spec = backend_spec(name)
        except ConfigError as e:
            listed.append({"name": name, "error": str(e)})
            continue
        caps = spec.capabilities
        listed.append({
            "name": name,
            "summary": spec.summary,
            "capabilities": {"persistent": caps.persistent, "non_tensor_state": caps.non_tensor_state,
                             "cross_process": caps.cross_process},
            "options": [row.as_dict() for row in option_rows(spec.options)] if spec.options else [],
        })
    if args.json:
        print(json.dumps(listed, indent=1))
        return EXIT_OK
    for entry in listed:
        if "error" in entry:
            print(f"{entry['name']}: cannot be loaded: {entry['error']}")
            continue
        enabled = ", ".join(k for k, v in entry["capabilities"].items() if v) or "none"
        print(f"{entry['name']}: {entry['summary']}")
        print(f"  capabilities: {enabled}")
        if entry["options"]:
            print(f"  [checkpoint.{entry['name']}]")
            for row in entry["options"]:
                print(f"    {row['name']} = {row['default']}  ({row['type']})  {row['doc']}")
    return EXIT_OK


# --------------------------------------------------------------------------------- entry point
class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # argparse's own exit code is already 2; keep it terse
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ckpt", description="Inspect, verify and convert titan-checkpointing / TorchTitan / Hugging Face checkpoints.")
    sub = parser.add_subparsers(dest="command", metavar="{backends,inspect,verify,convert}", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("backends", help="registered backends (plugins included): capabilities and [checkpoint.<name>] options")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_backends)

    p = sub.add_parser("inspect", help="backend, steps, tensors with dtypes and shapes, sizes")
    p.add_argument("path", help="a checkpoint folder (with step-N directories) or one step directory")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("verify", help="checksums and structure; exit 0 ok, 1 damaged, 2 usage")
    p.add_argument("path", help="a checkpoint folder (with step-N directories) or one step directory")
    p.add_argument("--mode", choices=("checksum", "size"), default="checksum", help="checksum: every byte (default); size: file sizes only")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("convert", help="model weights from one backend's format to another's, through the TorchTitan adapter")
    p.add_argument("src", help="a step directory (any registered backend's, or another tool's), or a folder (its newest step)")
    p.add_argument("dst", help="the new directory to create (must not exist)")
    p.add_argument("--to", required=True, metavar="BACKEND", help="output format: a registered backend that writes directories, e.g. hf, dcp")
    p.add_argument("--model", required=True, help="TorchTitan model name, e.g. qwen3, llama3")
    p.add_argument("--flavor", required=True, help="TorchTitan flavor, e.g. debugmodel, 0.6B, 8B")
    p.add_argument("--model-arg", action="append", metavar="KEY=VALUE", help="override a model arg (repeatable), e.g. dim=64")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, help="cast floating tensors (default: keep the stored dtype)")
    p.add_argument("--option", action="append", metavar="KEY=VALUE",
                   help="a key of the destination backend's [checkpoint.<BACKEND>] table (repeatable; see 'ckpt backends')")
    p.add_argument("--max-shard-size-mb", type=_positive, help="short for --option max_shard_size_mb=N (largest HF shard in MiB)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_convert)
    return parser


def exit_code_for(error: BaseException) -> tuple[int, str]:
    """(exit status, one-line message) for any error ``ckpt`` can meet. Deliberate, not whatever
    Python does on a crash: 1 the checkpoint (or its file system) is damaged, unsafe or
    unreadable, or reading it failed in a way nobody foresaw; 2 the command line, a config or
    the model named does not fit. DCP's CheckpointException (a BaseException) is unwrapped to
    its first rank's cause."""
    from .backends.dcp_reader import first_failure
    from .errors import CheckpointError, CorruptCheckpointError

    error = first_failure(error)
    if isinstance(error, UsageError):
        return EXIT_USAGE, f"ckpt: error: {error}"
    if isinstance(error, CorruptCheckpointError):
        return EXIT_CORRUPT, f"ckpt: checkpoint damaged or unsafe: {error}"
    if isinstance(error, CheckpointError):  # config, a model or backend that does not fit
        return EXIT_USAGE, f"ckpt: error: {error}"
    if isinstance(error, OSError):
        return EXIT_CORRUPT, f"ckpt: error: {error}"
    text = "nested too deeply" if isinstance(error, RecursionError) else str(error)[:300]
    return EXIT_CORRUPT, (
        f"ckpt: error: unexpected {type(error).__name__} while reading the checkpoint: {text} "
        "(please report it; CKPT_TRACEBACK=1 prints the traceback)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``ckpt``; returns (and, as a console script, exits with) the status code."""
    import warnings

    # DCP's note that it runs in a single process is noise for an offline tool.
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except BrokenPipeError:  # `ckpt inspect ... | head`: the reader left, nothing went wrong
        sys.stdout = open(os.devnull, "w")
        return EXIT_OK
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as e:  # DCP's CheckpointException is a BaseException too
        if os.environ.get("CKPT_TRACEBACK"):
            import traceback

            traceback.print_exc()
        code, message = exit_code_for(e)
        print(message, file=sys.stderr)
        return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
