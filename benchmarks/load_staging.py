"""What a staged (all-or-nothing) load costs: one ``Checkpointer.load()`` against a ``copy_`` of
the same bytes, measured in the same process, and the peak RSS the load adds.

A file load reads the whole step aside and writes the receiver only once every byte was read
and checked (``checkpointing/staging.py``); this prints how that compares with a plain memory
copy, for the two model shapes that matter (many small tensors; a few large ones). Run it once
per code version to compare (``PYTHONPATH`` selects the ``src``)::

    python benchmarks/load_staging.py --backend dcp --tensors 2000 --size-gb 0.25
    python benchmarks/load_staging.py --backend hf --tensors 8 --size-gb 0.25
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time

import torch
import torch.nn as nn


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _module(n: int, per: int, fill) -> nn.Module:
    module = nn.Module()
    module.params = nn.ParameterList([nn.Parameter(fill(per // 256, 256)) for _ in range(n)])
    return module


def main() -> None:
    from checkpointing import CheckpointConfig, Checkpointer

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", default="dcp", help="a file backend: dcp, hf (default dcp)")
    parser.add_argument("--tensors", type=int, default=2000, help="number of tensors (default 2000)")
    parser.add_argument("--size-gb", type=float, default=0.25, help="bytes of fp32 state (default 0.25)")
    parser.add_argument("--repeat", type=int, default=5, help="loads; the fastest is reported (default 5)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    per = int(args.size_gb * 1e9) // 4 // args.tensors
    model, receiver = _module(args.tensors, per, torch.randn), _module(args.tensors, per, torch.zeros)
    root = tempfile.mkdtemp()
    cfg = dict(enable=True, backend=args.backend, folder="checkpoint", interval=1, keep_latest_k=0)
    try:
        with Checkpointer(model_parts=[model], checkpoint_config=CheckpointConfig(**cfg), base_folder=root) as writer:
            writer.save(1)
        source = [p.data for p in model.params]
        target = [p.data for p in receiver.params]
        loads, copies, growth = [], [], []
        for _ in range(args.repeat):
            begin = time.perf_counter()
            for dst, src in zip(target, source, strict=True):
                dst.copy_(src)
            copies.append(time.perf_counter() - begin)
            for dst in target:
                dst.zero_()
            _reset_peak_rss()
            rss = _status("VmRSS")
            with Checkpointer(model_parts=[receiver], checkpoint_config=CheckpointConfig(load_only=True, **cfg),
                              base_folder=root) as reader:
                begin = time.perf_counter()
                reader.load()
                loads.append(time.perf_counter() - begin)
            growth.append(_status("VmHWM") - rss)
            assert all(torch.equal(d, s) for d, s in zip(target, source, strict=True)), "not bit-exact"
        nbytes = sum(t.numel() * t.element_size() for t in source)
        print(f"{args.backend} tensors={args.tensors} {nbytes / 1e9:.2f} GB: load {min(loads):.3f} s, memcpy "
              f"{min(copies):.3f} s, ratio {min(loads) / min(copies):.1f}; peak RSS of the first load "
              f"+{growth[0] / 1e6:.0f} MB")
    finally:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
