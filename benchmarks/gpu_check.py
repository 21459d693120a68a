"""GPU smoke check and handoff timing: the same Checkpointer API with CUDA tensors.

Run on a machine with one CUDA device (CI has none; this is a manual check):

    python benchmarks/gpu_check.py --size-gb 1

1. memory/local: a CUDA fp32 "trainer" model publishes, a CUDA receiver loads in place (fp32, and
   bf16), bit-exact, timed against a device-to-device ``dst.copy_(src)`` of the same tensors.
2. dcp and hf: a CUDA model saves (sync, and async_with_pinned_mem for dcp, which stages into
   pinned host memory) and loads back bit-exact onto CUDA.
Prints one line per check with PASS/FAIL and the ratio to the device memcpy.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import uuid

import torch
import torch.nn as nn

from checkpointing import CheckpointConfig, Checkpointer
from checkpointing.backends.memory import MemoryOptions


class Blob(nn.Module):
    """Many tensors adding up to ``size_gb`` of fp32, like a transformer's parameter list."""

    def __init__(self, size_gb: float, device: str, dtype=torch.float32, seed: int = 0):
        super().__init__()
        g = torch.Generator(device="cpu").manual_seed(seed)
        n = max(1, int(size_gb * (1 << 30) / 4 / (4096 * 1024)))
        self.ws = nn.ParameterList(
            nn.Parameter(torch.randn(4096, 1024, generator=g).to(device=device, dtype=dtype)) for _ in range(n)
        )


def timed(fn, repeats=3) -> float:
    best = float("inf")
    for _ in range(repeats):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def same(a: nn.Module, b: nn.Module, dtype=None) -> bool:
    return all(
        torch.equal(x.to(dtype) if dtype else x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )


def report(name: str, ok: bool, seconds: float | None = None, base: float | None = None) -> bool:
    extra = f"  {seconds:.4f} s  ratio to device memcpy {seconds / base:.2f}x" if seconds and base else ""
    print(f"{'PASS' if ok else 'FAIL'}  {name}{extra}", flush=True)
    return ok


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--size-gb", type=float, default=1.0)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 0
    print(torch.__version__, torch.cuda.get_device_name(0), flush=True)
    ok = True
    src = Blob(args.size_gb, "cuda")
    dst = Blob(args.size_gb, "cuda", seed=1)
    pairs = list(zip(src.parameters(), dst.parameters(), strict=True))
    memcpy = timed(lambda: [d.data.copy_(s.data) for s, d in pairs])
    print(f"device memcpy of {args.size_gb:.2f} GB: {memcpy:.4f} s", flush=True)

    for dtype_name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        channel = f"gpu{uuid.uuid4().hex[:8]}"
        cfg = CheckpointConfig(enable=True, backend="memory", interval=1, keep_latest_k=0, memory=MemoryOptions(channel=channel))
        recv = Blob(args.size_gb, "cuda", dtype=dtype, seed=2)
        pub = Checkpointer(model_parts=[src], checkpoint_config=cfg)
        sub = Checkpointer(model_parts=[recv], checkpoint_config=cfg)
        step = [0]

        def handoff(pub=pub, sub=sub, step=step):
            step[0] += 1
            pub.save(step[0])
            assert sub.load() and sub.loaded_step == step[0]

        secs = timed(handoff)
        ok &= report(f"memory/local cuda fp32 -> cuda {dtype_name} handoff", same(src, recv, dtype), secs, memcpy)
        pub.close()
        sub.close()

    small = 0.25
    a = Blob(small, "cuda")
    for backend, mode in (("dcp", "disabled"), ("dcp", "async_with_pinned_mem"), ("hf", "disabled")):
        with tempfile.TemporaryDirectory() as tmp:
            cfg = CheckpointConfig(enable=True, backend=backend, interval=1, async_mode=mode, keep_latest_k=0)
            b = Blob(small, "cuda", seed=3)
            try:
                with Checkpointer(model_parts=[a], checkpoint_config=cfg, base_folder=tmp) as w:
                    t = time.perf_counter()
                    w.save(1)
                    w.maybe_wait_for_staging()
                save_s = time.perf_counter() - t
                with Checkpointer(model_parts=[b], checkpoint_config=cfg, base_folder=tmp) as r:
                    t = time.perf_counter()
                    loaded = r.load()
                    torch.cuda.synchronize()
                    load_s = time.perf_counter() - t
                good = loaded and same(a, b)
                print(f"      {backend}/{mode}: save {save_s:.3f} s, load {load_s:.3f} s for {small} GB", flush=True)
                ok &= report(f"{backend} ({mode}) cuda save -> cuda load bit-exact", good)
            except Exception as e:  # report every check, not just the first failure
                ok &= report(f"{backend} ({mode}) cuda save/load raised {e!r}", False)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
