"""A failure raised inside a backend's write: the error reaches the caller (at once, or for an
async save at the next save / staging wait / load / close, as AsyncSaveError), nothing
half-written is ever listed, and the next save works.

The failures are raised from inside the real write path (``faults/inject.py``): a full disk in
the middle of a data file, an fsync I/O error at commit, a background worker killed outright.
"""

from __future__ import annotations

import os
import uuid

import pytest

from checkpointing import AsyncSaveError
from tests.checkpointing.cases import case_backend
from tests.checkpointing.faults.inject import chain_holds, failing, io_error, no_space, worker_killed
from tests.checkpointing.faults.matrix import CASES, capabilities
from tests.checkpointing.faults.versions import BASE_SEED, Side, base_weights

WHERE = {"data": no_space, "commit": io_error}


@pytest.fixture(scope="module")
def base():
    return base_weights()


@pytest.fixture
def channel():
    return f"w{uuid.uuid4().hex[:12]}"


def _assert_nothing_half_written(case: str, tmp_path, writer: Side, committed: list[int]) -> None:
    assert writer.ckpt.backend.steps() == committed, "a failed save left a step listed"
    if capabilities(case).persistent:
        folder = tmp_path / "checkpoint"
        entries = set(os.listdir(folder))
        assert entries == {f"step-{s}" for s in committed}, f"a failed save left {sorted(entries)} behind"


def _assert_reader_gets(case, tmp_path, channel, base, version: int) -> None:
    reader = Side(case, str(tmp_path), channel, load_only=True)
    assert reader.ckpt.load() is True
    reader.assert_loaded_version(base, version)
    reader.close()


@pytest.mark.parametrize("where", sorted(WHERE))
@pytest.mark.parametrize("case", CASES)
def test_failed_write_raises_lists_nothing_and_next_save_works(case, where, tmp_path, channel, base, monkeypatch):
    writer = Side(case, str(tmp_path), channel, seed=BASE_SEED)
    writer.save_version(base, 1)
    with failing(monkeypatch, where, case_backend(case), WHERE[where]()) as injected:
        with pytest.raises(BaseException) as info:
            writer.save_version(base, 2)
    assert injected.fired, "the injected failure was never hit: the recipe no longer matches the write path"
    assert isinstance(info.value, Exception), f"a {type(info.value).__name__} (not an Exception) escaped save()"
    assert chain_holds(info.value, injected.error), f"the caller got {info.value!r}, which hides the real cause"
    _assert_nothing_half_written(case, tmp_path, writer, [1])
    _assert_reader_gets(case, tmp_path, channel, base, 1)

    writer.save_version(base, 3)
    _assert_nothing_half_written(case, tmp_path, writer, [1, 3])
    _assert_reader_gets(case, tmp_path, channel, base, 3)
    writer.close()


ASYNC_FAILURES = {"disk_full": no_space, "worker_killed": worker_killed}


@pytest.mark.parametrize("surface", ["next_save", "load", "close"])
@pytest.mark.parametrize("failure", sorted(ASYNC_FAILURES))
@pytest.mark.parametrize("case", CASES)
def test_failed_async_write_surfaces_as_async_save_error(case, failure, surface, tmp_path, channel, base, monkeypatch):
    writer = Side(case, str(tmp_path), channel, seed=BASE_SEED, async_mode="async")
    writer.save_version(base, 1)
    writer.ckpt.load()  # waits for the background write of step 1 (and reloads it)
    with failing(monkeypatch, "data", case_backend(case), ASYNC_FAILURES[failure]()) as injected:
        writer.save_version(base, 2)  # returns: the write runs in the background and fails there
        with pytest.raises(AsyncSaveError) as info:
            if surface == "next_save":
                writer.save_version(base, 3)
            elif surface == "load":
                writer.ckpt.load()
            else:
                writer.close()
    assert injected.fired, "the injected failure was never hit"
    assert chain_holds(info.value, injected.error), f"AsyncSaveError {info.value!r} does not carry the cause"
    if surface != "close" or capabilities(case).persistent:  # a closed memory channel lists nothing
        _assert_nothing_half_written(case, tmp_path, writer, [1])

    if surface == "close":
        writer = Side(case, str(tmp_path), channel, seed=BASE_SEED, async_mode="async")
    writer.save_version(base, 3)  # the error was reported once; saving goes on
    writer.close()
    if capabilities(case).persistent:  # a memory channel closes with its publisher
        _assert_reader_gets(case, tmp_path, channel, base, 3)


@pytest.mark.parametrize("case", CASES)
def test_failed_async_staging_surfaces_at_maybe_wait_for_staging(case, tmp_path, channel, base, monkeypatch):
    """``async_with_pinned_mem`` copies the state in the background; a failure there is raised
    by ``maybe_wait_for_staging()``, the call a trainer makes before its next optimizer step."""
    import torch.distributed._state_dict_utils as sdu

    writer = Side(case, str(tmp_path), channel, seed=BASE_SEED, async_mode="async_with_pinned_mem")
    writer.save_version(base, 1)
    writer.ckpt.maybe_wait_for_staging()
    writer.ckpt.load()
    error = no_space()

    def failing_copy(*a, **kw):
        raise error

    with monkeypatch.context() as m:
        m.setattr(sdu, "_copy_state_dict", failing_copy)
        writer.save_version(base, 2)
        with pytest.raises(AsyncSaveError) as info:
            writer.ckpt.maybe_wait_for_staging()
    assert chain_holds(info.value, error)
    _assert_nothing_half_written(case, tmp_path, writer, [1])
    writer.save_version(base, 3)
    writer.ckpt.maybe_wait_for_staging()
    assert writer.ckpt.load() is True
    writer.assert_loaded_version(base, 3)
    writer.close()
