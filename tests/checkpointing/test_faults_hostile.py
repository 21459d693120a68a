"""Hostile checkpoints, for every persistent backend, found by file kind on disk: whichever
backend stores a DCP ``.metadata``, an index JSON, a manifest or a safetensors shard gets every
attack on it. Each attack must end in a typed error (UnsafeCheckpointError where the checkpoint
tries something a loader must never do), run no code, read nothing outside the step, allocate
nothing huge, and leave the receiver untouched.

Attacks are resealed (the manifest recomputed), as an attacker would: the parsers must catch
them, not the checksums.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil

import pytest

from checkpointing import CorruptCheckpointError, StateMismatchError, UnsafeCheckpointError
from checkpointing.commit import MANIFEST
from tests.checkpointing.faults import crafted
from tests.checkpointing.faults.bench import Bench, names_file, save_pristine
from tests.checkpointing.faults.damage import files_of, reseal
from tests.checkpointing.faults.known_bugs import mark_known_bugs
from tests.checkpointing.faults.matrix import CASES, capabilities, require_persistent
from tests.checkpointing.faults.versions import base_weights

SEALING = ["resealed", "no_manifest"]


@pytest.fixture(autouse=True)
def _known_bugs(request):
    mark_known_bugs(request)


@pytest.fixture(scope="module")
def base():
    return base_weights()


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, base):
    made: dict[str, str] = {}

    def get(case: str) -> str:
        if case not in made:
            made[case] = save_pristine(case, str(tmp_path_factory.mktemp(f"pristine-{case}")), base)
        return made[case]

    return get


def _of_kind(step_dir: str, predicate) -> list[str]:
    return [rel for rel in files_of(step_dir) if predicate(rel)]


def _dcp_metadata(rel: str) -> bool:
    return os.path.basename(rel) == ".metadata"


def _index_json(rel: str) -> bool:
    return rel.endswith(".index.json")


def _safetensors(rel: str) -> bool:
    return rel.endswith(".safetensors")


def _require_files(case: str, pristine: str, predicate, what: str) -> list[str]:
    require_persistent(case, "there are no files to attack")
    found = _of_kind(pristine, predicate)
    if not found:
        pytest.skip(f"{case} stores no {what}")
    return found


def _sealed(attack, sealing: str):
    """Apply ``attack`` to a file, then make the step look legitimate again."""

    def damage(path: str) -> None:
        attack(path)
        step_dir = _step_dir_of(path)
        if sealing == "resealed":
            reseal(step_dir)
        else:
            os.remove(os.path.join(step_dir, MANIFEST))

    return damage


def _step_dir_of(path: str) -> str:
    while not os.path.basename(path).startswith("step-"):
        path = os.path.dirname(path)
    return path


# ------------------------------------------------------------------------------ pickles
@pytest.mark.parametrize("sealing", SEALING)
@pytest.mark.parametrize("gadget", sorted(crafted.pickle_gadgets("x")))
@pytest.mark.parametrize("case", CASES)
def test_crafted_pickle_in_dcp_metadata_runs_nothing(case, gadget, sealing, pristine, tmp_path):
    files = _require_files(case, pristine(case), _dcp_metadata, "DCP .metadata")
    marker = str(tmp_path / "pwned")
    attack = crafted.pickle_gadgets(marker)[gadget]
    bench = Bench(case, pristine(case), tmp_path)
    for rel in files:
        # Premise: the crafted file really runs code under stock unpickling.
        probe = str(tmp_path / "probe.metadata")
        shutil.copy(os.path.join(bench.pristine, rel), probe)
        attack(probe)
        with open(probe, "rb") as f:
            try:
                pickle.load(f)
            except Exception:
                pass
        assert os.path.exists(marker), f"premise: gadget {gadget} did not run under plain pickle"
        os.remove(marker)

        error, loaded = bench.damaged_load(rel, _sealed(attack, sealing))
        assert not os.path.exists(marker), f"{rel}: loading a crafted checkpoint RAN CODE ({gadget}, {sealing})"
        assert isinstance(error, CorruptCheckpointError), f"{rel}: {gadget}/{sealing} gave {error!r} (loaded={loaded})"


class _EvilStateful:
    """A train_state whose value unpickles into code execution."""

    def __init__(self, marker: str):
        self.marker = marker

    def state_dict(self):
        return {"step": crafted.RunsCode(self.marker), "losses": [0.5]}

    def load_state_dict(self, sd):  # pragma: no cover - must never be reached
        raise AssertionError("a crafted value reached load_state_dict")


def _load_evil_training_state(case: str, base, tmp_path) -> tuple[BaseException | None, bool, str]:
    require_persistent(case, "nothing is stored")
    if not capabilities(case).non_tensor_state:
        pytest.skip(f"{case} keeps model tensors only")
    marker = str(tmp_path / "pwned")
    step_dir = save_pristine(case, str(tmp_path / "src"), base, writer_states={"train_state": _EvilStateful(marker)})
    assert not os.path.exists(marker), "saving alone ran the gadget (test premise broken)"
    bench = Bench(case, step_dir, tmp_path / "dst")
    try:
        error, loaded = bench.damaged_load(None, lambda step: None)
    except BaseException as escaped:  # judged by the typed-error test below
        error, loaded = escaped, False
    return error, loaded, marker


@pytest.mark.parametrize("case", CASES)
def test_pickled_object_in_training_state_runs_nothing(case, base, tmp_path):
    """Non-tensor state (train_state, lr) is stored as pickled bytes; a crafted object among
    them, written by the real backend, must never run when read back."""
    error, loaded, marker = _load_evil_training_state(case, base, tmp_path)
    assert not os.path.exists(marker), "loading a crafted training state RAN CODE"
    assert error is not None and not loaded, "a crafted training state was loaded"


@pytest.mark.parametrize("case", CASES)
def test_pickled_object_in_training_state_is_an_unsafe_error(case, base, tmp_path):
    error, loaded, _ = _load_evil_training_state(case, base, tmp_path)
    assert isinstance(error, UnsafeCheckpointError), f"got {error!r} (loaded={loaded})"


# ------------------------------------------------------------------------------ paths
def _outside_copy(bench: Bench, rel: str, tmp_path) -> str:
    """An identical copy of a step file outside the checkpoint folder, so following a path
    there would *succeed*: only the loader's refusal stops it."""
    target = tmp_path / "outside" / os.path.basename(rel)
    target.parent.mkdir(exist_ok=True)
    shutil.copy(os.path.join(bench.pristine, rel), target)
    return str(target)


def _escape(how: str, bench: Bench, rel: str, tmp_path) -> str:
    outside = _outside_copy(bench, rel, tmp_path)
    if how == "absolute":
        return outside
    return os.path.relpath(outside, os.path.dirname(os.path.join(bench.step_dir, rel)))  # ../../outside/x


@pytest.mark.parametrize("how", ["dotdot", "absolute"])
@pytest.mark.parametrize("case", CASES)
def test_dcp_metadata_paths_out_of_the_step_are_refused(case, how, pristine, tmp_path):
    files = _require_files(case, pristine(case), _dcp_metadata, "DCP .metadata")
    bench = Bench(case, pristine(case), tmp_path)
    for rel in files:
        md = crafted.read_own_metadata(os.path.join(bench.pristine, rel))
        data_rel = os.path.join(os.path.dirname(rel), next(iter(md.storage_data.values())).relative_path)
        escape = _escape(how, bench, data_rel, tmp_path)
        error, loaded = bench.damaged_load(rel, _sealed(crafted.redirect_storage(escape), "resealed"))
        assert isinstance(error, UnsafeCheckpointError), f"{rel} -> {escape}: {error!r} (loaded={loaded})"


@pytest.mark.parametrize("how", ["dotdot", "absolute"])
@pytest.mark.parametrize("case", CASES)
def test_index_json_paths_out_of_the_step_are_refused(case, how, pristine, tmp_path):
    files = _require_files(case, pristine(case), _index_json, "index JSON")
    bench = Bench(case, pristine(case), tmp_path)
    for rel in files:
        with open(os.path.join(bench.pristine, rel)) as f:
            index = json.load(f)
        shard = next(iter(index["weight_map"].values()))
        escape = _escape(how, bench, os.path.join(os.path.dirname(rel), shard), tmp_path)

        def redirect(path, index=index, escape=escape):
            index["weight_map"] = {k: escape for k in index["weight_map"]}
            with open(path, "w") as f:
                json.dump(index, f)

        error, loaded = bench.damaged_load(rel, _sealed(redirect, "resealed"))
        assert isinstance(error, UnsafeCheckpointError), f"{rel} -> {escape}: {error!r} (loaded={loaded})"


@pytest.mark.parametrize("how", ["dotdot", "absolute"])
@pytest.mark.parametrize("case", CASES)
def test_manifest_paths_out_of_the_step_are_refused(case, how, pristine, tmp_path):
    _require_files(case, pristine(case), lambda rel: rel == MANIFEST, "manifest")
    bench = Bench(case, pristine(case), tmp_path)
    victim = next(rel for rel in bench.files() if rel != MANIFEST)
    escape = _escape(how, bench, victim, tmp_path)

    def redirect(path):
        with open(path) as f:
            manifest = json.load(f)
        manifest["files"][escape] = manifest["files"].pop(victim)
        with open(path, "w") as f:
            json.dump(manifest, f)

    error, loaded = bench.damaged_load(MANIFEST, redirect)
    assert isinstance(error, UnsafeCheckpointError), f"{victim} -> {escape}: {error!r} (loaded={loaded})"


@pytest.mark.parametrize("case", CASES)
def test_symlinks_out_of_the_step_are_refused(case, pristine, tmp_path):
    """Every file (and every subdirectory) in turn replaced by a symlink to an identical copy
    outside the checkpoint: same bytes, same checksum, still refused."""
    require_persistent(case, "there are no files")
    bench = Bench(case, pristine(case), tmp_path)
    subdirs = sorted({os.path.dirname(rel) for rel in bench.files()} - {""})
    problems = []
    for rel in bench.files() + subdirs:
        source = os.path.join(bench.pristine, rel)
        outside = str(tmp_path / "outside" / rel.replace(os.sep, "_"))
        os.makedirs(os.path.dirname(outside), exist_ok=True)
        if os.path.isdir(source):
            shutil.rmtree(outside, ignore_errors=True)
            shutil.copytree(source, outside)
        else:
            shutil.copy(source, outside)

        def to_symlink(path, outside=outside):
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
            os.symlink(outside, path)

        error, loaded = bench.damaged_load(rel, to_symlink)
        if not isinstance(error, UnsafeCheckpointError):
            problems.append(f"{rel} symlinked out: {error!r} (loaded={loaded})")
        elif not names_file(error, rel):
            problems.append(f"{rel} symlinked out: the error does not name it: {error}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("case", CASES)
def test_symlinked_step_directory_is_never_loaded(case, pristine, tmp_path, base):
    """``step-N`` itself a symlink to a complete step elsewhere: not ours, never listed."""
    require_persistent(case, "there are no directories")
    bench = Bench(case, pristine(case), tmp_path)
    outside = str(tmp_path / "elsewhere")
    shutil.copytree(bench.pristine, outside)

    def to_symlink(step_dir):
        shutil.rmtree(step_dir)
        os.symlink(outside, step_dir)

    error, loaded = bench.damaged_load(None, to_symlink)
    assert (error is None and loaded is False) or isinstance(error, UnsafeCheckpointError), (error, loaded)
    assert bench.reader.ckpt.backend.steps() == []


# ------------------------------------------------------------------------------ sizes
def _load_with_headroom(bench: Bench, rel: str, damage):
    with crafted.address_space_headroom():
        return bench.damaged_load(rel, damage)


@pytest.mark.parametrize("attack", sorted(crafted.safetensors_attacks()))
@pytest.mark.parametrize("case", CASES)
def test_lying_safetensors_headers_are_refused_without_huge_allocation(case, attack, pristine, tmp_path):
    files = _require_files(case, pristine(case), _safetensors, "safetensors files")
    bench = Bench(case, pristine(case), tmp_path)
    for rel in files:
        error, loaded = _load_with_headroom(bench, rel, _sealed(crafted.safetensors_attacks()[attack], "resealed"))
        assert error is not None, f"{rel}: a header that lies ({attack}) was loaded (loaded={loaded})"
        assert not crafted.raised_memory_error(error), f"{rel}: {attack} made the loader try a huge allocation: {error!r}"
        assert isinstance(error, CorruptCheckpointError), f"{rel}: {attack} gave {error!r}"
        assert names_file(error, rel), f"{rel}: {attack}: the error does not name the file: {error}"


@pytest.mark.parametrize("lie", sorted(crafted.dcp_huge_sizes()))
@pytest.mark.parametrize("case", CASES)
def test_huge_sizes_in_dcp_metadata_are_refused_without_huge_allocation(case, lie, pristine, tmp_path):
    applies, edit = crafted.dcp_huge_sizes()[lie]
    files = _require_files(case, pristine(case), _dcp_metadata, "DCP .metadata")
    files = [rel for rel in files if applies(crafted.read_own_metadata(os.path.join(pristine(case), rel)))]
    if not files:
        pytest.skip(f"no .metadata of {case} has an item that {lie} applies to")
    bench = Bench(case, pristine(case), tmp_path)
    for rel in files:
        error, loaded = _load_with_headroom(bench, rel, _sealed(crafted.edit_metadata(edit), "resealed"))
        assert error is not None, f"{rel}: metadata declaring {lie} = 2**44 was loaded (loaded={loaded})"
        assert not crafted.raised_memory_error(error), f"{rel}: {lie} made the loader try a huge allocation: {error!r}"
        assert isinstance(error, (CorruptCheckpointError, StateMismatchError)), f"{rel}: {lie} gave {error!r}"
