"""Mutations of real checkpoints, as hypothesis strategies: bytes, JSON fields, pickle opcodes,
file kinds and names. Each is plain data (a tuple) applied by :func:`apply`, so hypothesis can
shrink a failing case to the smallest edit that breaks a promise and print it.

A mutation names its target by index into the step's file list (modulo its length), so the
same strategy serves every backend, whatever files it writes.
"""

from __future__ import annotations

import json
import os
import pickletools
import shutil
import struct
import zlib
from typing import Any

from hypothesis import strategies as st

# --------------------------------------------------------------------------------- values
HUGE_INTS = [0, 1, -1, 7, 255, 256, 2**31 - 1, 2**31, 2**32, 2**40, 2**62, 2**63 - 1, 2**63, 2**64, 10**30, -(2**63)]
NASTY_STRINGS = [
    "", ".", "..", "../../etc/passwd", "/etc/passwd", "a/../../b", "\x00", "x" * 300, "__0_0.distcp",
    "tok_embeddings.weight", "model-00001-of-00001.safetensors", "training_state/.metadata", "manifest.json",
    "step-1", "\u0667", "F32", "U8", "F128", "titan-checkpointing/1",
]
DEEP = 5000

json_scalars = st.one_of(
    st.none(), st.booleans(), st.sampled_from(HUGE_INTS), st.integers(), st.floats(allow_nan=False),
    st.sampled_from(NASTY_STRINGS), st.text(max_size=12),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)
positions = st.integers(min_value=0, max_value=2**31)
"""A byte position, taken modulo the file's size (so it shrinks towards the start)."""
small_bytes = st.binary(min_size=1, max_size=24)

FILE_KINDS = ["fifo", "directory", "symlink_inside", "symlink_outside", "dangling_symlink", "dev_zero", "empty", "sparse_huge"]
NEW_NAMES = ["renamed.bin", "__1_0.distcp", "model-00002-of-00002.safetensors", "extra.json", ".metadata.bak", "MANIFEST.JSON"]
STEP_NAMES = ["step-01", "step-1\n", "step-\u0661", "step-2", "step-0", "step-18446744073709551616", "Step-1",
              ".inflight-1", "step-1.old", "step--1", "step- 1"]
PICKLE_SNIPPETS = [
    b"cos\nsystem\n", b"cbuiltins\neval\n", b"(", b"h\x00", b"h\x05", b"}", b"]", b")", b"\x86", b"s", b"a", b"R",
    b"b", b"N", b"K\x07", b"0", b"2", b".", b"\x8a\x08" + b"\xff" * 8, b"X\x00\x00\x00\x80",
    b"\x8c\x05torch\x8c\x04Size\x93", b"q\xff", b"r\xff\xff\xff\x7f", b"j\xff\xff\xff\x7f", b"\x95\xff\xff\xff\xff\x00\x00\x00\x00",
]

# --------------------------------------------------------------------------------- strategies
byte_mutations = st.one_of(
    st.tuples(st.just("flip"), positions, positions, st.integers(1, 255)),
    st.tuples(st.just("overwrite"), positions, positions, small_bytes),
    st.tuples(st.just("truncate"), positions, positions),
    st.tuples(st.just("append"), positions, small_bytes),
    st.tuples(st.just("insert"), positions, positions, small_bytes),
    st.tuples(st.just("cut"), positions, positions, st.integers(1, 64)),
)
json_mutations = st.one_of(
    st.tuples(st.just("json_set"), positions, st.lists(positions, max_size=4), json_values),
    st.tuples(st.just("json_delete"), positions, st.lists(positions, min_size=1, max_size=4)),
    st.tuples(st.just("json_deep"), positions, st.lists(positions, max_size=3)),
    st.tuples(st.just("json_duplicate_key"), positions, st.lists(positions, max_size=3)),
)
pickle_mutations = st.one_of(
    st.tuples(st.just("op_delete"), positions, positions),
    st.tuples(st.just("op_duplicate"), positions, positions),
    st.tuples(st.just("op_swap"), positions, positions),
    st.tuples(st.just("op_int"), positions, positions, st.sampled_from(HUGE_INTS) | st.integers()),
    st.tuples(st.just("op_str"), positions, positions, st.sampled_from(NASTY_STRINGS) | st.text(max_size=16)),
    st.tuples(st.just("op_insert"), positions, positions, st.sampled_from(PICKLE_SNIPPETS)),
)
file_mutations = st.one_of(
    st.tuples(st.just("kind"), positions, st.sampled_from(FILE_KINDS)),
    st.tuples(st.just("rename"), positions, st.sampled_from(NEW_NAMES) | positions),
    st.tuples(st.just("remove"), positions),
    st.tuples(st.just("add"), st.sampled_from(NEW_NAMES), positions, small_bytes),
    st.tuples(st.just("chmod"), positions, st.sampled_from([0o000, 0o644, 0o666, 0o200])),
)
step_mutations = st.one_of(
    st.tuples(st.just("step_name"), st.sampled_from(STEP_NAMES)),
    st.tuples(st.just("manifest"), st.sampled_from(["drop", "reseal"])),
)


def file_backend_mutations(max_size: int = 3):
    """1..3 edits of a file-backend step (dcp, hf)."""
    one = st.one_of(byte_mutations, json_mutations, pickle_mutations, file_mutations, step_mutations)
    return st.lists(one, min_size=1, max_size=max_size)


# --------------------------------------------------------------------------------- files
def files_of(step_dir: str) -> list[str]:
    out = []
    for root, dirs, names in os.walk(step_dir):
        dirs.sort()
        out += sorted(os.path.relpath(os.path.join(root, n), step_dir) for n in names)
    return out


def _pick(items: list[str], index: int) -> str | None:
    return items[index % len(items)] if items else None


def _regular(path: str) -> bool:
    return os.path.isfile(path) and not os.path.islink(path)


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _write(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def _is_json(rel: str) -> bool:
    return rel.endswith(".json") or rel.endswith(".safetensors")


def _is_pickle(rel: str) -> bool:
    return os.path.basename(rel) == ".metadata"


# --------------------------------------------------------------------------------- applying
class Applied:
    """What the edits did, for the judge: did the manifest survive untouched?"""

    def __init__(self) -> None:
        self.manifest_touched = False
        self.step_dir: str | None = None


def apply(step_dir: str, edits: list[tuple], outside: str) -> Applied:
    """Apply ``edits`` in order to the step at ``step_dir``; ``outside`` is a scratch directory
    beside the checkpoint folder (targets of links out)."""
    applied = Applied()
    applied.step_dir = step_dir
    reseal = False
    for edit in edits:
        kind = edit[0]
        if kind == "step_name":
            target = os.path.join(os.path.dirname(step_dir), edit[1])
            if not os.path.lexists(target):
                os.rename(step_dir, target)
                step_dir = applied.step_dir = target
            continue
        if kind == "manifest":
            applied.manifest_touched = True
            manifest = os.path.join(step_dir, "manifest.json")
            if edit[1] == "drop":
                if os.path.lexists(manifest) and not os.path.isdir(manifest):
                    os.remove(manifest)
            else:
                reseal = True
            continue
        if kind == "add":
            _, name, _, data = edit
            path = os.path.join(step_dir, name)
            if not os.path.lexists(path):
                _write(path, data)
            applied.manifest_touched |= name.lower() == "manifest.json"
            continue
        files = files_of(step_dir)
        if kind.startswith("json"):
            files = [f for f in files if _is_json(f)]
        elif kind.startswith("op_"):
            files = [f for f in files if _is_pickle(f)]
        rel = _pick(files, edit[1])
        if rel is None:
            continue
        path = os.path.join(step_dir, rel)
        applied.manifest_touched |= rel == "manifest.json"
        if kind in ("kind", "rename", "remove", "chmod"):
            _file_edit(path, edit, step_dir, outside)
        elif not _regular(path):
            continue
        elif kind.startswith("json"):
            _json_edit(path, edit)
        elif kind.startswith("op_"):
            _pickle_edit(path, edit)
        else:
            _write(path, bytes_edit(_read(path), edit))
    if reseal:
        _reseal(step_dir)
    return applied


def bytes_edit(data: bytes, edit: tuple) -> bytes:
    kind = edit[0]
    n = len(data)
    if kind == "flip":
        if not n:
            return data
        i = edit[2] % n
        return data[:i] + bytes([data[i] ^ edit[3]]) + data[i + 1 :]
    if kind == "overwrite":
        i = edit[2] % (n + 1)
        return data[:i] + edit[3] + data[i + len(edit[3]) :]
    if kind == "truncate":
        return data[: edit[2] % (n + 1)] if n else data
    if kind == "append":
        return data + edit[2]
    if kind == "insert":
        i = edit[2] % (n + 1)
        return data[:i] + edit[3] + data[i:]
    if kind == "cut":
        i = edit[2] % (n + 1)
        return data[:i] + data[i + edit[3] :]
    raise ValueError(kind)


def _file_edit(path: str, edit: tuple, step_dir: str, outside: str) -> None:
    kind = edit[0]
    if kind == "remove":
        _remove(path)
    elif kind == "chmod":
        if not os.path.islink(path):
            os.chmod(path, edit[2])
    elif kind == "rename":
        name = edit[2] if isinstance(edit[2], str) else _pick(files_of(step_dir), edit[2])
        target = os.path.join(os.path.dirname(path), os.path.basename(name))
        if target != path:
            if os.path.isdir(target) and not os.path.islink(target):
                shutil.rmtree(target)
            os.replace(path, target)
    elif kind == "kind":
        replace_with_kind(path, edit[2], step_dir, outside)


def replace_with_kind(path: str, kind: str, step_dir: str, outside: str) -> None:
    """Put something other than the original regular file at ``path``."""
    original = _read(path) if _regular(path) else b""
    _remove(path)
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        os.mkdir(path)
        _write(os.path.join(path, "inner"), original[:64])
    elif kind == "symlink_inside":
        others = [f for f in files_of(step_dir) if os.path.join(step_dir, f) != path]
        os.symlink(os.path.join(step_dir, others[0]) if others else "/dev/null", path)
    elif kind == "symlink_outside":
        os.makedirs(outside, exist_ok=True)
        copy = os.path.join(outside, os.path.basename(path) + ".copy")
        _write(copy, original)
        os.symlink(copy, path)
    elif kind == "dangling_symlink":
        os.symlink(os.path.join(outside, "nothing-here"), path)
    elif kind == "dev_zero":
        os.symlink("/dev/zero", path)
    elif kind == "empty":
        _write(path, b"")
    elif kind == "sparse_huge":
        _write(path, original)
        os.truncate(path, max(len(original), 1) + (3 << 30))
    else:
        raise ValueError(kind)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


# -- JSON (a .json file, or a safetensors header)
def _load_json(path: str) -> tuple[Any, bytes, bytes] | None:
    """(document, bytes before it, bytes after it), or None when the file holds no JSON."""
    raw = _read(path)
    if path.endswith(".safetensors"):
        if len(raw) < 8:
            return None
        (n,) = struct.unpack("<Q", raw[:8])
        if n > len(raw) - 8:
            return None
        head, body, tail = b"", raw[8 : 8 + n], raw[8 + n :]
    else:
        head, body, tail = b"", raw, b""
    try:
        return json.loads(body), head, tail
    except (ValueError, RecursionError):
        return None


def _save_json(path: str, text: str, tail: bytes) -> None:
    raw = text.encode("utf-8", "surrogatepass")
    if path.endswith(".safetensors"):
        raw = struct.pack("<Q", len(raw)) + raw
    _write(path, raw + tail)


def _walk(doc: Any, path: list[int]) -> tuple[Any, Any] | None:
    """(container, key) reached by following ``path`` (indices modulo each level's size)."""
    parent, key = None, None
    node = doc
    for step in path:
        if isinstance(node, dict) and node:
            keys = sorted(node, key=str)
            parent, key = node, keys[step % len(keys)]
        elif isinstance(node, list) and node:
            parent, key = node, step % len(node)
        else:
            break
        node = parent[key]
    return (parent, key) if parent is not None else None


def _json_edit(path: str, edit: tuple) -> None:
    loaded = _load_json(path)
    if loaded is None:
        return
    doc, _, tail = loaded
    kind = edit[0]
    where = _walk(doc, edit[2])
    marker = "\u2063deep\u2063"
    if kind == "json_set":
        if where is None:
            doc = edit[3]
        else:
            where[0][where[1]] = edit[3]
        text = json.dumps(doc)
    elif kind == "json_delete":
        if where is None:
            return
        del where[0][where[1]]
        text = json.dumps(doc)
    elif kind == "json_deep":
        if where is None:
            doc = marker
        else:
            where[0][where[1]] = marker
        text = json.dumps(doc).replace(json.dumps(marker), "[" * DEEP + "]" * DEEP)
    elif kind == "json_duplicate_key":
        if where is None or not isinstance(where[0], dict):
            return
        parent, key = where
        parent[marker] = parent[key]
        text = json.dumps(doc).replace(json.dumps(marker), json.dumps(key), 1)
    else:
        raise ValueError(kind)
    _save_json(path, text, tail)


# -- pickle opcodes
def _ops(raw: bytes) -> list[tuple[Any, Any, int, int]] | None:
    """(opcode, arg, start, end) of every op, or None when the file is not a readable pickle."""
    try:
        ops = list(pickletools.genops(raw))
    except Exception:
        return None
    out = []
    for i, (op, arg, pos) in enumerate(ops):
        end = ops[i + 1][2] if i + 1 < len(ops) else len(raw)
        out.append((op, arg, pos, end))
    return out


def _encode_int(value: int) -> bytes:
    if 0 <= value < 256:
        return b"K" + bytes([value])
    if 0 <= value < 65536:
        return b"M" + struct.pack("<H", value)
    if -(2**31) <= value < 2**31:
        return b"J" + struct.pack("<i", value)
    data = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
    return (b"\x8a" + bytes([len(data)]) if len(data) < 256 else b"\x8b" + struct.pack("<i", len(data))) + data


def _encode_str(value: str) -> bytes:
    data = value.encode("utf-8", "surrogatepass")
    return (b"\x8c" + bytes([len(data)]) if len(data) < 256 else b"X" + struct.pack("<I", len(data))) + data


def _pickle_edit(path: str, edit: tuple) -> None:
    raw = _read(path)
    ops = _ops(raw)
    if not ops:
        return
    kind = edit[0]
    if kind == "op_int":
        ops = [o for o in ops if o[0].name in ("BININT", "BININT1", "BININT2", "LONG1", "LONG4", "INT", "LONG")] or ops
    elif kind == "op_str":
        ops = [o for o in ops if o[0].name in ("BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8", "UNICODE")] or ops
    op, arg, start, end = ops[edit[2] % len(ops)]
    if kind == "op_delete":
        raw = raw[:start] + raw[end:]
    elif kind == "op_duplicate":
        raw = raw[:end] + raw[start:end] + raw[end:]
    elif kind == "op_swap":
        following = [o for o in ops if o[2] == end]
        if following:
            _, _, s2, e2 = following[0]
            raw = raw[:start] + raw[s2:e2] + raw[start:end] + raw[e2:]
    elif kind == "op_int":
        raw = raw[:start] + _encode_int(edit[3]) + raw[end:]
    elif kind == "op_str":
        raw = raw[:start] + _encode_str(edit[3]) + raw[end:]
    elif kind == "op_insert":
        raw = raw[:start] + edit[3] + raw[start:]
    else:
        raise ValueError(kind)
    _write(path, raw)


def _reseal(step_dir: str) -> None:
    """Recompute the manifest over what is there now (an attacker's, or a careless tool's, edit)."""
    from checkpointing.commit import MANIFEST, Manifest

    path = os.path.join(step_dir, MANIFEST)
    try:
        files = {}
        for rel in files_of(step_dir):
            full = os.path.join(step_dir, rel)
            if rel == MANIFEST or not _regular(full):
                continue
            data = _read(full)
            files[rel] = {"size": len(data), "crc32": zlib.crc32(data)}
        backend = "hf" if any(f.endswith(".safetensors") for f in files) else "dcp"
        text = Manifest(step=1, backend=backend, files=files).to_json()
    except OSError:
        return
    if os.path.isdir(path) and not os.path.islink(path):
        return
    if os.path.lexists(path):
        os.remove(path)
    _write(path, text.encode())


def restore(pristine: str, step_parent: str) -> str:
    """A fresh copy of the pristine step as ``step_parent/step-1`` (whatever was there goes)."""
    if os.path.isdir(step_parent):
        for name in os.listdir(step_parent):
            _remove(os.path.join(step_parent, name))
    os.makedirs(step_parent, exist_ok=True)
    target = os.path.join(step_parent, os.path.basename(pristine))
    shutil.copytree(pristine, target, symlinks=True)
    return target


# --------------------------------------------------------------------------------- shm segments
SLOT_FIELDS = [(0, "8s"), (8, "Q"), (16, "q"), (24, "Q"), (32, "I"), (36, "I"), (40, "Q"), (48, "Q")]
"""(offset, struct format) of a shm slot header's fields: magic, seq, step, order, manifest
length and CRC, data offset and length (see backends/memory/shm.py)."""

shm_mutations = st.lists(
    st.one_of(
        byte_mutations,
        st.tuples(st.just("slot_field"), positions, st.integers(0, len(SLOT_FIELDS) - 1), st.sampled_from(HUGE_INTS) | st.integers()),
        st.tuples(st.just("kind"), positions, st.sampled_from(["fifo", "directory", "symlink_outside", "dangling_symlink", "empty", "sparse_huge"])),
        st.tuples(st.just("chmod"), positions, st.sampled_from([0o644, 0o666, 0o400])),
        st.tuples(st.just("remove"), positions),
    ),
    min_size=1,
    max_size=3,
)


def apply_segments(paths: list[str], edits: list[tuple], outside: str) -> None:
    """Apply ``edits`` to a channel's segment files (control first, then slots), as a hostile
    process of the same user could."""
    for edit in edits:
        kind = edit[0]
        path = _pick(paths, edit[1])
        if path is None or (kind not in ("kind", "remove") and not _regular(path)):
            continue
        if kind == "kind":
            replace_with_kind(path, edit[2], os.path.dirname(path), outside)
        elif kind == "remove":
            _remove(path)
        elif kind == "chmod":
            os.chmod(path, edit[2])
        elif kind == "slot_field":
            offset, fmt = SLOT_FIELDS[edit[2]]
            size = struct.calcsize(fmt)
            data = _read(path)
            if len(data) < offset + size:
                continue
            value = edit[3]
            packed = (value % (1 << (8 * size))).to_bytes(size, "little") if fmt != "8s" else (str(value).encode() * 8)[:8]
            with open(path, "r+b") as f:
                f.seek(offset)
                f.write(packed)
        else:
            data = _read(path)
            edited = bytes_edit(data, edit)
            if len(edited) == len(data):  # in place: a segment is mapped by its publisher
                with open(path, "r+b") as f:
                    f.write(edited)
            else:
                _write(path, edited)
