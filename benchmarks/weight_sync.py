#!/usr/bin/env python
"""Weight-sync benchmark: one trainer -> generator handoff per method, as ratios to a plain
memcpy of the same bytes measured in the same run (and in the same process).

A *handoff* is what an RL step pays to move fresh weights into the generator's model:
``trainer.save(step)`` + ``generator.load()`` through the Checkpointer for the backends (the
generator's Checkpointer is ``load_only``, as the RL generator's is, so the memory backends hand
over by adoption: one copy into the snapshot, none out of it), or
``safetensors.save_file`` to a temp dir + ``load_file`` + copy into the model for the old file
round trip (page cache, no fsync). The model is a TorchTitan llama3 with synthetic sizes and
random weights, in one of two shapes (``--shape``): ``few-large`` (dim 1024, vocab 32000, as many
layers as ``--size-gb`` asks for: ~1 GB fp32 is 17 layers, 156 tensors) or ``many-small`` (dim
256, vocab 8000: ~1 GB is ~330 layers, ~3000 tensors).

Every method runs in a fresh worker process so its memory is its own: the worker records its
resident set after building both models, resets the kernel's high-water mark there, and reports
how much the handoffs added on top (``extra``). ``memory/shm`` loads in a *second* process (a
real generator process); its extra is its own private memory, the shared snapshot pages being
counted once, in the publisher. After warm-up handoffs that touch every slot of the channel
(allocating and mapping each snapshot buffer once, as the first steps of a run do), each of
``--repeats`` handoffs is timed right after a memcpy in the same worker, and the ratio
reported is the median of those paired ratios: on a shared, busy machine a slow moment slows
both halves of a pair alike. The speed-up over the file round trip is likewise a ratio of
ratios, never seconds from two different workers.

    python benchmarks/weight_sync.py                      # ~1 GB, all methods, PNG to docs/
    python benchmarks/weight_sync.py --threads 0          # torch's default intra-op threads
    python benchmarks/weight_sync.py --size-gb 0.25 --methods memcpy memory/local
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

METHODS = ["memcpy", "memory/local", "memory/local->bf16", "memory/shm", "dcp", "hf", "file", "dist"]
OWN_MODULE = {"dist": "weight_sync_dist"}
"""Methods measured by a module of their own (several processes, another baseline): it returns
the row, with its own ``verdicts``."""
SLOW = {"dcp", "hf", "file"}
GB = 1e9


# ---------------------------------------------------------------------------- model
SHAPES = ("few-large", "many-small")


def model_args(size_gb: float, shape: str = "few-large"):
    """TorchTitan llama3 args whose fp32 weights come to about ``size_gb``."""
    import dataclasses

    from torchtitan.protocols.train_spec import get_train_spec

    base = get_train_spec("llama3").model_args["debugmodel"]
    if shape == "many-small":
        dim, vocab, heads, kv_heads = 256, 8000, 4, 2
    else:
        dim, vocab, heads, kv_heads = (1024, 32000, 16, 8) if size_gb >= 0.4 else (512, 8000, 8, 4)
    hidden = 256 * ((int(2 * 4 * dim / 3) + 255) // 256)
    per_layer = 4 * (2 * dim * dim + 2 * dim * (dim // heads) * kv_heads + 3 * dim * hidden + 2 * dim)
    embeddings = 4 * (2 * vocab * dim + dim)
    layers = max(1, round((size_gb * GB - embeddings) / per_layer))
    return dataclasses.replace(
        base, dim=dim, n_layers=layers, n_heads=heads, n_kv_heads=kv_heads, vocab_size=vocab,
        multiple_of=256, ffn_dim_multiplier=None, max_seq_len=2048,
    )


def build_model(size_gb: float, dtype, seed: int, shape: str = "few-large"):
    import torch
    from torchtitan.protocols.train_spec import get_train_spec

    args = model_args(size_gb, shape)
    with torch.device("meta"):
        model = get_train_spec("llama3").model_cls(args)
    model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(-0.05, 0.05, generator=g)  # touches every page now, not inside a timing
    model.model_args = args
    if dtype != torch.float32:
        rope = model.freqs_cis  # a complex buffer: .to(bf16) would drop its imaginary part
        model.to(dtype)
        model.freqs_cis = rope
    return model


# ---------------------------------------------------------------------------- memory accounting
def proc_status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if value.strip().endswith("kB"):
                out[key] = int(value.split()[0]) * 1024
    return out


def reset_peak() -> None:
    """Make VmHWM start again from the current RSS (Linux: ``echo 5 > /proc/self/clear_refs``)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


# ---------------------------------------------------------------------------- methods
def memory_config(channel: str, transport: str, dtype: str, keep: int, bucket_mb: int):
    from checkpointing import CheckpointConfig
    from checkpointing.backends.memory import MemoryOptions

    memory = MemoryOptions(transport=transport, channel=channel, dtype=dtype, keep_versions=keep, bucket_size_mb=bucket_mb)
    return CheckpointConfig(enable=True, backend="memory", interval=1, keep_latest_k=0, memory=memory)


def file_config(backend: str):
    from checkpointing import CheckpointConfig

    return CheckpointConfig(enable=True, backend=backend, folder="checkpoint", interval=1, keep_latest_k=2)


class Handoff:
    """One method: ``run(step)`` moves the trainer's weights into the generator's model."""

    snapshot_bytes = 0

    def run(self, step: int) -> dict[str, float]:
        raise NotImplementedError

    def close(self) -> dict:
        return {}


class CheckpointerHandoff(Handoff):
    def __init__(self, trainer, generator, config, base_folder: str = "", sd_adapter=None):
        import dataclasses

        from checkpointing import Checkpointer

        reader = dataclasses.replace(config, load_only=True)  # a generator, as the RL generator's is
        self.pub = Checkpointer(model_parts=[trainer], checkpoint_config=config, base_folder=base_folder, sd_adapter=sd_adapter)
        self.sub = Checkpointer(model_parts=[generator], checkpoint_config=reader, base_folder=base_folder, sd_adapter=sd_adapter)

    def run(self, step: int) -> dict[str, float]:
        t0 = time.perf_counter()
        self.pub.save(step)
        t1 = time.perf_counter()
        assert self.sub.load() and self.sub.loaded_step == step
        t2 = time.perf_counter()
        return {"publish": t1 - t0, "load": t2 - t1}

    def load_path(self) -> str:
        return self.sub.stats.last_load_path

    def close(self) -> dict:
        self.sub.close()
        self.pub.close()
        return {}


class ShmHandoff(Handoff):
    """Publisher here, generator in another process that loads when told to."""

    def __init__(self, trainer, config, args):
        from checkpointing import Checkpointer

        self.pub = Checkpointer(model_parts=[trainer], checkpoint_config=config, base_folder="")
        cmd = [sys.executable, os.path.abspath(__file__), "--shm-reader", config.memory.channel, "--size-gb", str(args.size_gb),
               "--threads", str(args.threads), "--keep-versions", str(args.keep_versions), "--bucket-mb", str(args.bucket_mb),
               "--shape", args.shape]
        self.reader = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        self._ask("ready")

    def _ask(self, command: str) -> dict:
        self.reader.stdin.write(command + "\n")
        self.reader.stdin.flush()
        line = self.reader.stdout.readline()
        if not line:
            raise RuntimeError(f"shm reader process died (exit {self.reader.wait()})")
        return json.loads(line)

    def run(self, step: int) -> dict[str, float]:
        t0 = time.perf_counter()
        self.pub.save(step)
        t1 = time.perf_counter()
        answer = self._ask("load")
        t2 = time.perf_counter()
        assert answer["step"] == step, answer
        self._path = answer["path"]
        return {"publish": t1 - t0, "load": t2 - t1, "load_in_reader": answer["seconds"]}

    def load_path(self) -> str:
        return self._path

    def digest(self) -> str:
        return self._ask("digest")["digest"]

    def close(self) -> dict:
        stats = self._ask("quit")
        self.reader.wait(60)
        self.pub.close()
        return {"reader": stats}


class FileRoundTrip(Handoff):
    """The old way: safetensors to a temp dir, read back, copy into the model (no fsync)."""

    def __init__(self, trainer, generator):
        self.src = trainer.state_dict()
        self.dst = generator.state_dict()
        self.dir = tempfile.mkdtemp(prefix="weight-sync-file-")

    def run(self, step: int) -> dict[str, float]:
        import torch
        from safetensors.torch import load_file, save_file

        path = os.path.join(self.dir, "model.safetensors")
        t0 = time.perf_counter()
        save_file({k: v.detach() for k, v in self.src.items()}, path)
        t1 = time.perf_counter()
        loaded = load_file(path)
        with torch.no_grad():
            for k, t in self.dst.items():
                t.copy_(loaded[k])
        del loaded
        t2 = time.perf_counter()
        return {"publish": t1 - t0, "load": t2 - t1}

    def close(self) -> dict:
        import shutil

        shutil.rmtree(self.dir, ignore_errors=True)
        return {}


def make_handoff(method: str, trainer, generator, args, tmp: str) -> Handoff:
    channel = f"bench{uuid.uuid4().hex[:10]}"
    if method == "memory/local":
        return CheckpointerHandoff(trainer, generator, memory_config(channel, "local", "auto", args.keep_versions, args.bucket_mb))
    if method == "memory/local->bf16":
        return CheckpointerHandoff(trainer, generator, memory_config(channel, "local", "bfloat16", args.keep_versions, args.bucket_mb))
    if method == "memory/shm":
        return ShmHandoff(trainer, memory_config(channel, "shm", "auto", args.keep_versions, args.bucket_mb), args)
    if method == "dcp":
        return CheckpointerHandoff(trainer, generator, file_config("dcp"), base_folder=tmp)
    if method == "hf":
        from torchtitan.protocols.train_spec import get_train_spec

        adapter = get_train_spec("llama3").state_dict_adapter(trainer.model_args, None)
        return CheckpointerHandoff(trainer, generator, file_config("hf"), base_folder=tmp, sd_adapter=adapter)
    if method == "file":
        return FileRoundTrip(trainer, generator)
    raise ValueError(method)


# ---------------------------------------------------------------------------- worker
def worker(method: str, args) -> dict:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    bf16 = method.endswith("->bf16")
    trainer = build_model(args.size_gb, torch.float32, seed=0, shape=args.shape)
    generator = (
        None if method == "memory/shm" else build_model(args.size_gb, torch.bfloat16 if bf16 else torch.float32, seed=1, shape=args.shape)
    )
    src = list(trainer.state_dict().values())
    # The memcpy baseline: fp32 into fp32 tensors of the same shapes (the generator's own,
    # unless the generator is bf16 or lives in another process).
    dst = list(generator.state_dict().values()) if generator is not None and not bf16 else [torch.empty_like(t) for t in src]
    model_bytes = sum(t.numel() * t.element_size() for t in src)

    def memcpy() -> float:
        t0 = time.perf_counter()
        with torch.no_grad():
            for d, s in zip(dst, src, strict=True):
                d.copy_(s)
        return time.perf_counter() - t0

    memcpy()
    tmp = tempfile.mkdtemp(prefix="weight-sync-")
    handoff = None if method == "memcpy" else make_handoff(method, trainer, generator, args, tmp)
    base_rss = proc_status()["VmRSS"]
    reset_peak()
    repeats = min(args.repeats, 3) if method in SLOW else args.repeats
    copies, runs = [], []
    step = 0
    if handoff is not None:
        # Warm-up: every slot of a memory channel (keep_versions + the spare) is allocated and
        # mapped once, as in the first steps of a run; the first handoff's cost is reported apart.
        warmups = [handoff.run(step := step + 1) for _ in range(args.keep_versions + 1 if method.startswith("memory/") else 1)]
        first = warmups[0]
    for _ in range(repeats):
        copies.append(memcpy())
        if handoff is not None:
            with torch.no_grad():
                src[0].add_(1.0)  # a new version each time
            step += 1
            t0 = time.perf_counter()
            parts = handoff.run(step)
            parts["total"] = time.perf_counter() - t0
            runs.append(parts)
    status = proc_status()
    result = {
        "method": method,
        "model_bytes": model_bytes,
        "tensors": len(src),
        "memcpy_s": statistics.median(copies),
        "memcpy_min_s": min(copies),
        "peak_rss": status["VmHWM"],
        "extra_bytes": status["VmHWM"] - base_rss,
        "threads": torch.get_num_threads(),
        "loadavg": os.getloadavg()[0],
    }
    if handoff is not None:
        result["first_s"] = sum(first.values())
        for key in runs[0]:
            result[f"{key}_s"] = statistics.median(r[key] for r in runs)
        result["seconds"] = result["total_s"]
        result["min_s"] = min(r["total"] for r in runs)
        # Each handoff against the memcpy timed just before it: a busy machine slows both alike.
        result["ratio"] = statistics.median(r["total"] / c for r, c in zip(runs, copies, strict=True))
        result["correct"] = _check(method, trainer, generator, handoff)
        result["load_path"] = handoff.load_path() if isinstance(handoff, (CheckpointerHandoff, ShmHandoff)) else "copy"
        result.update(handoff.close())
        if "reader" in result:  # its private memory; the shared snapshot is counted above
            reader = result["reader"]
            result["extra_bytes"] += reader["extra_bytes"]
    else:
        result["seconds"], result["min_s"], result["ratio"] = result["memcpy_s"], min(copies), 1.0
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    return result


def _check(method: str, trainer, generator, handoff) -> bool:
    """The last handoff really moved the last version (bit-exact, or exactly cast to bf16)."""
    import torch

    if method == "memory/shm":
        return handoff.digest() == digest(trainer)
    dst = generator.state_dict()
    return all(torch.equal(dst[k], v.to(dst[k].dtype)) for k, v in trainer.state_dict().items())


def digest(model) -> str:
    import hashlib

    import torch

    h = hashlib.sha256()
    for k, t in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(memoryview(t.detach().contiguous().view(torch.uint8).numpy()))
    return h.hexdigest()


def shm_reader(channel: str, args) -> None:
    """The generator process for memory/shm: load on ``load``, report on ``quit``."""
    import torch

    from checkpointing import Checkpointer

    if args.threads:
        torch.set_num_threads(args.threads)
    import dataclasses

    generator = build_model(args.size_gb, torch.float32, seed=1, shape=args.shape)
    config = dataclasses.replace(memory_config(channel, "shm", "auto", args.keep_versions, args.bucket_mb), load_only=True)
    reader = Checkpointer(model_parts=[generator], checkpoint_config=config, base_folder="")
    base_rss = proc_status()["VmRSS"]
    reset_peak()
    for line in sys.stdin:
        command = line.strip()
        if command == "ready":
            answer = {}
        elif command == "load":
            t0 = time.perf_counter()
            loaded = reader.load()
            answer = {"step": reader.loaded_step if loaded else None, "seconds": time.perf_counter() - t0,
                      "path": reader.stats.last_load_path}
        elif command == "digest":
            answer = {"digest": digest(generator)}
        else:
            status = proc_status()
            shared = status.get("RssShmem", 0)
            answer = {"peak_rss": status["VmHWM"], "shared_bytes": shared, "extra_bytes": status["VmHWM"] - base_rss - shared}
        print(json.dumps(answer), flush=True)
        if command == "quit":
            break
    reader.close()


# ---------------------------------------------------------------------------- report
TARGETS = {  # issue 14: single-copy handoff
    "memory/local": ("ratio", 1.2),
    "memory/local->bf16": ("ratio", 1.0),  # against the fp32 memcpy
    "memory/shm": ("ratio", 1.3),
}
FILE_SPEEDUP = 10.0
"""A memory handoff must be at least this much faster than the old file round trip."""
SNAPSHOTS = 2
"""Extra memory a memory handoff may add, in snapshots of the published dtype."""


BUSY = 1.5
"""A worker whose best memcpy is this much slower than the memcpy worker's best ran while the
shared machine was busy: its ratios are flagged, and not used to compare against other rows."""


def report(results: list[dict], args) -> list[str]:
    base = next((r for r in results if r["method"] == "memcpy" and "min_s" in r), None)
    for r in results:
        r["busy"] = bool(base and "memcpy_min_s" in r and r["memcpy_min_s"] > BUSY * base["memcpy_min_s"])
    file_row = next((r for r in results if r["method"] == "file" and "ratio" in r), None)
    file_ratio = file_row["ratio"] if file_row and not file_row["busy"] else None
    lines = []
    size = results[0]["model_bytes"]
    lines.append(
        f"model: TorchTitan llama3 ({args.shape}), {results[0]['tensors']} tensors, {size / GB:.2f} GB fp32; torch threads "
        f"{results[0]['threads']}; repeats {args.repeats} (3 for dcp/hf/file); keep_versions {args.keep_versions}, "
        f"bucket {args.bucket_mb} MB; load avg {_load_range(results)}"
    )
    head = (f"{'method':<20}{'seconds':>9}{'best':>8}{'GB/s':>7}{'x memcpy':>10}{'vs file':>9}{'publish':>9}{'load':>8}"
            f"{'peak RSS GB':>13}{'extra GB':>10}  check")
    lines += [head, "-" * len(head)]
    for r in results:
        if "error" in r:
            lines.append(f"{r['method']:<20}  n/a: {r['error']}")
            continue
        s = r["seconds"]
        # Across workers, compare ratios (each to its own worker's memcpy), not raw seconds.
        r["speedup_vs_file"] = file_ratio / r["ratio"] if file_ratio else None
        verdicts = []
        target = TARGETS.get(r["method"])
        if target:
            verdicts.append(f"<= {target[1]}x memcpy {'OK' if r['ratio'] <= target[1] else 'MISSED'}")
        if r["method"].startswith("memory/"):
            if file_ratio:
                verdicts.append(f">= {FILE_SPEEDUP:g}x file {'OK' if r['speedup_vs_file'] >= FILE_SPEEDUP else 'MISSED'}")
            # + 2 buckets, as before: the transient gather memory of a sharded publisher
            allowed = SNAPSHOTS * size // (2 if r["method"].endswith("bf16") else 1) + 2 * (args.bucket_mb << 20)
            verdicts.append(f"extra <= {SNAPSHOTS} snapshots {'OK' if r['extra_bytes'] <= allowed else 'MISSED'}")
            if "load_path" in r:
                verdicts.append(f"load path {r['load_path']}")
        if "verdicts" in r:  # a row measured by its own module judges itself
            verdicts = list(r["verdicts"])
        elif "correct" in r:
            verdicts.append("bit-exact" if r["correct"] else "WRONG WEIGHTS")
        if r["busy"]:
            verdicts.insert(0, f"BUSY (its memcpy {r['memcpy_min_s']:.3f} s): rerun")
        vs_file = f"{r['speedup_vs_file']:.1f}x" if r.get("speedup_vs_file") else "-"
        pub = f"{r['publish_s']:.3f}" if "publish_s" in r else "-"
        load = f"{r['load_s']:.3f}" if "load_s" in r else "-"
        lines.append(
            f"{r['method']:<20}{s:>9.3f}{r['min_s']:>8.3f}{r.get('model_bytes', size) / s / GB:>7.2f}{r['ratio']:>10.2f}{vs_file:>9}{pub:>9}{load:>8}"
            f"{r['peak_rss'] / GB:>13.2f}{r['extra_bytes'] / GB:>10.2f}  {'; '.join(verdicts)}"
        )
    if base:
        lines.append(
            f"memcpy baseline (its own worker): {base['seconds']:.3f} s = {size / base['seconds'] / GB:.1f} GB/s. seconds: median "
            "handoff; best: fastest; x memcpy: median of each handoff / the memcpy timed just before it in the same worker; "
            "vs file: the file round trip's ratio / this ratio (n/a when the file row ran while the machine was busy)"
        )
    return lines


def _load_range(results: list[dict]) -> str:
    loads = [r["loadavg"] for r in results if "loadavg" in r] or [os.getloadavg()[0]]
    return f"{min(loads):.1f}-{max(loads):.1f} on {os.cpu_count()} CPUs"


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if "seconds" in r]
    names = [r["method"] for r in ok]
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.5))
    colors = ["#888888" if n == "memcpy" else "#2a7ab0" if n.startswith("memory/") else "#c0504d" for n in names]
    a.bar(names, [r["seconds"] for r in ok], color=colors)
    a.set_yscale("log")
    a.set_ylabel("seconds per handoff (log)")
    a.set_title(f"one handoff of {ok[0]['model_bytes'] / GB:.2f} GB (publish + load)")
    b.bar(names, [r["ratio"] for r in ok], color=colors)
    b.set_yscale("log")
    b.set_ylabel("x memcpy of the same bytes (log)")
    b.set_title("ratio to a memcpy measured in the same worker")
    for axis in (a, b):
        axis.tick_params(axis="x", rotation=30)
        for label in axis.get_xticklabels():
            label.set_horizontalalignment("right")
    for x, r in enumerate(ok):
        b.annotate(f"{r['ratio']:.2f}x", (x, r["ratio"]), ha="center", va="top", fontsize=8, color="white", xytext=(0, -3), textcoords="offset points")
        target = TARGETS.get(r["method"])
        if target:  # the limit for this method, as a dash over its bar
            b.hlines(target[1], x - 0.4, x + 0.4, colors="black", linestyles="dashed", linewidth=1)
            b.annotate(f"target {target[1]}x", (x, target[1]), ha="center", va="bottom", fontsize=7, xytext=(0, 2), textcoords="offset points")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)


def run_worker(method: str, args) -> dict:
    if method in OWN_MODULE:
        import importlib

        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        return importlib.import_module(OWN_MODULE[method]).worker_result(args)
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", method, "--size-gb", str(args.size_gb),
           "--repeats", str(args.repeats), "--keep-versions", str(args.keep_versions), "--bucket-mb", str(args.bucket_mb),
           "--threads", str(args.threads), "--shape", args.shape]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"method": method, "error": tail[:160]}
    return json.loads(lines[-1])


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-gb", type=float, default=1.0, help="fp32 model size (default 1.0)")
    p.add_argument("--repeats", type=int, default=7, help="timed handoffs per method (3 at most for dcp/hf/file)")
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    p.add_argument("--shape", choices=SHAPES, default="few-large",
                   help="few-large: dim 1024 (~150 tensors per GB); many-small: dim 256 (~3000 tensors per GB)")
    p.add_argument("--keep-versions", type=int, default=1, help="[checkpoint.memory] keep_versions (default 1: one snapshot)")
    p.add_argument("--bucket-mb", type=int, default=256, help="[checkpoint.memory] bucket_size_mb")
    p.add_argument(
        "--threads", type=int, default=1,
        help="torch intra-op threads for every copy, memcpy included (default 1: on a small machine shared with other "
        "jobs a 2-thread copy stalls whenever one of its threads is descheduled, and one thread already streams "
        "~17 GB/s here; 0: torch's default)",
    )
    p.add_argument("--png", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs", "benchmarks_weight_sync.png"))
    p.add_argument("--json", help="also write the raw results here")
    p.add_argument("--from-json", help="print the table and draw the chart of an earlier --json run, measuring nothing")
    p.add_argument("--vllm", action="store_true", help="also the vLLM rows (weight_sync_vllm.py, its own table and chart)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--shm-reader", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args)), flush=True)
        return 0
    if args.shm_reader:
        shm_reader(args.shm_reader, args)
        return 0
    if args.from_json:
        with open(args.from_json) as f:
            results = json.load(f)["results"]
    else:
        results = []
        for method in ["memcpy"] + [m for m in args.methods if m != "memcpy"]:
            print(f"running {method} ...", file=sys.stderr, flush=True)
            results.append(run_worker(method, args))
    lines = report(results, args)
    print("\n".join(lines))
    if args.json and not args.from_json:
        with open(args.json, "w") as f:
            json.dump({"results": results, "table": lines}, f, indent=1)
    if any("seconds" in r for r in results):
        plot(results, args.png)
        print(f"chart: {os.path.normpath(args.png)}")
    if args.vllm and not args.from_json:
        import weight_sync_vllm

        weight_sync_vllm.main(["--repeats", str(min(args.repeats, 5))])
    return 0


if __name__ == "__main__":
    sys.exit(main())
