"""Test helpers: real TorchTitan debug-size models, built in the test, no downloads."""

from __future__ import annotations

import dataclasses
import os

import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))

# Smaller than TorchTitan's debugmodel (dim 256, 8 layers) so the suite stays fast on 2 cores;
# same architecture and code path.
TINY = {"dim": 64, "n_layers": 2, "n_heads": 4, "vocab_size": 256}


def titan_model_args(name: str = "qwen3", flavor: str = "debugmodel", **overrides):
    from torchtitan.protocols.train_spec import get_train_spec

    spec = get_train_spec(name)
    args = spec.model_args[flavor]
    changes = {k: v for k, v in overrides.items() if hasattr(args, k)}
    if name == "qwen3" and "dim" in changes:
        changes.setdefault("head_dim", changes["dim"] // changes.get("n_heads", args.n_heads))
        changes.setdefault("n_kv_heads", max(1, changes.get("n_heads", args.n_heads) // 2))
        changes.setdefault("hidden_dim", changes["dim"] * 3)
    if name == "llama3" and "dim" in changes:
        changes.setdefault("n_kv_heads", max(1, changes.get("n_heads", args.n_heads) // 2))
    return spec, dataclasses.replace(args, **changes)


def build_titan_model(name: str = "qwen3", flavor: str = "debugmodel", seed: int = 0, tiny: bool = True, **overrides):
    """A TorchTitan model with initialized weights (seeded), on CPU, fp32."""
    spec, args = titan_model_args(name, flavor, **({**TINY, **overrides} if tiny else overrides))
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = spec.model_cls(args)
    model.to_empty(device="cpu")
    with torch.no_grad():
        model.init_weights()
    model.model_args = args  # handy for adapters in tests
    return model


def build_training_parts(model, steps: int = 10, lr: float = 1e-3):
    """TorchTitan's own OptimizersContainer and LRSchedulersContainer over ``model``."""
    from torchtitan.components.lr_scheduler import build_lr_schedulers
    from torchtitan.components.optimizer import build_optimizers
    from torchtitan.config import LRScheduler as LRConfig
    from torchtitan.config import Optimizer as OptConfig
    from torchtitan.distributed import ParallelDims

    dims = ParallelDims(dp_replicate=1, dp_shard=1, cp=1, tp=1, pp=1, ep=1, etp=1, world_size=1)
    opts = build_optimizers([model], OptConfig(lr=lr), dims)
    scheds = build_lr_schedulers(opts, LRConfig(warmup_steps=2), steps)
    return opts, scheds


def train_steps(model, opts, scheds, n: int = 2, seed: int = 0):
    """A few real optimizer steps so optimizer and lr state are non-trivial."""
    g = torch.Generator().manual_seed(seed)
    vocab = model.model_args.vocab_size
    for _ in range(n):
        tokens = torch.randint(0, vocab, (2, 16), generator=g)
        loss = model(tokens).float().logsumexp(-1).mean()
        loss.backward()
        opts.step()
        scheds.step()
        opts.zero_grad()


class TrainState:
    """A Stateful like TorchTitan's TrainState: a step counter and a loss history."""

    def __init__(self, step: int = 0):
        self.step = step
        self.losses: list[float] = []

    def state_dict(self):
        return {"step": self.step, "losses": list(self.losses)}

    def load_state_dict(self, sd):
        self.step = sd["step"]
        self.losses = list(sd["losses"])


def assert_state_equal(a: dict, b: dict, keys=None):
    keys = keys if keys is not None else a.keys()
    assert set(keys) <= set(b), f"missing keys: {sorted(set(keys) - set(b))}"
    for k in keys:
        x, y = a[k], b[k]
        if isinstance(x, torch.Tensor):
            assert x.dtype == y.dtype and x.shape == y.shape, k
            assert torch.equal(x, y), f"tensor {k} differs"
        else:
            assert x == y, f"{k}: {x!r} != {y!r}"
