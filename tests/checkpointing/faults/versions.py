"""Known, bit-exact model versions, so any load can be checked against what was saved.

Version ``s`` is the seed-0 TorchTitan debug model with ``s`` added to every floating tensor.
Every process (the pytest process, a forked child) rebuilds exactly the same bytes, so a test
never needs the saver to report what it wrote: a loaded model either *is* version ``s`` for
the step it claims, bit for bit, or the test fails.
"""

from __future__ import annotations

import torch

from checkpointing import Checkpointer
from tests.checkpointing.cases import make_config
from tests.helpers import TrainState, build_titan_model

BASE_SEED = 0
STRANGER_SEED = 99
"""A receiver starts from different weights, so "nothing was loaded" is visible."""


def base_weights() -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in build_titan_model(seed=BASE_SEED).state_dict().items()}


@torch.no_grad()
def set_version(model: torch.nn.Module, base: dict[str, torch.Tensor], version: int) -> None:
    for key, tensor in model.state_dict().items():
        tensor.copy_(expected_tensor(base[key], version))


def expected_tensor(base: torch.Tensor, version: int) -> torch.Tensor:
    return base + version if base.is_floating_point() else base


def version_mismatches(model: torch.nn.Module, base: dict[str, torch.Tensor], version: int) -> list[str]:
    """Keys whose tensor is not exactly version ``version`` (empty: bit-exact)."""
    bad = []
    for key, tensor in model.state_dict().items():
        want = expected_tensor(base[key], version)
        if tensor.dtype != want.dtype or not torch.equal(tensor, want):
            bad.append(key)
    return bad


def assert_version(model: torch.nn.Module, base: dict[str, torch.Tensor], version: int) -> None:
    bad = version_mismatches(model, base, version)
    assert not bad, f"model is not bit-exact version {version}: {len(bad)} tensors differ, e.g. {bad[:3]}"


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: torch.nn.Module, before: dict[str, torch.Tensor], why: str) -> None:
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert not changed, f"{why}: the receiver was modified ({len(changed)} tensors, e.g. {changed[:3]})"


def train_state_for(version: int) -> TrainState:
    ts = TrainState(step=version)
    ts.losses = [version / 4, version / 8]
    return ts


def holds_training_state(case: str, channel: str) -> bool:
    """Whether the backend keeps non-tensor state (asked of the backend, not of its name)."""
    from checkpointing import backend_spec

    return backend_spec(make_config(case, channel).backend).capabilities.non_tensor_state


def titan_adapter(model):
    """TorchTitan's own state-dict adapter: backends that write Hugging Face directories need it
    (names, config.json); the others ignore it."""
    from torchtitan.protocols.train_spec import get_train_spec

    return get_train_spec("qwen3").state_dict_adapter(model.model_args, None)


class Side:
    """One Checkpointer over a TorchTitan model (plus a train_state when the backend keeps one)."""

    def __init__(self, case: str, folder: str, channel: str, seed: int = STRANGER_SEED, training_state: bool | None = None, **cfg):
        self.model = build_titan_model(seed=seed)
        full = holds_training_state(case, channel) if training_state is None else training_state
        self.train_state = TrainState(step=-7) if full else None
        states = {"train_state": self.train_state} if full else None
        self.ckpt = Checkpointer(
            model_parts=[self.model], states=states, checkpoint_config=make_config(case, channel, **cfg),
            sd_adapter=titan_adapter(self.model), base_folder=folder,
        )

    def save_version(self, base: dict[str, torch.Tensor], version: int, **kw) -> None:
        set_version(self.model, base, version)
        if self.train_state is not None:
            fresh = train_state_for(version)
            self.train_state.step, self.train_state.losses = fresh.step, fresh.losses
        self.ckpt.save(version, **kw)

    def assert_loaded_version(self, base: dict[str, torch.Tensor], version: int) -> None:
        assert self.ckpt.loaded_step == version, f"loaded step {self.ckpt.loaded_step}, expected {version}"
        assert_version(self.model, base, version)
        if self.train_state is not None:
            want = train_state_for(version)
            assert (self.train_state.step, self.train_state.losses) == (want.step, want.losses)

    def close(self) -> None:
        self.ckpt.close()
