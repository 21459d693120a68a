"""A saving process SIGKILLed at any instant, and a reader polling a live writer.

The kill is real: a forked child (see ``faults/forkserver.py``) patches the one function it
must die in and SIGKILLs itself there. Afterwards, in this process, the previous step must load
bit-exact, the half-written step must never be listed (by us or by TorchTitan's own scan), the
next writer must clean the leftovers, and saving must simply go on.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid

import pytest

from checkpointing import CheckpointError
from tests.checkpointing.faults import child_jobs, killpoints
from tests.checkpointing.faults.forkserver import ForkServer
from tests.checkpointing.faults.matrix import (
    CASES,
    capabilities,
    require_cross_process,
    require_persistent,
    titan_find_load_step,
    titan_visible,
)
from tests.checkpointing.faults.versions import BASE_SEED, Side, assert_unchanged, base_weights, snapshot

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def server():
    srv = ForkServer(timeout_s=90)
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def base():
    return base_weights()


_CHANNELS: list[str] = []


def _channel() -> str:
    name = f"f{uuid.uuid4().hex[:12]}"
    _CHANNELS.append(name)
    return name


@pytest.fixture(autouse=True, scope="module")
def _reclaim_dead_publishers():
    """A crash test that fails half-way must not leave its killed publisher's segments in
    /dev/shm for the next run: free every channel this module made whose owner is dead."""
    yield
    from checkpointing.backends.memory.lifetime import reclaim

    for name in _CHANNELS:
        reclaim(name)


def _step_names(steps: list[int]) -> set[str]:
    return {f"step-{s}" for s in steps}


def _crash(server, case: str, tmp_path, channel: str, point: str):
    """Run the doomed save in a forked child and insist that it died where it was told to."""
    kp = killpoints.BY_NAME[point]
    outcome = server.run("crash", case=case, base_folder=str(tmp_path), channel=channel, point=point)
    if outcome.exitcode == child_jobs.NO_RECIPE:
        pytest.skip(f"{case}: no way to kill it {kp.what} is known; add a recipe to faults/killpoints.py")
    if outcome.exitcode == child_jobs.NOT_REACHED:
        pytest.fail(f"{case}: the save never passed kill point {point!r} ({kp.what}); fix its recipe in faults/killpoints.py")
    assert outcome.signal == signal.SIGKILL, outcome.describe()
    return outcome


@pytest.mark.parametrize("point", [p.name for p in killpoints.KILL_POINTS])
@pytest.mark.parametrize("case", CASES)
def test_sigkill_mid_save_keeps_previous_step_and_hides_the_partial(server, base, case, point, tmp_path):
    require_persistent(case, "a SIGKILLed writer takes its steps with it; nothing is left to resume from")
    kp = killpoints.BY_NAME[point]
    channel = _channel()
    _crash(server, case, tmp_path, channel, point)

    previous = [1, 2] if kp.purge else [1]
    doomed = previous[-1] + 1
    newest = doomed if kp.survivor == "doomed" else previous[-1]
    folder = str(tmp_path / "checkpoint")

    reader = Side(case, str(tmp_path), channel, load_only=True)  # load_only: cleans nothing
    committed = reader.ckpt.backend.steps()
    assert committed and committed[-1] == newest, f"after a kill {kp.what}: committed {committed}, newest must be {newest}"
    if kp.survivor == "previous":
        assert doomed not in committed, f"the step being written when killed ({doomed}) is listed"

    # TorchTitan's own resume scan must never pick anything we do not list as committed.
    titan = titan_find_load_step(folder)
    assert titan == -1 or titan in committed, f"TorchTitan's scan picks step {titan}, not committed ({committed})"
    if titan_visible(os.path.join(folder, f"step-{newest}")):
        assert titan == newest

    # The newest step is what load() picks, and every listed step is whole, bit-exact.
    assert reader.ckpt.load() is True
    reader.assert_loaded_version(base, newest)
    for step in committed[:-1]:
        assert reader.ckpt.load(step) is True
        reader.assert_loaded_version(base, step)
    leftovers = sorted(set(os.listdir(folder)) - _step_names(committed))

    # A new writer (a restarted trainer) cleans the debris and saves on.
    writer = Side(case, str(tmp_path), channel, seed=BASE_SEED, keep_latest_k=2)
    remaining = set(os.listdir(folder))
    assert remaining == _step_names(writer.ckpt.backend.steps()), (
        f"leftovers {sorted(remaining - _step_names(committed))} survived cleanup (were {leftovers})"
    )
    writer.save_version(base, 10)
    assert reader.ckpt.load() is True
    reader.assert_loaded_version(base, 10)
    writer.close()
    reader.close()


PUBLISH_KILL_POINTS = ["mid_data", "before_commit"]


@pytest.mark.parametrize("point", PUBLISH_KILL_POINTS)
@pytest.mark.parametrize("case", CASES)
def test_publisher_killed_mid_publish_never_serves_torn_weights(server, base, case, point, tmp_path):
    """Non-persistent backends read by other processes: a publisher SIGKILLed mid-publish may
    leave its readers with a typed error (its versions died with it) but never with a torn or
    half-copied version; a new publisher on the channel serves whole versions again."""
    caps = capabilities(case)
    if caps.persistent:
        pytest.skip(f"{case} is persistent: covered by the SIGKILL test above")
    require_cross_process(case, "its publisher and readers share one process and die together")
    channel = _channel()
    _crash(server, case, tmp_path, channel, point)

    reader = Side(case, str(tmp_path), channel, load_only=True)
    before = snapshot(reader.model)
    try:
        loaded = reader.ckpt.load()
    except CheckpointError:
        assert_unchanged(reader.model, before, "a failed load after the publisher died")
    else:
        if loaded:
            reader.assert_loaded_version(base, 1)  # the version published before the kill, whole
        else:
            assert_unchanged(reader.model, before, "load() found nothing")

    publisher = Side(case, str(tmp_path), channel, seed=BASE_SEED)
    publisher.save_version(base, 10)
    assert reader.ckpt.load() is True
    reader.assert_loaded_version(base, 10)
    publisher.close()
    reader.close()


POLL_VERSIONS = 12


def _poll_until(done, reader: Side, base, report=None) -> list[int]:
    """load() in a loop until ``done()``; every successful load must be a whole known version."""
    seen = []
    while not done():
        if reader.ckpt.load():
            reader.assert_loaded_version(base, reader.ckpt.loaded_step)
            seen.append(reader.ckpt.loaded_step)
            if report is not None:
                report(reader.ckpt.loaded_step)
    return seen


def _report_seen(handshake):
    def report(step: int) -> None:
        tmp = handshake / "seen.tmp"
        tmp.write_text(str(step))
        os.replace(tmp, handshake / "seen")

    return report


def _check_polling(seen: list[int], reader: Side, base) -> None:
    assert seen == sorted(seen), f"a reader went back in time: {seen}"
    assert len(set(seen)) >= 2, f"the reader never overlapped the writer (saw {seen}): the test proved nothing"
    assert reader.ckpt.load() is True
    reader.assert_loaded_version(base, POLL_VERSIONS)


@pytest.mark.parametrize("case", CASES)
def test_reader_polling_a_writer_process_never_sees_a_partial_step(server, base, case, tmp_path):
    require_cross_process(case, "a writer in another process cannot publish to it")
    channel = _channel()
    handshake = tmp_path / "handshake"
    handshake.mkdir()
    server.start("publish", case=case, base_folder=str(tmp_path), channel=channel, versions=POLL_VERSIONS,
                 handshake=str(handshake), pause_s=0.01)
    reader = Side(case, str(tmp_path), channel, load_only=True)
    (handshake / "go").touch()
    ended = {}

    def writer_done() -> bool:
        ended["outcome"] = ended.get("outcome") or server.poll()
        if ended["outcome"] is not None:
            pytest.fail(f"the writer ended before publishing everything: {ended['outcome'].describe()}")
        return (handshake / "published").exists()

    deadline = time.monotonic() + 90
    seen = _poll_until(lambda: writer_done() or time.monotonic() > deadline, reader, base, _report_seen(handshake))
    assert (handshake / "published").exists(), "the writer did not finish in time"
    _check_polling(seen, reader, base)
    (handshake / "release").touch()
    outcome = ended.get("outcome") or server.wait()
    assert outcome.exitcode == 0, outcome.describe()
    reader.close()


@pytest.mark.parametrize("case", CASES)
def test_reader_polling_a_writer_thread_never_sees_a_partial_step(base, case, tmp_path):
    """The same promise inside one process (the only way a ``local``-only backend is read)."""
    if capabilities(case).cross_process:
        pytest.skip(f"{case} is covered across processes by the test above")
    channel = _channel()
    writer = Side(case, str(tmp_path), channel, seed=BASE_SEED, keep_latest_k=2)
    reader = Side(case, str(tmp_path), channel, load_only=True)
    errors = []

    def publish():
        try:
            for version in range(1, POLL_VERSIONS + 1):
                writer.save_version(base, version)
                time.sleep(0.01)
        except BaseException as e:  # reported below, on the test's thread
            errors.append(e)

    thread = threading.Thread(target=publish)
    thread.start()
    seen = _poll_until(lambda: not thread.is_alive(), reader, base)
    thread.join()
    assert not errors, errors
    _check_polling(seen, reader, base)
    reader.close()
    writer.close()
