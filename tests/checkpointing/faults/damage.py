"""Damage done to files on disk, the way disks, networks and people do it: a flipped bit, a cut
file, a lost file, garbage of the right size, a stray byte appended.

``reseal`` recomputes a step's manifest after a deliberate edit, which is what an attacker (or a
careless tool) would do: hostile-input tests must be caught by the parsers, not by checksums.
"""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Callable

from checkpointing.commit import MANIFEST, Manifest


def _rewrite(path: str, edit: Callable[[bytearray], bytes | bytearray]) -> None:
    with open(path, "rb") as f:
        data = bytearray(f.read())
    data = edit(data)
    with open(path, "wb") as f:
        f.write(data)


def flip(where: str, mask: int = 0xFF) -> Callable[[str], None]:
    def damage(path: str) -> None:
        def edit(data: bytearray) -> bytearray:
            if not data:
                raise ValueError(f"{path} is empty: nothing to flip")
            i = {"first": 0, "middle": len(data) // 2, "last": len(data) - 1}[where]
            data[i] ^= mask
            return data

        _rewrite(path, edit)

    return damage


def truncate(keep: Callable[[int], int]) -> Callable[[str], None]:
    def damage(path: str) -> None:
        size = os.path.getsize(path)
        with open(path, "r+b") as f:
            f.truncate(keep(size))

    return damage


def delete(path: str) -> None:
    os.remove(path)


def garbage(path: str) -> None:
    rng = random.Random(path)
    _rewrite(path, lambda data: bytes(rng.getrandbits(8) for _ in range(len(data))))


def append_byte(path: str) -> None:
    _rewrite(path, lambda data: data + b"\0")


DAMAGES: dict[str, Callable[[str], None]] = {
    "flip_first_byte": flip("first"),
    "flip_middle_byte": flip("middle"),
    "flip_last_byte": flip("last"),
    "flip_one_bit_middle": flip("middle", 0x01),
    "truncate_last_byte": truncate(lambda n: n - 1),
    "truncate_half": truncate(lambda n: n // 2),
    "empty": truncate(lambda n: 0),
    "delete": delete,
    "garbage_same_size": garbage,
    "append_byte": append_byte,
}
SIZE_CHANGING = ("truncate_last_byte", "truncate_half", "empty", "delete", "append_byte")
"""Damage a size check (verify = "size") or a parser catches without checksums."""


def files_of(step_dir: str) -> list[str]:
    """Every file of a step, relative to it."""
    out = []
    for root, _, names in os.walk(step_dir):
        out += [os.path.relpath(os.path.join(root, n), step_dir) for n in names]
    return sorted(out)


def restore(pristine: str, step_dir: str) -> None:
    shutil.rmtree(step_dir, ignore_errors=True)
    shutil.copytree(pristine, step_dir, symlinks=True)


def reseal(step_dir: str) -> None:
    """Rebuild ``manifest.json`` so sizes and checksums match the (edited) files again."""
    old = Manifest.read(step_dir)
    fresh = Manifest.build(step_dir, old.step, old.backend)
    with open(os.path.join(step_dir, MANIFEST), "w") as f:
        f.write(fresh.to_json())
