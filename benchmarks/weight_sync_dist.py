#!/usr/bin/env python
"""Weight-sync benchmark, distributed row: N FSDP2 trainer ranks -> one replicated reader through
the ``dist`` backend (gloo on CPU), as a ratio to a plain collective that moves the same bytes
between the same ranks in the same run.

Every rank is its own process (the trainer ranks in their own gloo world, as under torchrun).
Per repeat, after one warm-up sync (it plans, and allocates the snapshots and the staging):

* **baseline**: every trainer rank sends its shard as one flat buffer to the reader, all at
  once, over a gloo process group on the same ranks: the least any transport can do to move
  those bytes (no snapshot, no versioning, no apply into the model);
* **flat**: the same transfer plus the two copies any flat-buffer handoff needs: each trainer
  rank packs its shard into the flat buffer, the reader unpacks it into its model;
* **sync**: every trainer rank ``save(step)``s (in parallel; the slowest counts), then the reader
  ``load()``s (handshake, receive, apply into its model): what an RL step pays.

``ratio`` is sync / baseline, paired per repeat (a busy moment slows both halves alike), median
over repeats; ``vs flat`` is sync / flat. The reader's own split of each load (handshake,
receive, apply) is reported too: on a loopback link the transfer is itself a kernel memcpy, so
the two copies the guarantees cost (the publisher's snapshot, the reader's staged apply) weigh
far more here than against a real network. Memory: each rank's peak RSS beyond its RSS with the model (and the baseline's
buffers) built, split into what the backend keeps by design (a publisher's snapshot of its own
shard, the reader's staging copy of its own weights) and the transient rest, which must stay
within two buckets.

    python benchmarks/weight_sync_dist.py                          # both shapes, 3 runs each
    python benchmarks/weight_sync_dist.py --shapes large --runs 1 --repeats 3
    python benchmarks/weight_sync.py --methods dist                # the row in the main table
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time

GB = 1e9
SHAPES = {
    # many small tensors: 64 thin layers, ~580 tensors from 512 B to 256 KB
    "small": dict(dim=128, n_layers=64, n_heads=4, n_kv_heads=2, vocab_size=4096),
    # a few large matrices: 2 wide layers and big embeddings, 23 tensors of 8 to 131 MB
    "large": dict(dim=2048, n_layers=2, n_heads=16, n_kv_heads=8, vocab_size=16000),
}
TARGET_RATIO = 1.3
TRANSIENT_BUCKETS = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_model(shape: str, seed: int):
    import dataclasses

    import torch
    from torchtitan.protocols.train_spec import get_train_spec

    base = get_train_spec("llama3").model_args["debugmodel"]
    args = dataclasses.replace(base, **SHAPES[shape], multiple_of=256, ffn_dim_multiplier=None, max_seq_len=256)
    with torch.device("meta"):
        model = get_train_spec("llama3").model_cls(args)
    model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(-0.05, 0.05, generator=g)  # touches every page now, not inside a timing
    return model


def digest(state) -> str:
    import hashlib

    import torch

    h = hashlib.sha256()
    for key, t in sorted(state.items()):
        full = t.full_tensor() if hasattr(t, "full_tensor") else t
        h.update(key.encode())
        h.update(memoryview(full.detach().contiguous().view(torch.uint8).numpy()))
    return h.hexdigest()


# ---------------------------------------------------------------------------- one rank
def rank_main(rank: int, args, ports: dict, results) -> None:
    try:
        results.put((rank, run_rank(rank, args, ports)))
    except BaseException as e:  # the parent reports it
        import traceback

        results.put((rank, {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]}))


def run_rank(rank: int, args, ports: dict) -> dict:
    import datetime

    import torch
    import torch.distributed as dist
    from weight_sync import proc_status, reset_peak

    from checkpointing import CheckpointConfig, Checkpointer
    from checkpointing._compat import standalone_process_group
    from checkpointing.backends.dist import DistOptions

    torch.set_num_threads(args.threads)
    n = args.trainers
    reader = rank == n
    model = build_model(args.shape, seed=0 if not reader else 1)
    if not reader:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{ports['trainer']}", rank=rank, world_size=n)
        mesh = init_device_mesh("cpu", (n,))
        for block in model.layers.values():
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    state = model.state_dict()
    local = [v.to_local() if hasattr(v, "to_local") else v for v in state.values()]
    own_bytes = sum(t.numel() * t.element_size() for t in local)

    # The baseline's group: the same ranks, the same kind of process group as the backend's.
    store = dist.TCPStore("127.0.0.1", ports["baseline"], n + 1, reader, datetime.timedelta(seconds=300))
    group = standalone_process_group("gloo", dist.PrefixStore("baseline/", store), rank, n + 1, datetime.timedelta(seconds=300), torch.device("cpu"))
    shard_bytes = [torch.zeros(1, dtype=torch.int64) for _ in range(n)]
    if reader:
        for s in range(n):
            group.recv([shard_bytes[s]], s, 0).wait()
    else:
        group.send([torch.tensor([own_bytes])], n, 0).wait()
    flat = torch.zeros(int(sum(int(b) for b in shard_bytes)) if reader else own_bytes, dtype=torch.uint8)

    def barrier() -> None:
        group.barrier().wait()

    sources = [t.detach() for t in local]
    views, at = [], 0
    for t in sources:
        views.append(flat[at : at + t.numel() * t.element_size()].view(t.dtype).view(t.shape))
        at += t.numel() * t.element_size()

    def baseline(pack: bool = False) -> float:
        barrier()
        begin = time.perf_counter()
        if pack and not reader:
            torch._foreach_copy_(views, sources)
        if reader:
            works, at = [], 0
            for s in range(n):
                size = int(shard_bytes[s])
                works.append(group.recv([flat[at : at + size]], s, 1))
                at += size
            for w in works:
                w.wait()
            if pack:
                torch._foreach_copy_(sources, views)
        else:
            group.send([flat], n, 1).wait()
        return time.perf_counter() - begin

    options = DistOptions(
        init_method=f"tcp://127.0.0.1:{ports['sync']}", publishers=n, bucket_size_mb=args.bucket_mb,
        keep_versions=1, timeout_s=120.0, join_timeout_s=300.0,
    )
    config = CheckpointConfig(enable=True, backend="dist", interval=1, keep_latest_k=0, load_only=reader, dist=options)
    ckpt = Checkpointer(model_parts=[model], checkpoint_config=config)
    first = local[0]

    def sync(step: int) -> float:
        barrier()
        begin = time.perf_counter()
        if not reader:
            with torch.no_grad():
                first.add_(1.0)  # a new version each time
            ckpt.save(step)
        seconds = time.perf_counter() - begin
        barrier()  # every trainer rank has published
        if reader:
            begin = time.perf_counter()
            assert ckpt.load() is True and ckpt.loaded_step == step, ckpt.loaded_step
            seconds = time.perf_counter() - begin
        barrier()
        return seconds

    base_rss = proc_status()["VmRSS"]
    reset_peak()
    step = 1
    first_sync = sync(step)
    baselines, flats, syncs, parts = [], [], [], []
    for _ in range(args.repeats):
        baselines.append(baseline())
        flats.append(baseline(pack=True))
        step += 1
        syncs.append(sync(step))
        if reader:
            parts.append(dict(ckpt.backend.reader().last_seconds))
    status = proc_status()
    backend = ckpt.backend
    side = backend.publisher() if not reader else backend.reader()
    persistent = side.kept_bytes
    out = {
        "rank": rank,
        "role": "reader" if reader else "publisher",
        "own_bytes": own_bytes,
        "tensors": len(state),
        "first_s": first_sync,
        "baseline_s": baselines,
        "flat_s": flats,
        "sync_s": syncs,
        "parts": parts,
        "extra_bytes": status["VmHWM"] - base_rss,
        "persistent_bytes": persistent,
        "plans": backend.plans_computed,
        "threads": torch.get_num_threads(),
    }
    barrier()
    if reader or rank == 0:
        out["digest"] = digest(state)  # collective among the trainer ranks: all of them call it
    elif not reader:
        digest(state)
    ckpt.close()
    barrier()
    if not reader:
        dist.destroy_process_group()
    return out


# ---------------------------------------------------------------------------- one run
def run_once(args) -> dict:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    ports = {"trainer": free_port(), "sync": free_port(), "baseline": free_port()}
    results = ctx.Queue()
    env_path = os.path.dirname(os.path.abspath(__file__))
    if env_path not in sys.path:
        sys.path.insert(0, env_path)
    procs = [ctx.Process(target=rank_main, args=(r, args, ports, results)) for r in range(args.trainers + 1)]
    for p in procs:
        p.start()
    got = {}
    deadline = time.monotonic() + 1800
    while len(got) < len(procs) and time.monotonic() < deadline:
        try:
            rank, out = results.get(timeout=1.0)
        except Exception:
            if any(p.exitcode not in (None, 0) for p in procs):
                break
            continue
        got[rank] = out
    for p in procs:
        p.join(60)
        if p.is_alive():
            p.kill()
    errors = {r: o for r, o in got.items() if "error" in o}
    if errors or len(got) < len(procs):
        return {"method": "dist", "error": str(errors or f"ranks exited: {[p.exitcode for p in procs]}")[:300]}
    return summarize(args, got)


def summarize(args, ranks: dict[int, dict]) -> dict:
    n = args.trainers
    reader = ranks[n]
    publishers = [ranks[r] for r in range(n)]
    syncs = [max(p["sync_s"][i] for p in publishers) + reader["sync_s"][i] for i in range(args.repeats)]
    ratios = [s / b for s, b in zip(syncs, reader["baseline_s"], strict=True)]
    vs_flat = [s / f for s, f in zip(syncs, reader["flat_s"], strict=True)]
    parts = {k: statistics.median(p[k] for p in reader["parts"]) for k in reader["parts"][0]}
    bucket = int(args.bucket_mb * (1 << 20))
    per_rank = []
    for r in sorted(ranks):
        o = ranks[r]
        transient = max(0, o["extra_bytes"] - o["persistent_bytes"])
        per_rank.append({
            "rank": r, "role": o["role"], "own_bytes": o["own_bytes"], "extra_bytes": o["extra_bytes"],
            "persistent_bytes": o["persistent_bytes"], "transient_bytes": transient, "transient_buckets": transient / bucket,
        })
    model_bytes = reader["own_bytes"]
    return {
        "method": "dist",
        "shape": args.shape,
        "trainers": n,
        "model_bytes": model_bytes,
        "tensors": reader["tensors"],
        "bucket_bytes": bucket,
        "seconds": statistics.median(syncs),
        "min_s": min(syncs),
        "baseline_s": statistics.median(reader["baseline_s"]),
        "publish_s": statistics.median(max(p["sync_s"][i] for p in publishers) for i in range(args.repeats)),
        "load_s": statistics.median(reader["sync_s"]),
        "first_s": max(p["first_s"] for p in publishers) + reader["first_s"],
        "ratio": statistics.median(ratios),
        "ratios": ratios,
        "flat_s": statistics.median(reader["flat_s"]),
        "vs_flat": statistics.median(vs_flat),
        "load_parts": parts,
        "per_rank": per_rank,
        "extra_bytes": max(o["extra_bytes"] for o in ranks.values()),
        "peak_rss": 0,
        "plans": [ranks[r]["plans"] for r in sorted(ranks)],
        "correct": reader["digest"] == ranks[0]["digest"],
        "threads": reader["threads"],
        "loadavg": os.getloadavg()[0],
        "memcpy_s": 0.0,
        "memcpy_min_s": 0.0,
    }


def verdicts(r: dict) -> list[str]:
    """The checks of one dist row, as the main table prints them."""
    out = [f"<= {TARGET_RATIO}x collective {'OK' if r['ratio'] <= TARGET_RATIO else 'MISSED'}"]
    worst = max(p["transient_buckets"] for p in r["per_rank"])
    out.append(f"transient <= {TRANSIENT_BUCKETS} buckets {'OK' if worst <= TRANSIENT_BUCKETS else 'MISSED'} ({worst:.2f})")
    out.append("planned once" if all(p == 1 for p in r["plans"]) else f"PLANNED {r['plans']}")
    out.append("bit-exact" if r["correct"] else "WRONG WEIGHTS")
    return out


def row_lines(r: dict) -> list[str]:
    """Per-rank memory of one run: what the backend keeps by design, and the transient rest."""
    lines = [
        f"dist {r['shape']}: {r['trainers']} FSDP2 trainer ranks -> 1 reader, {r['tensors']} tensors, {r['model_bytes'] / GB:.3f} GB, "
        f"bucket {r['bucket_bytes'] >> 20} MiB: sync {r['seconds']:.3f} s (save {r['publish_s']:.3f} + load {r['load_s']:.3f}), "
        f"plain collective {r['baseline_s']:.3f} s, ratio {r['ratio']:.2f}x (per repeat {', '.join(f'{x:.2f}' for x in r['ratios'])}); "
        f"flat-buffer handoff (pack + collective + unpack) {r['flat_s']:.3f} s, {r['vs_flat']:.2f}x of it; "
        f"load = " + " + ".join(f"{k} {v:.3f}" for k, v in r["load_parts"].items()) + "; "
        f"first sync (plans, allocates) {r['first_s']:.3f} s; " + "; ".join(verdicts(r))
    ]
    for p in r["per_rank"]:
        lines.append(
            f"  rank {p['rank']} {p['role']:<9} own weights {p['own_bytes'] / 1e6:8.1f} MB  extra {p['extra_bytes'] / 1e6:8.1f} MB = "
            f"kept {p['persistent_bytes'] / 1e6:8.1f} MB ({'snapshot' if p['role'] == 'publisher' else 'staging'}) + transient "
            f"{p['transient_bytes'] / 1e6:6.1f} MB ({p['transient_buckets']:.2f} buckets)"
        )
    return lines


def worker_result(args) -> dict:
    """The main table's row (``weight_sync.py --methods dist``): the large shape, one run. Its
    "x memcpy" column is the ratio to the plain collective (this row's baseline)."""
    shape_args = argparse.Namespace(shape="large", trainers=2, bucket_mb=min(args.bucket_mb, 64), repeats=min(args.repeats, 5),
                                    threads=args.threads or 1)
    row = run_once(shape_args)
    if "error" not in row:
        row["verdicts"] = verdicts(row) + [f"ratio is to a plain collective of the same bytes ({row['baseline_s']:.3f} s)"]
    return row


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["small", "large"], choices=sorted(SHAPES))
    p.add_argument("--runs", type=int, default=3, help="independent runs per shape (fresh processes each)")
    p.add_argument("--repeats", type=int, default=5, help="paired baseline/sync measurements per run")
    p.add_argument("--trainers", type=int, default=2, help="FSDP2 trainer ranks (publishers)")
    p.add_argument("--bucket-mb", type=float, default=64.0)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads per rank")
    p.add_argument("--json", help="also write the raw results here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    all_rows = []
    for shape in args.shapes:
        rows = []
        for run in range(args.runs):
            print(f"running dist {shape} run {run + 1}/{args.runs} ...", file=sys.stderr, flush=True)
            r = run_once(argparse.Namespace(**{**vars(args), "shape": shape}))
            rows.append(r)
            if "error" in r:
                print(f"dist {shape}: n/a: {r['error']}")
                continue
            print("\n".join(row_lines(r)), flush=True)
        ok = [r for r in rows if "error" not in r]
        if ok:
            ratios = [r["ratio"] for r in ok]
            flats = [r["vs_flat"] for r in ok]
            transient = [max(p["transient_buckets"] for p in r["per_rank"]) for r in ok]
            print(
                f"== dist {shape}: ratio to the plain collective {min(ratios):.2f}-{max(ratios):.2f}x over {len(ok)} runs "
                f"(target <= {TARGET_RATIO}x), {min(flats):.2f}-{max(flats):.2f}x a flat-buffer handoff; sync {min(r['seconds'] for r in ok):.3f}-{max(r['seconds'] for r in ok):.3f} s; "
                f"transient memory {min(transient):.2f}-{max(transient):.2f} buckets (target <= {TRANSIENT_BUCKETS}); "
                f"bit-exact {all(r['correct'] for r in ok)}; load avg {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
            )
        all_rows += rows
    if args.json:
        with open(args.json, "w") as f:
            json.dump(all_rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    sys.exit(main())
