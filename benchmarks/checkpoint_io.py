"""Disk checkpoint speed, as ratios to limits measured in the same run on the same disk.

For one synthetic fp32 state dict (default ~1 GB) in one of two shapes (``--shape``):
``many-small`` (``--tensors`` tensors of similar, small sizes: norms, biases, small projections)
or ``few-large`` (80% of the bytes in 4 large matrices, the rest in 60 small tensors, as an
embedding-heavy model), this measures:

* the limits: a raw sequential write of the same bytes (+ fsync) and a raw read of them
  straight into the receiving tensors;
* the old idioms: ``torch.save`` (+ fsync) / ``torch.load`` (+ copy into the receiver), and
  ``safetensors`` ``save_file`` (+ fsync) / ``load_file`` (+ copy);
* ours: ``Checkpointer.save`` / ``load`` with ``backend = "dcp"`` (load with ``verify =
  "checksum"`` and ``"off"``) and, when the module exists, ``backend = "hf"``.

Reads are measured twice: *cold*, right after ``posix_fadvise(DONTNEED)`` evicted the files from
the page cache (the raw cold/warm speeds printed show whether eviction worked), and *warm*,
immediately again with the bytes in the page cache. Peak RSS is sampled every 5 ms during each
operation. Every load is checked bit-exact against the source after it is timed. The whole
sequence runs ``--repeat`` times (default 3) and each row reports its fastest pass, so a burst of
load from other processes on a shared machine does not decide a ratio.

    python benchmarks/checkpoint_io.py --shape many-small   # ~1 GB
    python benchmarks/checkpoint_io.py --shape few-large
    python benchmarks/checkpoint_io.py --size-gb 0.1        # quick
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.util
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable

import torch
import torch.nn as nn

GB = 1e9
TARGETS = {  # (operation, cache) -> (limit operation, largest allowed ratio): issue 14
    ("dcp save", "-"): ("raw write", 1.1),
    ("dcp load (checksum)", "cold"): ("raw read", 1.5),
    ("dcp load (checksum)", "warm"): ("raw read", 2.0),
    ("dcp load (verify off)", "cold"): ("raw read", 1.5),
    ("dcp load (verify off)", "warm"): ("raw read", 1.5),
    ("hf save", "-"): ("safetensors save", 1.1),
    ("hf load (checksum)", "cold"): ("safetensors load", 1.1),
    ("hf load (checksum)", "warm"): ("safetensors load", 1.1),
}
SHAPES = ("many-small", "few-large")


# ------------------------------------------------------------------ the state
def make_state(size_gb: float, n_tensors: int, seed: int = 0, shape: str = "many-small") -> dict[str, torch.Tensor]:
    """fp32 tensors summing to ``size_gb``: ``many-small``: ``n_tensors`` of similar sizes;
    ``few-large``: 4 matrices holding 80% of the bytes, 60 small tensors the rest."""
    g = torch.Generator().manual_seed(seed)
    total = int(size_gb * GB) // 4
    if shape == "few-large":
        weights = torch.cat([torch.full((4,), 0.2), torch.rand(60, generator=g) + 0.5])
        weights[4:] *= 0.2 / weights[4:].sum()
    else:
        weights = torch.rand(n_tensors, generator=g) + 0.5  # within a factor of 3 of each other
    numels = (weights / weights.sum() * total).long().clamp(min=64)
    state = {}
    for i, numel in enumerate(numels.tolist()):
        cols = 1024 if numel >= 4096 else 64
        rows = max(1, numel // cols)
        state[f"block_{i:04d}_weight"] = torch.randn(rows, cols, generator=g)
    return state


class StateModule(nn.Module):
    """An nn.Module whose parameters are exactly ``state`` (so the Checkpointer can hold it)."""

    def __init__(self, state: dict[str, torch.Tensor]):
        super().__init__()
        for name, tensor in state.items():
            self.register_parameter(name, nn.Parameter(tensor, requires_grad=False))


def nbytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def as_bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.detach().numpy()).cast("B")


# ------------------------------------------------------------------ measuring
def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples RSS in a thread: the peak *during* one operation, not the process lifetime."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self):
        self.peak = rss_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


@dataclasses.dataclass
class Result:
    op: str
    cache: str  # "-" for writes, "cold" / "warm" for reads
    seconds: float
    nbytes: int
    peak_rss: int
    rss_before: int

    @property
    def extra_rss(self) -> int:
        """Memory the operation itself needed on top of what the process already held."""
        return max(0, self.peak_rss - self.rss_before)

    @property
    def gbps(self) -> float:
        return self.nbytes / self.seconds / GB


def timed(op: str, cache: str, size: int, fn: Callable[[], None]) -> Result:
    gc.collect()
    before = rss_bytes()
    with PeakRSS() as rss:
        begin = time.perf_counter()
        fn()
        seconds = time.perf_counter() - begin
    return Result(op, cache, seconds, size, rss.peak, before)


def fsync_tree(path: str) -> None:
    """fsync a file, or every file under a directory (os.walk yields nothing for a file, which
    once left the torch.save and safetensors baselines unsynced and flatteringly fast)."""
    paths = [path] if os.path.isfile(path) else [os.path.join(d, n) for d, _, files in os.walk(path) for n in files]
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def evict(path: str) -> None:
    """Drop ``path``'s (clean) pages from the page cache, so the next read comes from disk."""
    paths = [path] if os.path.isfile(path) else [os.path.join(d, n) for d, _, ns in os.walk(path) for n in ns]
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def copy_into(receiver: dict[str, torch.Tensor], loaded: dict[str, torch.Tensor]) -> None:
    for k, t in receiver.items():
        t.copy_(loaded[k])


def assert_equal(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor], what: str) -> None:
    for k, t in expected.items():
        if not torch.equal(t, got[k]):
            raise SystemExit(f"{what}: tensor {k} differs after the round trip")


def zero(receiver: dict[str, torch.Tensor]) -> None:
    for t in receiver.values():
        t.zero_()


# ------------------------------------------------------------------ the operations
def raw_write(state, path):
    with open(path, "wb", buffering=0) as f:
        for t in state.values():
            f.write(as_bytes(t))
        f.flush()
        os.fsync(f.fileno())


def raw_read(receiver, path):
    with open(path, "rb", buffering=0) as f:
        for t in receiver.values():
            view = as_bytes(t)
            got = 0
            while got < len(view):
                n = f.readinto(view[got:])
                if not n:
                    raise SystemExit(f"{path} is shorter than the state")
                got += n


def torch_save(state, path):
    torch.save(state, path)
    fsync_tree(path)


def torch_load(receiver, path):
    copy_into(receiver, torch.load(path, weights_only=True))


def st_save(state, path):
    from safetensors.torch import save_file

    save_file(state, path)
    fsync_tree(path)


def st_load(receiver, path):
    from safetensors.torch import load_file

    copy_into(receiver, load_file(path))


def checkpointer(module: nn.Module, base: str, backend: str, verify: str = "checksum", threads: int = 1):
    from checkpointing import CheckpointConfig, Checkpointer
    from checkpointing.backends.dcp import DCPOptions

    cfg = CheckpointConfig(enable=True, backend=backend, folder="ckpt", interval=1, keep_latest_k=0, verify=verify,
                           dcp=DCPOptions(thread_count=threads))
    return Checkpointer(model_parts=[module], checkpoint_config=cfg, base_folder=base)


# ------------------------------------------------------------------ the run
def run(args) -> list[Result]:
    """``args.repeat`` passes over every operation; each row keeps its fastest pass (the one
    least disturbed by whatever else the machine was doing) and its largest memory peak."""
    state = make_state(args.size_gb, args.tensors, shape=args.shape)
    receiver = {k: torch.zeros_like(v) for k, v in state.items()}
    passes = []
    for i in range(args.repeat):
        print(f"pass {i + 1}/{args.repeat} (load average {os.getloadavg()[0]:.1f})", flush=True)
        passes.append(one_pass(args, state, receiver))
    best = []
    for rows in zip(*passes, strict=True):
        fastest = min(rows, key=lambda r: r.seconds)
        best.append(dataclasses.replace(fastest, peak_rss=max(r.peak_rss for r in rows),
                                        rss_before=min(r.rss_before for r in rows)))
    return best


def one_pass(args, state: dict[str, torch.Tensor], receiver: dict[str, torch.Tensor]) -> list[Result]:
    size = nbytes(state)
    source_module, receiver_module = StateModule(state), StateModule(receiver)
    work = tempfile.mkdtemp(prefix="ckpt-io-bench-", dir=args.dir)
    results: list[Result] = []
    print(f"state: {len(state)} fp32 tensors, {size / GB:.3f} GB; temp dir {work} "
          f"(device {os.stat(work).st_dev:#x}, {shutil.disk_usage(work).free / GB:.0f} GB free)", flush=True)

    def reads(op: str, path: str, load: Callable[[], None]) -> None:
        for cache in ("cold", "warm"):
            zero(receiver)
            if cache == "cold":
                evict(path)
            results.append(timed(op, cache, size, load))
            assert_equal(state, receiver, f"{op} ({cache})")
            print(f"  {op:<24} {cache:<5} {results[-1].seconds:7.3f} s", flush=True)

    def write(op: str, fn: Callable[[], None]) -> None:
        results.append(timed(op, "-", size, fn))
        print(f"  {op:<24} {'-':<5} {results[-1].seconds:7.3f} s", flush=True)

    try:
        raw = os.path.join(work, "raw.bin")
        write("raw write", lambda: raw_write(state, raw))
        reads("raw read", raw, lambda: raw_read(receiver, raw))
        os.remove(raw)

        pt = os.path.join(work, "state.pt")
        write("torch.save", lambda: torch_save(state, pt))
        reads("torch.load", pt, lambda: torch_load(receiver, pt))
        os.remove(pt)

        dcp_base = os.path.join(work, "dcp")
        with checkpointer(source_module, dcp_base, "dcp", threads=args.dcp_threads) as ckpt:
            write("dcp save", lambda: ckpt.save(1))
        step = os.path.join(dcp_base, "ckpt", "step-1")
        for verify in ("checksum", "off"):
            label = "dcp load (checksum)" if verify == "checksum" else "dcp load (verify off)"
            with checkpointer(receiver_module, dcp_base, "dcp", verify=verify) as ckpt:
                reads(label, step, lambda: ckpt.load(step=1))
        shutil.rmtree(dcp_base)

        if importlib.util.find_spec("checkpointing.backends.hf") is not None and not args.skip_hf:
            sf = os.path.join(work, "model.safetensors")
            write("safetensors save", lambda: st_save(state, sf))
            reads("safetensors load", sf, lambda: st_load(receiver, sf))
            os.remove(sf)
            hf_base = os.path.join(work, "hf")
            with checkpointer(source_module, hf_base, "hf") as ckpt:
                write("hf save", lambda: ckpt.save(1))
            with checkpointer(receiver_module, hf_base, "hf") as ckpt:
                reads("hf load (checksum)", os.path.join(hf_base, "ckpt", "step-1"), lambda: ckpt.load(step=1))
            shutil.rmtree(hf_base)
        else:
            print("  (checkpointing.backends.hf not available: hf rows skipped)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return results


# ------------------------------------------------------------------ reporting
def ratio_rows(results: list[Result]) -> list[tuple[Result, str, float | None, float | None]]:
    by_key = {(r.op, r.cache): r for r in results}
    rows = []
    for r in results:
        limit_op, target = TARGETS.get((r.op, r.cache), (None, None))
        limit = by_key.get((limit_op, r.cache)) if limit_op else None
        rows.append((r, limit_op or "", r.seconds / limit.seconds if limit else None, target))
    return rows


def print_table(results: list[Result]) -> bool:
    header = (f"{'operation':<24} {'cache':<5} {'seconds':>8} {'GB/s':>7} {'limit':<17} {'ratio':>6} {'target':>7} "
              f"{'ok':<4} {'peak RSS GB':>11} {'+RSS GB':>8}")
    print("\n" + header + "\n" + "-" * len(header))
    all_ok = True
    for r, limit_op, ratio, target in ratio_rows(results):
        ok = "" if ratio is None else ("yes" if ratio <= target else "NO")
        all_ok &= ok != "NO"
        print(
            f"{r.op:<24} {r.cache:<5} {r.seconds:8.3f} {r.gbps:7.2f} {limit_op:<17} "
            f"{'' if ratio is None else f'{ratio:6.2f}':>6} {'' if target is None else f'<={target:.1f}':>7} {ok:<4} "
            f"{r.peak_rss / GB:11.2f} {r.extra_rss / GB:8.2f}"
        )
    return all_ok


def write_png(results: list[Result], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r.op}" + (f"\n({r.cache})" if r.cache != "-" else "") for r in results]
    colors = ["#888888" if r.op.startswith(("raw", "torch", "safetensors")) else "#1f77b4" for r in results]
    fig, ax = plt.subplots(figsize=(max(8, len(results) * 0.75), 4.8))
    bars = ax.bar(range(len(results)), [r.seconds for r in results], color=colors)
    for bar, r in zip(bars, results, strict=True):
        ax.annotate(f"{r.gbps:.2f} GB/s", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(results)), labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("seconds (lower is better)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=1.0, help="bytes of fp32 state (default 1.0)")
    parser.add_argument("--shape", choices=SHAPES, default="many-small",
                        help="many-small: --tensors tensors of similar sizes; few-large: 4 matrices hold 80%% of the bytes")
    parser.add_argument("--tensors", type=int, default=512, help="number of tensors for many-small (default 512)")
    parser.add_argument("--dir", default=None, help="parent of the temp dir (default: the system temp dir)")
    parser.add_argument("--dcp-threads", type=int, default=1, help="[checkpoint.dcp] thread_count for the save")
    parser.add_argument("--repeat", type=int, default=3, help="passes; each row reports its fastest (default 3)")
    parser.add_argument("--skip-hf", action="store_true", help="leave out the hf / safetensors rows")
    parser.add_argument("--png", default=os.path.join("docs", "benchmarks_checkpoint_io.png"), help="bar chart path")
    args = parser.parse_args(argv)
    if args.size_gb <= 0 or min(args.tensors, args.dcp_threads, args.repeat) < 1:
        parser.error("--size-gb must be > 0; --tensors, --dcp-threads and --repeat >= 1")
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    load_before = os.getloadavg()[0]
    results = run(args)
    ok = print_table(results)
    print(f"\nshape {args.shape}; load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after, on {os.cpu_count()} CPUs")
    by_key = {(r.op, r.cache): r for r in results}
    cold, warm = by_key.get(("raw read", "cold")), by_key.get(("raw read", "warm"))
    if cold and warm:
        print(f"\ncold = files evicted with posix_fadvise(DONTNEED) first: raw read {cold.gbps:.2f} GB/s cold vs "
              f"{warm.gbps:.2f} GB/s warm ({'eviction worked' if cold.seconds > 1.5 * warm.seconds else 'eviction had little effect: cold reads may be from cache'})")
    print("peak RSS: the process's resident memory during the operation (source and receiver state "
          "included); +RSS: the part the operation added")
    n_tensors = args.tensors if args.shape == "many-small" else 64
    title = (f"checkpoint I/O, {args.size_gb:g} GB fp32, {args.shape} ({n_tensors} tensors), best of {args.repeat}, "
             f"torch {torch.__version__}, {os.cpu_count()} CPUs")
    write_png(results, args.png, title)
    print(f"\nchart: {args.png}\ntargets {'met' if ok else 'NOT all met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
