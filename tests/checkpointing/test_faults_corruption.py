"""Damaged checkpoints, for every persistent backend and every file its steps hold: a load is
always a typed error naming the damaged file, never wrong weights; the receiver is untouched.

The files are found on disk, not listed by hand, so a backend that adds a file kind (a new
sidecar, a new index) is covered without editing this test.
"""

from __future__ import annotations

import json
import os
import uuid

import pytest

from checkpointing import CheckpointError, CorruptCheckpointError
from checkpointing.commit import MANIFEST
from tests.checkpointing.faults.bench import STEP, Bench, names_file, save_pristine
from tests.checkpointing.faults.damage import DAMAGES, SIZE_CHANGING, files_of
from tests.checkpointing.faults.known_bugs import mark_known_bugs
from tests.checkpointing.faults.matrix import CASES, require_persistent
from tests.checkpointing.faults.versions import BASE_SEED, Side, base_weights


@pytest.fixture(autouse=True)
def _known_bugs(request):
    mark_known_bugs(request)


@pytest.fixture(scope="module")
def base():
    return base_weights()


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, base):
    """One committed step per backend (model + train state), saved once, copied per check."""
    made: dict[str, str] = {}

    def get(case: str) -> str:
        if case not in made:
            made[case] = save_pristine(case, str(tmp_path_factory.mktemp(f"pristine-{case}")), base)
        return made[case]

    return get


@pytest.mark.parametrize("damage", sorted(DAMAGES))
@pytest.mark.parametrize("case", CASES)
def test_damaged_file_is_a_typed_error_naming_it(case, damage, pristine, base, tmp_path):
    """verify = "checksum" (the default): every kind of damage to every file of a step."""
    require_persistent(case, "there are no files to damage")
    bench = Bench(case, pristine(case), tmp_path)
    problems = []
    for rel in bench.files():
        if damage.startswith("flip") and os.path.getsize(os.path.join(bench.pristine, rel)) == 0:
            continue
        error, loaded = bench.damaged_load(rel, DAMAGES[damage])
        if rel == MANIFEST and error is None:
            # A step without a readable manifest may be read as another tool's step (TorchTitan's
            # own have none): allowed only if what comes back is exactly what was saved.
            if loaded:
                bench.reader.assert_loaded_version(base, STEP)
            continue
        if not isinstance(error, CorruptCheckpointError):
            problems.append(f"{rel}: {damage} gave {error!r} (loaded={loaded}), expected CorruptCheckpointError")
        elif rel != MANIFEST and not names_file(error, rel):
            problems.append(f"{rel}: {damage} gave an error that does not name the file: {error}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("case", CASES)
def test_size_changes_are_caught_by_verify_size(case, pristine, base, tmp_path):
    """verify = "size" skips the CRCs but still refuses a cut, lost, emptied or padded file,
    naming it, before any tensor is read."""
    require_persistent(case, "there are no files to damage")
    bench = Bench(case, pristine(case), tmp_path, verify="size")
    problems = []
    for rel in bench.files():
        for damage in SIZE_CHANGING:
            error, loaded = bench.damaged_load(rel, DAMAGES[damage])
            if rel == MANIFEST and error is None:
                if loaded:  # a lost manifest: read as another tool's step, and whole
                    bench.reader.assert_loaded_version(base, STEP)
                continue
            if not isinstance(error, CorruptCheckpointError) or (rel != MANIFEST and not names_file(error, rel)):
                problems.append(f"{rel}: {damage} with verify=size gave {error!r} (loaded={loaded})")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("damage", sorted(DAMAGES))
@pytest.mark.parametrize("case", CASES)
def test_parsers_raise_only_typed_errors_with_verify_off(case, damage, pristine, tmp_path):
    """verify = "off" trusts the bytes, so a flipped data byte may load as a different weight;
    but every file's parser must still turn what it cannot read into a CheckpointError (never a
    pickle/JSON/DCP exception, never a BaseException that slips past ``except Exception``), with
    the receiver untouched."""
    require_persistent(case, "there are no files to damage")
    bench = Bench(case, pristine(case), tmp_path, verify="off")
    problems = []
    for rel in bench.files():
        if damage.startswith("flip") and os.path.getsize(os.path.join(bench.pristine, rel)) == 0:
            continue
        try:
            error, loaded = bench.damaged_load(rel, DAMAGES[damage])
        except BaseException as escaped:  # not even an Exception
            problems.append(f"{rel}: {damage} let {type(escaped).__module__}.{type(escaped).__name__} escape: {str(escaped)[:300]}")
            continue
        if error is None:  # loaded (possibly a flipped weight: what verify=off gives up) or nothing
            continue
        if not isinstance(error, CheckpointError):
            problems.append(f"{rel}: {damage} with verify=off gave {error!r}, expected a CheckpointError")
    assert not problems, "\n".join(problems)


def _structure_bytes(path: str) -> int:
    """How many leading bytes of a file are structure (metadata a parser interprets) rather than
    raw tensor bytes: all of a JSON or DCP ``.metadata`` file, a safetensors file's header, none
    of a ``.distcp`` data file."""
    name = os.path.basename(path)
    if name.endswith(".safetensors"):
        with open(path, "rb") as f:
            return 8 + int.from_bytes(f.read(8), "little")
    if name.endswith(".json") or name == ".metadata":
        return os.path.getsize(path)
    return 0


FLIPS_PER_FILE = 32
UNVERIFIED = {
    "verify_off": "verify = off: the manifest is there but not consulted",
    "no_manifest": "verify = checksum, but manifest.json is gone: read like a TorchTitan-written step",
}


@pytest.mark.parametrize("unverified", sorted(UNVERIFIED))
@pytest.mark.parametrize("case", CASES)
def test_bit_flips_in_metadata_are_typed_errors_when_unverified(case, unverified, pristine, tmp_path):
    """Without checksums (verify = off, or a step with no manifest, as TorchTitan writes them)
    the metadata parsers are the last line: single-bit flips spread over every structural file
    (DCP .metadata, index/config JSON, safetensors headers) load whole or fail as a
    CheckpointError; never an AttributeError, KeyError, pickle error or BaseException."""
    require_persistent(case, "there are no files to damage")
    verify = "off" if unverified == "verify_off" else "checksum"
    bench = Bench(case, pristine(case), tmp_path, verify=verify)
    problems = []
    for rel in bench.files():
        if unverified == "no_manifest" and rel == MANIFEST:
            continue
        n = _structure_bytes(os.path.join(bench.pristine, rel))
        for k, pos in enumerate(sorted({i * n // FLIPS_PER_FILE for i in range(FLIPS_PER_FILE)}) if n else []):
            mask = (0x01, 0x02, 0x20, 0x80)[k % 4]

            def flip_at(path, pos=pos, mask=mask):
                if unverified == "no_manifest":
                    os.remove(os.path.join(bench.step_dir, MANIFEST))
                with open(path, "r+b") as f:
                    f.seek(pos)
                    byte = f.read(1)[0]
                    f.seek(pos)
                    f.write(bytes([byte ^ mask]))

            try:
                error, _ = bench.damaged_load(rel, flip_at)
            except BaseException as escaped:
                error = escaped
            if error is not None and not isinstance(error, CheckpointError):
                problems.append(f"{rel} byte {pos} ^ {mask:#04x}: {type(error).__name__}: {str(error)[:160]}")
    assert not problems, f"{UNVERIFIED[unverified]}; {len(problems)} untyped errors:\n" + "\n".join(problems[:12])


@pytest.mark.parametrize("case", CASES)
def test_manifest_checksum_mismatch_names_each_file(case, pristine, tmp_path):
    """The manifest is intact JSON but disagrees with one file (bytes changed after commit)."""
    require_persistent(case, "there is no manifest")
    bench = Bench(case, pristine(case), tmp_path)
    for rel in bench.files():
        if rel == MANIFEST:
            continue

        def wrong_crc(path, rel=rel):
            with open(path) as f:
                manifest = json.load(f)
            entry = manifest["files"][rel]
            entry["xxh3"] = f"{int(entry['xxh3'], 16) ^ 1:016x}"
            with open(path, "w") as f:
                json.dump(manifest, f)

        error, _ = bench.damaged_load(MANIFEST, wrong_crc)
        assert isinstance(error, CorruptCheckpointError) and names_file(error, rel), f"{rel}: {error!r}"


@pytest.mark.parametrize("case", CASES)
def test_damaged_newest_step_is_an_error_not_a_silent_fallback(case, base, tmp_path):
    """Loading "the newest" when the newest is damaged raises; it never quietly resumes from an
    older step (that would silently lose training). The older step still loads by name."""
    require_persistent(case, "there are no files to damage")
    channel = f"c{uuid.uuid4().hex[:12]}"
    writer = Side(case, str(tmp_path), channel, seed=BASE_SEED)
    writer.save_version(base, 1)
    writer.save_version(base, 2)
    writer.close()
    step2 = tmp_path / "checkpoint" / "step-2"
    biggest = max(files_of(str(step2)), key=lambda rel: os.path.getsize(step2 / rel))
    DAMAGES["flip_middle_byte"](str(step2 / biggest))
    reader = Side(case, str(tmp_path), channel, load_only=True)
    with pytest.raises(CorruptCheckpointError) as info:
        reader.ckpt.load()
    assert names_file(info.value, biggest)
    assert reader.ckpt.load(1) is True
    reader.assert_loaded_version(base, 1)
    reader.close()
