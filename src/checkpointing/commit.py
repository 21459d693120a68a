"""The commit protocol every on-disk backend shares.

A step is written into a hidden staging directory, every file is fsynced, a manifest with each
file's size and digest (:mod:`checkpointing.checksum`: xxh3, CRC32 in older steps) is written last, and one ``rename`` makes ``step-N`` appear. A crash at
any instant therefore leaves either no ``step-N`` or a complete one; staging leftovers are never
listed and are removed by the next writer. The manifest lets a load reject flipped bytes,
truncation and missing files with an error naming the file, instead of returning wrong weights.

Staging names avoid the substring ``step-`` so TorchTitan's own ``step-(\\d+)`` scan never picks
a half-written directory either.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from . import distributed
from .checksum import FileDigest, crc32_file, digest_file  # noqa: F401  (also re-exported: commit.crc32_file)
from .errors import CheckpointError, ConfigError, CorruptCheckpointError, StepNotFoundError, UnsafeCheckpointError
from .safepath import check_no_escaping_links, relative_parts, safe_join
from .untrusted import describe, exists_here, parse_json, read_regular, regular_size

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "titan-checkpointing/1"
STEP_RE = re.compile(r"\Astep-(0|[1-9][0-9]{0,18})\Z")
"""Canonical step names only (see :func:`parse_step_name`); ``[0-9]``, not ``\\d``, which matches
every Unicode digit, and ``\\Z``, not ``$``, which matches before a trailing newline."""
STAGING_PREFIX = ".inflight-"
TRASH_PREFIX = ".trash-"


def fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _files_under(root: str) -> list[str]:
    out = []
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            out.append(os.path.relpath(os.path.join(dirpath, name), root))
    return sorted(out)


MAX_MANIFEST_BYTES = 64 << 20
"""A manifest takes ~80 bytes per file; a real step holds about one file per rank. 64 MiB is far
beyond that and small enough to refuse a sparse or padded file without reading it."""
MAX_MANIFEST_FILES = 1 << 19
MAX_STEP = (1 << 63) - 1
"""Steps are int64 everywhere they are stored (shm slot headers, TorchTitan's train state)."""


def parse_step_name(name: str) -> int | None:
    """The step of a canonical ``step-N`` directory name, else None.

    Canonical: ASCII digits, no leading zero (``step-0`` aside), no sign, nothing after.
    ``step-007``, ``step-`` + an Arabic-Indic seven, or ``step-5`` + a newline are not steps:
    were they read as 7 or 5, ``path(7)`` would name another directory than the one listed, and
    ``load()`` would fail on it instead of resuming from the real newest step."""
    m = STEP_RE.match(name)
    step = int(m.group(1)) if m else None
    return step if step is not None and step <= MAX_STEP else None


def _is_count(value, upper: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= upper


@dataclass
class Manifest:
    step: int
    backend: str
    files: dict[str, dict]  # relpath -> {"size": int, "xxh3": "16 hex digits"} (older steps: "crc32": int)

    def to_json(self) -> str:
        return json.dumps(
            {"format": MANIFEST_FORMAT, "step": self.step, "backend": self.backend, "files": self.files},
            indent=1,
            sort_keys=True,
        )

    @classmethod
    def read(cls, step_dir: str) -> Manifest:
        """Parse and type-check a manifest. Every field is untrusted: a wrong type, a huge
        number, an empty or oversized file table is a CorruptCheckpointError naming the file;
        paths are checked to be plain relative paths (their targets are checked by
        :meth:`verify`, against the directory)."""
        path = os.path.join(step_dir, MANIFEST)
        try:
            raw = read_regular(path, MAX_MANIFEST_BYTES, "manifest")
        except FileNotFoundError:
            raise CorruptCheckpointError(f"manifest missing: {path}", path) from None
        doc = parse_json(raw, path, "manifest")

        def bad(why: str) -> CorruptCheckpointError:
            return CorruptCheckpointError(f"manifest {path} {why}", path)

        if not isinstance(doc, dict) or doc.get("format") != MANIFEST_FORMAT:
            raise bad(f"has an unknown format; expected an object with \"format\": {MANIFEST_FORMAT!r}")
        files, step, backend = doc.get("files"), doc.get("step", -1), doc.get("backend", "")
        if not isinstance(files, dict):
            raise bad("has no \"files\" table")
        if not files:
            raise bad("lists no files; a committed step always holds its data files")
        if len(files) > MAX_MANIFEST_FILES:
            raise bad(f"lists {len(files)} files; at most {MAX_MANIFEST_FILES} are allowed")
        if not (step == -1 or _is_count(step, MAX_STEP)):
            raise bad(f"has step {describe(step)}; allowed: an integer from 0 to {MAX_STEP}")
        if not isinstance(backend, str) or len(backend) > 128:
            raise bad(f"has backend {describe(backend)}; allowed: a backend name")
        checked: dict[str, dict] = {}
        for rel, entry in files.items():
            relative_parts(step_dir, rel)  # never trust a path from disk
            digest = FileDigest.from_entry(entry) if isinstance(entry, dict) else None
            if digest is None or not _is_count(entry.get("size"), MAX_STEP):
                raise bad(
                    f"has a malformed entry for {describe(rel)}; expected "
                    f"{{\"size\": int >= 0, \"xxh3\": 16 hex digits}} (older steps: \"crc32\": uint32)"
                )
            checked[rel] = {"size": entry["size"], **digest.entry()}
        return cls(step=step, backend=backend, files=checked)

    @classmethod
    def build(cls, step_dir: str, step: int, backend: str, known: dict[str, tuple[int, FileDigest]] | None = None) -> Manifest:
        """``known``: (size, digest) a writer computed from the bytes it wrote, used while the file
        still has that size, so the commit does not read the data a second time."""
        files = {}
        for rel in _files_under(step_dir):
            if rel == MANIFEST:
                continue
            path = os.path.join(step_dir, rel)
            hint = (known or {}).get(rel)
            if hint is not None and os.path.getsize(path) == hint[0]:
                size, digest = hint
            else:
                size, digest = digest_file(path)
            files[rel] = {"size": size, **digest.entry()}
        return cls(step=step, backend=backend, files=files)

    def check_listing(self, step_dir: str) -> None:
        """The manifest and the directory agree both ways: every listed file is there, and every
        file there is listed. An unlisted file would otherwise be read unverified (a ``.distcp``
        the metadata points to, an extra shard) and a missing one found only mid-load."""
        on_disk = set(_files_under(step_dir)) - {MANIFEST}
        listed = set(self.files)
        missing = sorted(listed - on_disk)
        if missing:
            path = os.path.join(step_dir, missing[0])
            more = f" (and {len(missing) - 1} more listed files)" if len(missing) > 1 else ""
            raise CorruptCheckpointError(f"checkpoint file missing: {path}{more}", path)
        extra = sorted(on_disk - listed)
        if extra:
            path = os.path.join(step_dir, extra[0])
            more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
            raise CorruptCheckpointError(
                f"{path} is not in the step's manifest{more}: files added after the commit are never loaded unverified",
                path,
            )

    def verify(self, step_dir: str, mode: str = "checksum") -> None:
        """Raise CorruptCheckpointError naming the first missing, extra, truncated or altered
        file (UnsafeCheckpointError for one that is not a regular file, or links outside)."""
        if mode == "off":
            return
        check_no_escaping_links(step_dir)
        self.check_listing(step_dir)
        for rel, entry in sorted(self.files.items()):
            path = safe_join(step_dir, rel)
            try:
                size = regular_size(path)
            except FileNotFoundError:
                raise CorruptCheckpointError(f"checkpoint file missing: {path}", path) from None
            if size != entry["size"]:
                raise CorruptCheckpointError(
                    f"checkpoint file {path} has {size} bytes, the manifest recorded {entry['size']} (truncated or altered)",
                    path,
                )
            if mode == "checksum":
                want = FileDigest.from_entry(entry)
                assert want is not None  # read() checked every entry
                _, got = digest_file(path, want.algorithm)
                if got != want:
                    raise CorruptCheckpointError(f"checkpoint file {path} fails its checksum ({got}, manifest {want})", path)


def manifest_backend(step_dir: str) -> str | None:
    """The backend a step's manifest says wrote it; None without a readable manifest that names
    one. Only the name is read (a small, size-capped regular file): no checksum is checked."""
    try:
        doc = parse_json(read_regular(os.path.join(step_dir, MANIFEST), MAX_MANIFEST_BYTES, "manifest"), step_dir, "manifest")
    except (OSError, CheckpointError):
        return None
    backend = doc.get("backend") if isinstance(doc, dict) else None
    return backend if isinstance(backend, str) and backend else None


class StepDirectory:
    """``{folder}/step-N`` directories, committed atomically, listed and purged safely.

    ``foreign_marker`` lets a backend accept steps written by another tool without our manifest
    (TorchTitan's ``.metadata``): they are listed and loaded, but cannot be checksum-verified.
    In a distributed job every rank calls :meth:`stage`; rank 0 does the filesystem commit.
    """

    def __init__(self, folder: str, backend: str, foreign_marker: str | None = None, process_group=None):
        self.folder = folder
        self.backend = backend
        self.foreign_marker = foreign_marker
        self.process_group = process_group
        self._known_checksums: dict[str, dict[str, tuple[int, FileDigest]]] = {}

    def record_checksum(self, staging: str, relpath: str, size: int, digest: FileDigest) -> None:
        """A writer that computed a staged file's digest while writing it hands it over (see
        :meth:`Manifest.build`); only the committing rank's records are used."""
        self._known_checksums.setdefault(staging, {})[relpath] = (size, digest)

    # --- distributed helpers -------------------------------------------------------------
    def _rank(self) -> int:
        return distributed.rank(self.process_group)

    def _barrier(self) -> None:
        distributed.barrier(self.process_group)

    # --- naming --------------------------------------------------------------------------
    def path(self, step: int) -> str:
        return os.path.join(self.folder, f"step-{step}")

    def staging_path(self, step: int) -> str:
        return os.path.join(self.folder, f"{STAGING_PREFIX}{step}")

    def is_committed(self, step_dir: str) -> bool:
        """A manifest (or the foreign marker) is *there*: whatever its kind, so that a FIFO or a
        directory named ``manifest.json`` makes the step fail loudly when read instead of passing
        for a foreign step that skips verification."""
        if os.path.islink(step_dir) or not os.path.isdir(step_dir):
            return False
        if exists_here(os.path.join(step_dir, MANIFEST)):
            return True
        return bool(self.foreign_marker and exists_here(os.path.join(step_dir, self.foreign_marker)))

    def steps(self) -> list[int]:
        """Committed steps of *this* backend's format. A step whose manifest names another
        backend and which lacks this format's marker file (the ``hf`` directory
        ``last_save_in_hf`` writes beside ``dcp`` steps) is another format's: it is neither
        resumed from nor purged here. A manifest that cannot be read is listed, so that loading
        that step fails loudly instead of quietly resuming from an older one."""
        try:
            names = os.listdir(self.folder)
        except FileNotFoundError:
            return []
        found = []
        for name in names:
            step = parse_step_name(name)
            path = os.path.join(self.folder, name)
            if step is not None and self.is_committed(path) and not self._another_format(path):
                found.append(step)
        return sorted(found)

    def _another_format(self, step_dir: str) -> bool:
        if self.foreign_marker and exists_here(os.path.join(step_dir, self.foreign_marker)):
            return False  # our format, whoever wrote it (TorchTitan, a backend wrapping ours)
        # No manifest (a foreign step) or a damaged one (None): listed, checked on load.
        backend = manifest_backend(step_dir)
        return backend is not None and backend != self.backend

    # --- writing -------------------------------------------------------------------------
    @contextlib.contextmanager
    def stage(self, step: int) -> Iterator[str]:
        """Yield a staging directory; on a clean exit, make it ``step-N`` atomically."""
        staging = self.staging_path(step)
        self._known_checksums.pop(staging, None)
        if self._rank() == 0:
            shutil.rmtree(staging, ignore_errors=True)
            os.makedirs(staging)
        self._barrier()
        try:
            yield staging
        except BaseException:
            if self._rank() == 0:
                shutil.rmtree(staging, ignore_errors=True)
            raise
        self._barrier()
        if self._rank() == 0:
            try:
                self._commit(staging, step)
            except BaseException:
                # e.g. fsync fails with EIO: the step never became visible; do not leave a whole
                # step's worth of bytes behind until the next writer's cleanup_partials().
                shutil.rmtree(staging, ignore_errors=True)
                raise
        self._barrier()

    def _commit(self, staging: str, step: int) -> None:
        seal(staging, step, self.backend, known=self._known_checksums.pop(staging, None))
        final = self.path(step)
        if os.path.lexists(final):  # re-saving a step (e.g. after a resume): move the old one aside
            self._move_to_trash(final)
        os.rename(staging, final)
        fsync_path(self.folder)
        self.remove_trash()

    def _move_to_trash(self, path: str) -> None:
        trash = os.path.join(self.folder, f"{TRASH_PREFIX}{uuid.uuid4().hex}")
        os.rename(path, trash)

    # --- deleting and cleaning -----------------------------------------------------------
    def delete(self, step: int) -> None:
        """Rename first, so a crash mid-delete never leaves a half-deleted ``step-N`` listed."""
        if self._rank() != 0:
            return
        path = self.path(step)
        if not os.path.lexists(path):
            return
        self._move_to_trash(path)
        fsync_path(self.folder)
        self.remove_trash()

    def remove_trash(self) -> None:
        for name in _listdir(self.folder):
            if name.startswith(TRASH_PREFIX):
                shutil.rmtree(os.path.join(self.folder, name), ignore_errors=True)

    def cleanup_partials(self) -> list[str]:
        """Remove staging and trash leftovers of crashed writers. Only writers call this."""
        removed: list[str] = []
        if self._rank() != 0:
            return removed
        for name in _listdir(self.folder):
            if name.startswith((STAGING_PREFIX, TRASH_PREFIX)):
                shutil.rmtree(os.path.join(self.folder, name), ignore_errors=True)
                removed.append(name)
        if removed:
            log.warning("removed %d partial checkpoint leftovers in %s: %s", len(removed), self.folder, removed)
        return removed

    # --- reading -------------------------------------------------------------------------
    def committed_path(self, step: int) -> str:
        path = self.path(step)
        if not self.is_committed(path):
            raise StepNotFoundError(
                f"step {step} is not a committed checkpoint in {self.folder}; committed steps: {self.steps()}"
            )
        return path

    def verify(self, step_dir: str, mode: str = "checksum") -> Manifest | None:
        """Check a step directory against its manifest; None for a foreign (unmanifested) step."""
        if os.path.islink(step_dir):
            raise UnsafeCheckpointError(f"{step_dir} is a symlink; refusing to follow it", step_dir)
        if not exists_here(os.path.join(step_dir, MANIFEST)):
            if self.foreign_marker and exists_here(os.path.join(step_dir, self.foreign_marker)):
                log.info("%s has no %s (written by another tool): sizes and checksums not verified", step_dir, MANIFEST)
                check_no_escaping_links(step_dir)
                return None
            raise CorruptCheckpointError(f"manifest missing: {os.path.join(step_dir, MANIFEST)}", step_dir)
        manifest = Manifest.read(step_dir)
        manifest.verify(step_dir, mode)
        return manifest


def _listdir(folder: str) -> list[str]:
    try:
        return os.listdir(folder)
    except FileNotFoundError:
        return []




class StoredSteps:
    """The part of the Backend protocol every on-disk backend shares: listing, deleting and
    cleaning the ``step-N`` directories of its :class:`StepDirectory` (``self.store``). A new
    file backend inherits it and writes only ``write`` and ``read``."""

    store: StepDirectory

    @property
    def location(self) -> str:
        return self.store.folder

    def steps(self) -> list[int]:
        return self.store.steps()

    def delete(self, step: int) -> None:
        self.store.delete(step)

    def cleanup_partials(self) -> list[str]:
        return self.store.cleanup_partials()

    def close(self) -> None:
        pass


def seal(staging: str, step: int, backend: str, known: dict | None = None) -> Manifest:
    """Make a staged directory durable and self-describing, ready for its one atomic rename:
    every file fsynced, then the manifest (sizes, CRC32s) written and fsynced last, then the
    directories. A crash before the rename leaves only a staging directory nobody lists."""
    # Flushing to disk waits on the device, checksumming on the CPU: do both at once.
    paths = [os.path.join(staging, rel) for rel in _files_under(staging)]

    def fsync_all() -> None:
        for path in paths:
            fsync_path(path)

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="commit-fsync") as pool:
        synced = pool.submit(fsync_all)
        try:
            manifest = Manifest.build(staging, step, backend, known=known)
        finally:
            synced.result()  # an fsync error (EIO) wins over a checksum one: it is the cause
    tmp = os.path.join(staging, MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        f.write(manifest.to_json())
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, os.path.join(staging, MANIFEST))
    for dirpath, _, _ in os.walk(staging):
        fsync_path(dirpath)
    return manifest


@contextlib.contextmanager
def staged_directory(dst: str) -> Iterator[str]:
    """A hidden sibling of ``dst`` to write into; it is removed if the block fails. The caller
    makes it ``dst`` with :func:`commit_directory` (``ckpt convert``'s output, an export)."""
    if os.path.lexists(dst):
        raise ConfigError(f"destination {dst} already exists; choose a new directory")
    parent = os.path.dirname(os.path.abspath(dst))
    if not os.path.isdir(parent):
        raise ConfigError(f"the parent directory of {dst} does not exist")
    staging = os.path.join(parent, f"{STAGING_PREFIX}convert-{uuid.uuid4().hex[:12]}")
    os.makedirs(staging)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def commit_directory(staging: str, final: str, step: int, backend: str) -> None:
    """The commit protocol for a directory that is not a ``step-N``: seal, then one rename."""
    seal(staging, step, backend)
    os.rename(staging, final)
    fsync_path(os.path.dirname(os.path.abspath(final)))


def step_of(path: str) -> int:
    """The step a ``step-N`` directory holds (0 for any other name)."""
    step = parse_step_name(os.path.basename(os.path.normpath(path)))
    return step if step is not None else 0
