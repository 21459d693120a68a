"""``ckpt``: look inside, check and convert checkpoints without writing Python.

    ckpt inspect PATH [--json]
    ckpt verify PATH [--mode checksum|size]
    ckpt convert SRC DST --to hf|dcp --model NAME --flavor FLAVOR [--model-arg KEY=VALUE ...]

PATH is a checkpoint folder (holding ``step-N`` directories) or one step directory; steps
written by this library (with a manifest) and by other tools (TorchTitan's DCP steps,
``save_pretrained`` directories: "foreign", no checksums) are both understood. Nothing read
from disk is unpickled or trusted: DCP metadata goes through the restricted unpickler, HF
indexes and headers through the same checks the ``hf`` backend uses.

Exit status: 0 ok, 1 the checkpoint is damaged or unsafe, 2 a usage or config mistake (bad
arguments, missing path, unknown model or flavor). Errors are one line on stderr, never a
traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Sequence

EXIT_OK, EXIT_CORRUPT, EXIT_USAGE = 0, 1, 2
DTYPE_CHOICES = ("float32", "bfloat16", "float16")


class UsageError(Exception):
    """A mistake in the command line (exit 2)."""


# --------------------------------------------------------------------------------- discovery
@dataclass
class StepInfo:
    path: str
    name: str
    backend: str  # "dcp" or "hf"
    foreign: bool  # no manifest: written by another tool, not checksummed


@dataclass
class Located:
    path: str
    is_folder: bool
    steps: list[StepInfo] = field(default_factory=list)
    leftovers: list[str] = field(default_factory=list)


def _step_kind(path: str) -> tuple[str, bool] | None:
    """(backend, foreign) for a step directory, or None when ``path`` is not one."""
    from .backends.dcp import DCP_METADATA
    from .backends.hf.directory import is_hf_dir
    from .commit import MANIFEST, Manifest

    if os.path.isfile(os.path.join(path, MANIFEST)):
        backend = Manifest.read(path).backend
        if backend not in ("dcp", "hf"):
            backend = "dcp" if os.path.isfile(os.path.join(path, DCP_METADATA)) else "hf"
        return backend, False
    if os.path.isfile(os.path.join(path, DCP_METADATA)):
        return "dcp", True
    if is_hf_dir(path):
        return "hf", True
    return None


def locate(path: str) -> Located:
    from .commit import STAGING_PREFIX, STEP_RE, TRASH_PREFIX

    if not os.path.exists(path):
        raise UsageError(f"{path}: no such file or directory")
    if not os.path.isdir(path):
        raise UsageError(f"{path} is a file; give a checkpoint folder or a step directory")
    kind = _step_kind(path)
    if kind is not None:
        return Located(path, False, [StepInfo(path, os.path.basename(os.path.normpath(path)), *kind)])
    found = Located(path, True)
    numbered = []
    for name in os.listdir(path):
        full = os.path.join(path, name)
        m = STEP_RE.match(name)
        if m and os.path.isdir(full) and not os.path.islink(full):
            kind = _step_kind(full)
            if kind is not None:
                numbered.append((int(m.group(1)), StepInfo(full, name, *kind)))
        elif name.startswith((STAGING_PREFIX, TRASH_PREFIX)):
            found.leftovers.append(name)
    if not numbered and not found.leftovers:
        raise UsageError(f"{path} is neither a checkpoint step directory nor a folder of step-N directories")
    found.steps = [info for _, info in sorted(numbered, key=lambda pair: pair[0])]
    return found


# --------------------------------------------------------------------------------- describing
def _dtype_name(dtype: Any) -> str:
    return str(dtype).replace("torch.", "")


def _dcp_tensors(step_dir: str) -> list[dict[str, Any]]:
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from .backends.dcp import read_metadata

    rows = []
    for key, md in sorted(read_metadata(step_dir).state_dict_metadata.items()):
        if isinstance(md, TensorStorageMetadata):
            numel = 1
            for d in md.size:
                numel *= d
            dtype = md.properties.dtype
            rows.append({"name": key, "dtype": _dtype_name(dtype), "shape": list(md.size), "bytes": numel * dtype.itemsize})
        else:
            rows.append({"name": key, "dtype": "object", "shape": None, "bytes": 0})
    return rows


def _hf_tensors(step_dir: str) -> list[dict[str, Any]]:
    from .backends.hf.directory import HFDirectory

    directory = HFDirectory.open(step_dir)
    return [
        {"name": name, "dtype": _dtype_name(e.dtype), "shape": list(e.shape), "bytes": e.nbytes, "file": rel}
        for name, (rel, e) in sorted(directory.tensors.items())
    ]


def _disk_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def describe_step(step: StepInfo) -> dict[str, Any]:
    from .backends.hf.training_state import SIDECAR, has_sidecar, sidecar_path

    out: dict[str, Any] = {"step": step.name, "path": step.path, "backend": step.backend, "foreign": step.foreign}
    if step.backend == "dcp":
        out["tensors"] = _dcp_tensors(step.path)
    else:
        out["tensors"] = _hf_tensors(step.path)
        if has_sidecar(step.path):
            out[SIDECAR] = _dcp_tensors(sidecar_path(step.path))
    out["tensor_bytes"] = sum(r["bytes"] for r in out["tensors"]) + sum(r["bytes"] for r in out.get(SIDECAR, []))
    out["disk_bytes"] = _disk_bytes(step.path)
    return out


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover


def _print_rows(rows: list[dict[str, Any]], indent: str) -> None:
    width = max((len(r["name"]) for r in rows), default=0)
    for r in rows:
        shape = "object" if r["shape"] is None else f"{r['dtype']:<9} {r['shape']}"
        where = f"  {r['file']}" if "file" in r else ""
        print(f"{indent}{r['name']:<{width}}  {shape}{where}")


def cmd_inspect(args: argparse.Namespace) -> int:
    from .backends.hf.training_state import SIDECAR

    found = locate(args.path)
    described = [describe_step(s) for s in found.steps]
    if args.json:
        print(json.dumps({"path": found.path, "folder": found.is_folder, "steps": described, "leftovers": found.leftovers}, indent=1))
        return EXIT_OK
    if found.is_folder:
        print(f"{found.path}: checkpoint folder, {len(found.steps)} committed step(s): {[s.name for s in found.steps]}")
    for d in described:
        origin = "foreign: no manifest, written by another tool" if d["foreign"] else "manifest"
        print(f"{d['step']}: backend {d['backend']} ({origin}); {len(d['tensors'])} entries, "
              f"{_human(d['tensor_bytes'])} of tensors, {_human(d['disk_bytes'])} on disk")
        _print_rows(d["tensors"], "  ")
        if SIDECAR in d:
            print(f"  {SIDECAR}/ (DCP sidecar): {len(d[SIDECAR])} entries")
            _print_rows(d[SIDECAR], "    ")
    if found.leftovers:
        print(f"partial leftovers of interrupted writes (ignored, removed by the next writer): {found.leftovers}")
    if len(described) > 1:
        print(f"total: {_human(sum(d['tensor_bytes'] for d in described))} of tensors, "
              f"{_human(sum(d['disk_bytes'] for d in described))} on disk")
    return EXIT_OK


# --------------------------------------------------------------------------------- verifying
def _check_dcp_structure(step_dir: str) -> None:
    """Every byte range the (safely parsed) metadata names lies inside an existing file."""
    from .backends.dcp import read_metadata
    from .errors import CorruptCheckpointError
    from .safepath import safe_join

    sizes: dict[str, int] = {}
    for info in (read_metadata(step_dir).storage_data or {}).values():
        rel = os.fspath(getattr(info, "relative_path", ""))
        path = safe_join(step_dir, rel)
        if rel not in sizes:
            if not os.path.isfile(path):
                raise CorruptCheckpointError(f"DCP data file missing: {path}", path)
            sizes[rel] = os.path.getsize(path)
        end = int(getattr(info, "offset", 0)) + int(getattr(info, "length", 0))
        if end > sizes[rel]:
            raise CorruptCheckpointError(f"{path} has {sizes[rel]} bytes, the metadata reads up to byte {end} (truncated)", path)


def verify_step(step: StepInfo, mode: str) -> str:
    """Checksums (when there is a manifest), then structure; returns a one-line summary."""
    from .backends.hf.directory import HFDirectory
    from .backends.hf.training_state import has_sidecar, sidecar_path
    from .commit import Manifest
    from .safepath import check_no_escaping_links

    check_no_escaping_links(step.path)
    if step.foreign:
        checked = "no manifest (written by another tool): structure only"
    else:
        manifest = Manifest.read(step.path)
        manifest.verify(step.path, mode)
        checked = f"{len(manifest.files)} files match the manifest ({mode})"
    if step.backend == "dcp":
        _check_dcp_structure(step.path)
    else:
        directory = HFDirectory.open(step.path)
        checked += f"; {len(directory.tensors)} tensors in {len(directory.shards)} shard(s)"
        if has_sidecar(step.path):
            _check_dcp_structure(sidecar_path(step.path))
            checked += "; training_state ok"
    return checked


def cmd_verify(args: argparse.Namespace) -> int:
    from .errors import CorruptCheckpointError

    found = locate(args.path)
    bad = 0
    for step in found.steps:
        try:
            summary = verify_step(step, args.mode)
        except CorruptCheckpointError as e:
            bad += 1
            print(f"{step.name}: CORRUPT ({step.backend}): {e}")
        else:
            print(f"{step.name}: ok ({step.backend}): {summary}")
    if found.leftovers:
        print(f"note: partial leftovers of interrupted writes (never loaded): {found.leftovers}")
    if bad:
        print(f"{bad} of {len(found.steps)} step(s) damaged", file=sys.stderr)
        return EXIT_CORRUPT
    if not found.steps:
        print(f"{found.path} has no committed steps", file=sys.stderr)
        return EXIT_CORRUPT
    return EXIT_OK


# --------------------------------------------------------------------------------- converting
def _progress_factory(enabled: bool):
    if not enabled:
        return None

    def make(total: int, desc: str):
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr)

    return make


def cmd_convert(args: argparse.Namespace) -> int:
    import torch

    from .backends.hf.convert import dcp_to_hf, hf_to_dcp, titan_model

    src = locate(args.src)
    if not src.steps:
        raise UsageError(f"{args.src} has no committed step to convert")
    step = src.steps[-1]  # a folder converts its newest step
    if step.backend == args.to:
        raise UsageError(f"{step.path} is already a {args.to} checkpoint")
    model = titan_model(args.model, args.flavor, args.model_arg or [])
    dtype = getattr(torch, args.dtype) if args.dtype else None
    progress = _progress_factory(not args.no_progress)
    if args.to == "hf":
        result = dcp_to_hf(step.path, args.dst, model, args.max_shard_size_mb << 20, dtype, progress)
    else:
        result = hf_to_dcp(step.path, args.dst, model, dtype, progress)
    print(f"converted {step.path} ({step.backend}) -> {args.dst} ({args.to}): {result['tensors']} tensors, {_human(result['bytes'])}")
    if result["skipped"]:
        print(f"not converted (not model weights): {len(result['skipped'])} entries, e.g. {result['skipped'][:3]}")
    return EXIT_OK


# --------------------------------------------------------------------------------- entry point
class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's own exit code is already 2; keep it terse
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
    sub = parser.add_subparsers(dest="command", metavar="{inspect,verify,convert}", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("inspect", help="backend, steps, tensors with dtypes and shapes, sizes")
    p.add_argument("path", help="a checkpoint folder (with step-N directories) or one step directory")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("verify", help="checksums and structure; exit 0 ok, 1 damaged, 2 usage")
    p.add_argument("path", help="a checkpoint folder (with step-N directories) or one step directory")
    p.add_argument("--mode", choices=("checksum", "size"), default="checksum", help="checksum: CRC32 of every byte (default); size: file sizes only")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("convert", help="DCP <-> Hugging Face model weights through the TorchTitan adapter")
    p.add_argument("src", help="a DCP or HF step directory, or a folder (its newest step)")
    p.add_argument("dst", help="the new directory to create (must not exist)")
    p.add_argument("--to", required=True, choices=("hf", "dcp"), help="output format")
    p.add_argument("--model", required=True, help="TorchTitan model name, e.g. qwen3, llama3")
    p.add_argument("--flavor", required=True, help="TorchTitan flavor, e.g. debugmodel, 0.6B, 8B")
    p.add_argument("--model-arg", action="append", metavar="KEY=VALUE", help="override a model arg (repeatable), e.g. dim=64")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, help="cast floating tensors (default: keep the stored dtype)")
    p.add_argument("--max-shard-size-mb", type=_positive, default=2048, help="largest HF shard in MiB (default 2048)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_convert)
    return parser


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
    except UsageError as e:
        print(f"ckpt: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as e:
        from .errors import CheckpointError, CorruptCheckpointError

        if isinstance(e, CorruptCheckpointError):
            print(f"ckpt: checkpoint damaged or unsafe: {e}", file=sys.stderr)
            return EXIT_CORRUPT
        if isinstance(e, CheckpointError):
            print(f"ckpt: error: {e}", file=sys.stderr)
            return EXIT_USAGE
        if isinstance(e, OSError):
            print(f"ckpt: error: {e}", file=sys.stderr)
            return EXIT_CORRUPT
        raise


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
