"""The dist backend across real processes (gloo on CPU): a 2-rank FSDP2 trainer publishes, and
readers with other layouts pull, through nothing but ``Checkpointer.save`` / ``load``.

* 2 FSDP2 ranks -> 1 replicated reader (this process): bit-exact after several versions, and
  the reshard plan is computed exactly once on every side (later syncs replay it);
* 2 FSDP2 ranks -> 2 tensor-parallel ranks (column and row shards, their own gloo world);
* a receiver whose layout does not fit fails at planning, naming the keys, untouched;
* a publisher SIGKILLed mid-sync: the reader gets PeerGoneError within the timeout and keeps
  the version it had; a reader SIGKILLed mid-sync: the trainer's next save raises
  PeerGoneError once, and publishing goes on.

The trainer ranks live in their own processes (their own torch.distributed world, as under
torchrun) and obey commands; version ``v`` is the seed-0 model with ``v`` added to every
floating tensor, so any process can check a load bit for bit without being told the bytes.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
import socket
import time

import pytest
import torch

from checkpointing import CheckpointConfig, Checkpointer, StateMismatchError
from checkpointing.backends.dist import DistOptions, PeerGoneError
from tests.helpers import assert_state_equal, build_titan_model

WORLD = 2
MODEL = dict(name="qwen3", dim=64, vocab_size=512)  # ~0.6 MB fp32: several 64 KiB buckets per rank
BUCKET_MB = 1 / 16
TIMEOUT_S = 10.0
# Ranks are forked from Python's fork server, which imports torch and TorchTitan once: a fresh
# interpreter per rank costs several seconds of imports on this machine, a fork milliseconds.
SPAWN = mp.get_context("forkserver")
SPAWN.set_forkserver_preload(["torch", "torchtitan.protocols.train_spec", "checkpointing", "tests.helpers", __name__])
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]  # bounds a hang; a loaded 2-core CI box is slow

TP_PLAN = {
    "attention.wq": "colwise", "attention.wk": "colwise", "attention.wv": "colwise", "attention.wo": "rowwise",
    "feed_forward.w1": "colwise", "feed_forward.w3": "colwise", "feed_forward.w2": "rowwise",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sync_config(port: int, **options) -> CheckpointConfig:
    opts = dict(init_method=f"tcp://127.0.0.1:{port}", publishers=WORLD, timeout_s=TIMEOUT_S, join_timeout_s=300.0, bucket_size_mb=BUCKET_MB)
    opts.update(options)
    load_only = opts.pop("load_only", False)
    return CheckpointConfig(enable=True, backend="dist", interval=1, keep_latest_k=0, load_only=load_only, dist=DistOptions(**opts))


def expected(base: dict[str, torch.Tensor], version: int) -> dict[str, torch.Tensor]:
    return {k: (v + version if v.is_floating_point() else v) for k, v in base.items()}


def full_state(model) -> dict[str, torch.Tensor]:
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------- trainer ranks
def publisher_main(rank: int, world_port: int, sync_port: int, bucket_mb: float, commands, results) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    os.environ["RANK"] = str(rank)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{world_port}", rank=rank, world_size=WORLD)
    try:
        model = build_titan_model(seed=0, **MODEL)
        mesh = init_device_mesh("cpu", (WORLD,))
        for block in model.layers.values():
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        state = model.state_dict()
        assert all(hasattr(v, "placements") for v in state.values()), "the trainer is not sharded"
        base = {k: v.to_local().detach().clone() for k, v in state.items()}
        ckpt = Checkpointer(model_parts=[model], checkpoint_config=sync_config(sync_port, bucket_size_mb=bucket_mb))
        backend = ckpt.backend
        results.put(("ready", rank, None))
        while True:
            command, arg = commands.get()
            if command == "save":
                with torch.no_grad():
                    for key, value in state.items():
                        value.to_local().copy_(base[key] + arg if base[key].is_floating_point() else base[key])
                try:
                    ckpt.save(arg)
                    results.put(("saved", rank, arg))
                except PeerGoneError as e:
                    results.put(("save_failed", rank, f"{type(e).__name__}: {e}"))
            elif command == "stats":
                pub = backend.publisher()
                results.put(("stats", rank, (backend.plans_computed, pub.syncs_served, pub.pending_failure is not None)))
            elif command == "die_after_sends":
                _die_after(arg)
                results.put(("armed", rank, arg))
            elif command == "close":
                ckpt.close()
                results.put(("closed", rank, None))
                return
    finally:
        dist.destroy_process_group()


def _die_after(sends: int) -> None:
    """SIGKILL this process inside its ``sends``-th bucket send: a real crash mid-sync."""
    from checkpointing.backends.dist import world

    real, count = world.send_bucket, {"n": 0}

    def doomed(group, tensor, dst, tag):
        count["n"] += 1
        if count["n"] > sends:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(group, tensor, dst, tag)

    world.send_bucket = doomed


class Inbox:
    """Messages ``(kind, rank, payload)`` from rank processes; ``expect`` takes one of a kind per
    rank and keeps the others (a fast rank may already report its next stage)."""

    def __init__(self, procs):
        self.queue = SPAWN.Queue()
        self.procs = procs
        self.kept: list[tuple] = []

    def expect(self, kind: str, ranks, timeout: float = 300) -> dict[int, object]:
        want, got = set(ranks), {}
        deadline = time.monotonic() + timeout
        while set(got) != want:
            message = next((m for m in self.kept if m[0] in (kind, "error") and m[1] in want - set(got)), None)
            if message is not None:
                self.kept.remove(message)
            else:
                try:
                    message = self.queue.get(timeout=0.5)
                except queue.Empty:
                    dead = [r for r in want - set(got) if self.procs[r].exitcode not in (None, 0)]
                    if dead or time.monotonic() > deadline:
                        raise AssertionError(
                            f"no {kind!r} from ranks {sorted(want - set(got))}: exit codes {[p.exitcode for p in self.procs]}"
                        ) from None
                    continue
            what, rank, payload = message
            assert what != "error", f"rank {rank} failed: {payload}"
            if what != kind or rank not in want or rank in got:
                self.kept.append(message)
                continue
            got[rank] = payload
        return got

    def expect_any(self, kinds: list[str], ranks) -> dict[int, tuple[str, object]]:
        """One message per rank whose kind is any of ``kinds``."""
        got: dict[int, tuple[str, object]] = {}
        deadline = time.monotonic() + 300
        while len(got) < len(ranks) and time.monotonic() < deadline:
            try:
                what, rank, payload = self.queue.get(timeout=0.5)
            except queue.Empty:
                continue
            assert what in kinds, (what, rank, payload)
            got[rank] = (what, payload)
        return got


class Trainer:
    """Two FSDP2 publisher ranks in their own processes and gloo world, driven by commands."""

    def __init__(self, bucket_mb: float = BUCKET_MB):
        self.sync_port, world_port = free_port(), free_port()
        self.commands = [SPAWN.Queue() for _ in range(WORLD)]
        self.ranks: list = []
        self.inbox = Inbox(self.ranks)
        self.ranks += [
            SPAWN.Process(target=publisher_main, args=(r, world_port, self.sync_port, bucket_mb, self.commands[r], self.inbox.queue), daemon=True)
            for r in range(WORLD)
        ]
        for p in self.ranks:
            p.start()
        self.collect("ready", range(WORLD), timeout=600)

    def collect(self, kind: str, ranks, timeout: float = 300) -> dict[int, object]:
        return self.inbox.expect(kind, ranks, timeout)

    def send(self, command: str, arg=None, ranks=range(WORLD)) -> None:
        for r in ranks:
            self.commands[r].put((command, arg))

    def save(self, version: int) -> None:
        self.send("save", version)
        self.collect("saved", range(WORLD))

    def stats(self) -> dict[int, tuple[int, int, bool]]:
        self.send("stats")
        return self.collect("stats", range(WORLD))  # type: ignore[return-value]

    def stats_once_served(self, syncs: int, timeout: float = 30) -> dict[int, tuple[int, int, bool]]:
        """Every rank's stats, asked again until each has counted ``syncs`` served syncs: a rank
        counts a sync after its last send returns, which can be just after the reader is done."""
        deadline = time.monotonic() + timeout
        while True:
            stats = self.stats()
            if all(served >= syncs for _, served, _ in stats.values()) or time.monotonic() > deadline:
                return stats
            time.sleep(0.05)

    def close(self) -> None:
        for r, p in enumerate(self.ranks):
            if p.is_alive():
                self.commands[r].put(("close", None))
        for p in self.ranks:
            p.join(30)
            if p.is_alive():
                p.kill()


@pytest.fixture(scope="module")
def trainer():
    t = Trainer()
    yield t
    t.close()


@pytest.fixture(scope="module")
def base():
    return {k: v.detach().clone() for k, v in build_titan_model(seed=0, **MODEL).state_dict().items()}


# ---------------------------------------------------------------------------- replicated reader
def test_fsdp_trainer_to_replicated_reader_bit_exact_planned_once(trainer, base):
    receiver = build_titan_model(seed=1, **MODEL)
    reader = Checkpointer(model_parts=[receiver], checkpoint_config=sync_config(trainer.sync_port, load_only=True))
    for version in (1, 2, 3, 4):
        trainer.save(version)
        assert reader.latest_step() == version
        assert reader.load() is True and reader.loaded_step == version
        assert_state_equal(expected(base, version), receiver.state_dict())
    assert receiver.output.weight is receiver.tok_embeddings.weight  # ties survive
    # Planned on the first sync only: every later sync replayed the same buckets.
    assert reader.backend.plans_computed == 1
    stats = trainer.stats_once_served(4)
    assert all(plans == 1 and served >= 4 for plans, served, _ in stats.values()), stats
    # A named version: the newest is still held (keep_versions = 1), an older one is not.
    assert reader.load(step=4) is True
    reader.close()


class DictSink:
    """A receiver that is not a module (an engine's weight loader): it keeps copies by name."""

    def __init__(self, model):
        from checkpointing.receiver import specs_of

        self._specs = specs_of(model.state_dict())
        self.versions: dict[int, dict[str, torch.Tensor]] = {}

    def specs(self):
        return self._specs

    def receive(self, step, tensors):
        self.versions[step] = {k: v.clone() for k, v in tensors}


def test_a_sink_reader_is_planned_once_though_its_buffers_are_new_each_load(trainer, base):
    """The manager hands a sink fresh tensors every load: same layout, other tensors. They are
    bound to the existing plan, not planned again."""
    sink = DictSink(build_titan_model(seed=1, **MODEL))
    reader = Checkpointer(sink=sink, checkpoint_config=sync_config(trainer.sync_port, load_only=True))
    for version in (5, 6, 7):
        trainer.save(version)
        assert reader.load() is True and reader.loaded_step == version
        assert reader.stats.last_load_path == "sink"
        assert_state_equal(expected(base, version), sink.versions[version])
    assert reader.backend.plans_computed == 1
    reader.close()


# ---------------------------------------------------------------------------- tensor-parallel readers
def tp_reader_main(rank: int, world_port: int, sync_port: int, versions: list[int], saved, results) -> None:
    """A tensor-parallel generator rank: loads version i once ``saved[i]`` is set."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{world_port}", rank=rank, world_size=WORLD)
    try:
        model = build_titan_model(seed=1, **MODEL)
        mesh = init_device_mesh("cpu", (WORLD,))
        styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
        for block in model.layers.values():
            parallelize_module(block, mesh, {name: styles[style]() for name, style in TP_PLAN.items()})
        placements = {str(v.placements) for v in model.state_dict().values() if hasattr(v, "placements")}
        base = {k: v.detach().clone() for k, v in build_titan_model(seed=0, **MODEL).state_dict().items()}
        reader = Checkpointer(model_parts=[model], checkpoint_config=sync_config(sync_port, load_only=True))
        for version, event in zip(versions, saved, strict=True):
            event.wait(300)
            deadline = time.monotonic() + 120
            while reader.latest_step() < version and time.monotonic() < deadline:
                time.sleep(0.01)
            assert reader.load() is True and reader.loaded_step == version
            assert_state_equal(expected(base, version), full_state(model))
            results.put(("loaded", rank, version))
        results.put(("done", rank, (reader.backend.plans_computed, sorted(placements))))
        reader.close()
    except BaseException as e:
        results.put(("error", rank, repr(e)))
        raise
    finally:
        dist.destroy_process_group()


def test_fsdp_trainer_to_tensor_parallel_readers(trainer):
    versions = [11, 12, 13]
    world_port = free_port()
    saved = [SPAWN.Event() for _ in versions]
    readers: list = []
    inbox = Inbox(readers)
    readers += [
        SPAWN.Process(target=tp_reader_main, args=(r, world_port, trainer.sync_port, versions, saved, inbox.queue), daemon=True)
        for r in range(WORLD)
    ]
    for p in readers:
        p.start()
    try:
        for version, event in zip(versions, saved, strict=True):
            trainer.save(version)
            event.set()
            assert inbox.expect("loaded", range(WORLD)) == {0: version, 1: version}
        done = inbox.expect("done", range(WORLD))
    finally:
        for p in readers:
            p.join(300)
            if p.is_alive():
                p.kill()
    for plans, placements in done.values():
        assert plans == 1, f"a tensor-parallel reader planned {plans} times"
        assert "(Shard(dim=0),)" in placements and "(Shard(dim=1),)" in placements, placements


# ---------------------------------------------------------------------------- mismatch
def test_reader_whose_layout_does_not_fit_fails_at_planning_untouched(trainer):
    trainer.save(20)
    other = build_titan_model(seed=2, name="qwen3", dim=96, vocab_size=512)  # every matrix has another shape
    before = {k: v.clone() for k, v in other.state_dict().items()}
    reader = Checkpointer(model_parts=[other], checkpoint_config=sync_config(trainer.sync_port, load_only=True))
    with pytest.raises(StateMismatchError) as err:
        reader.load()
    assert "tok_embeddings.weight" in err.value.keys and "layers.0.attention.wq.weight" in err.value.keys
    assert "shape" in str(err.value)
    assert reader.loaded_step == -1
    assert_state_equal(before, other.state_dict())
    reader.close()


# ---------------------------------------------------------------------------- a reader dies mid-sync
def doomed_reader_main(sync_port: int, results) -> None:
    """Take part in one sync and SIGKILL itself once its first buckets are posted."""
    from checkpointing.backends.dist import world

    torch.set_num_threads(1)
    receiver = build_titan_model(seed=1, **MODEL)
    reader = Checkpointer(model_parts=[receiver], checkpoint_config=sync_config(sync_port, load_only=True))
    real, count = world.recv_bucket, {"n": 0}

    def doomed(group, tensor, src, tag):
        count["n"] += 1
        if count["n"] > 2:
            results.put(("dying", 0, count["n"]))
            time.sleep(0.2)  # the publishers are mid-send now
            os.kill(os.getpid(), signal.SIGKILL)
        return real(group, tensor, src, tag)

    world.recv_bucket = doomed
    reader.load()


def test_reader_killed_mid_sync_is_a_typed_error_on_the_trainer_once(trainer, base):
    trainer.save(30)
    results = SPAWN.Queue()
    doomed = SPAWN.Process(target=doomed_reader_main, args=(trainer.sync_port, results), daemon=True)
    doomed.start()
    doomed.join(300)
    assert doomed.exitcode == -signal.SIGKILL
    died = time.monotonic()
    # The survivors notice within the timeout (their server threads, while training goes on) ...
    noticed = {}
    while len(noticed) < WORLD and time.monotonic() - died < TIMEOUT_S + 5:
        noticed = {r: True for r, (_, _, pending) in trainer.stats().items() if pending}
        time.sleep(0.05)
    assert noticed, f"no trainer rank noticed the dead reader within {TIMEOUT_S + 5:g} s"
    # ... and the next save reports it, typed, once; the save after that publishes again.
    trainer.send("save", 31)
    outcomes = trainer.inbox.expect_any(["saved", "save_failed"], range(WORLD))
    failed = {r: p for r, (what, p) in outcomes.items() if what == "save_failed"}
    assert set(failed) == set(noticed), outcomes
    assert all("PeerGoneError" in p and "reader" in p for p in failed.values()), failed
    trainer.save(32)
    receiver = build_titan_model(seed=1, **MODEL)
    with Checkpointer(model_parts=[receiver], checkpoint_config=sync_config(trainer.sync_port, load_only=True)) as reader:
        assert reader.load() is True and reader.loaded_step == 32
    assert_state_equal(expected(base, 32), receiver.state_dict())


# ---------------------------------------------------------------------------- a publisher dies mid-sync
def test_publisher_killed_mid_sync_leaves_the_reader_unchanged_with_a_typed_error(base):
    doomed = Trainer()
    try:
        receiver = build_titan_model(seed=1, **MODEL)
        reader = Checkpointer(model_parts=[receiver], checkpoint_config=sync_config(doomed.sync_port, load_only=True))
        doomed.save(1)
        assert reader.load() is True and reader.loaded_step == 1
        doomed.save(2)
        doomed.send("die_after_sends", 1, ranks=[1])  # rank 1 dies inside its second bucket send
        doomed.collect("armed", [1])
        before = {k: v.clone() for k, v in receiver.state_dict().items()}
        begin = time.monotonic()
        with pytest.raises(PeerGoneError) as err:
            reader.load()
        elapsed = time.monotonic() - begin
        doomed.ranks[1].join(10)
        assert doomed.ranks[1].exitcode == -signal.SIGKILL, "the publisher did not die mid-sync"
        assert elapsed < TIMEOUT_S + 5, f"the dead publisher was noticed after {elapsed:.1f} s"
        assert "publisher" in err.value.peer
        assert reader.loaded_step == 1
        assert_state_equal(before, receiver.state_dict())
        assert_state_equal(expected(base, 1), receiver.state_dict())
        reader.close()
    finally:
        doomed.close()


# ---------------------------------------------------------------------------- NCCL (GPU machines)
def gpu_publisher_main(sync_port: int, versions: list[int], loaded, results) -> None:
    """One trainer rank on cuda:0 publishing over NCCL (``backend = "auto"`` picks it for CUDA);
    version i+1 only once the reader has loaded version i (``loaded[i]``)."""
    torch.cuda.set_device(0)
    model = build_titan_model(seed=0, **MODEL).to("cuda:0")
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    config = sync_config(sync_port, publishers=1)
    with Checkpointer(model_parts=[model], checkpoint_config=config) as ckpt:
        for version, event in zip(versions, loaded, strict=True):
            with torch.no_grad():
                for key, value in model.state_dict().items():
                    value.copy_(base[key] + version if base[key].is_floating_point() else base[key])
            ckpt.save(version)
            results.put(("saved", 0, (version, ckpt.backend.publisher().layout.backend)))
            event.wait(300)


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2,
    reason="NCCL gives every rank its own GPU: this needs 2 CUDA devices, and this machine has "
    f"{torch.cuda.device_count() if torch.cuda.is_available() else 0}",
)
def test_nccl_trainer_rank_to_a_reader_on_another_gpu(base):
    port, versions = free_port(), [1, 2]
    loaded = [SPAWN.Event() for _ in versions]
    procs: list = []
    inbox = Inbox(procs)
    procs.append(SPAWN.Process(target=gpu_publisher_main, args=(port, versions, loaded, inbox.queue), daemon=True))
    procs[0].start()
    try:
        torch.cuda.set_device(1)
        receiver = build_titan_model(seed=1, **MODEL).to("cuda:1")
        reader = Checkpointer(model_parts=[receiver], checkpoint_config=sync_config(port, publishers=1, load_only=True))
        for version, event in zip(versions, loaded, strict=True):
            assert inbox.expect("saved", [0]) == {0: (version, "nccl")}
            assert reader.load() is True and reader.loaded_step == version
            got = {k: v.cpu() for k, v in receiver.state_dict().items()}
            assert_state_equal(expected(base, version), got)
            event.set()
        assert reader.backend.plans_computed == 1
        reader.close()
    finally:
        for p in procs:
            p.kill()
            p.join(30)
