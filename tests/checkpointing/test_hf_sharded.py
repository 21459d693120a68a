"""Sharded ``hf`` saves: FSDP2 shards from 2 ranks become ordinary Hugging Face shards.

Real processes (torch.multiprocessing, gloo, CPU). Each rank writes only its own pieces (DCP's
HF writer), the consolidation assembles whole tensors file by file; nobody gathers the model.
The result must load bit-exact on 1 rank, back onto 2 FSDP ranks, and in transformers.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from checkpointing import CheckpointConfig, Checkpointer
from checkpointing.backends.hf import HFOptions
from tests.helpers import TrainState, build_titan_model, build_training_parts, train_steps

WORLD = 2
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config() -> CheckpointConfig:
    # 1 MiB shards split the ~5 MiB model over several files, consolidated by both ranks.
    return CheckpointConfig(
        enable=True, backend="hf", folder="checkpoint", interval=1, keep_latest_k=0, hf=HFOptions(max_shard_size_mb=1)
    )


def _adapter(model):
    from torchtitan.protocols.train_spec import get_train_spec

    return get_train_spec("qwen3").state_dict_adapter(model.model_args, None)


def _full(value):
    return value.full_tensor() if hasattr(value, "full_tensor") else value


def _full_state(model, opts, scheds, train_state) -> dict:
    """Everything the step holds as plain full tensors / values (collectives: same order on all ranks)."""
    out = {f"model/{k}": _full(v).detach().clone() for k, v in sorted(model.state_dict().items())}
    for k, v in sorted(opts.state_dict().items()):
        out[f"optimizer/{k}"] = _full(v).detach().clone() if isinstance(v, torch.Tensor) else v
    out["lr_scheduler"] = scheds.state_dict()
    out["train_state"] = train_state.state_dict()
    return out


def _assert_same(expected: dict, actual: dict) -> None:
    assert expected.keys() == actual.keys(), sorted(expected.keys() ^ actual.keys())
    for key, want in expected.items():
        got = actual[key]
        if isinstance(want, torch.Tensor):
            assert want.dtype == got.dtype and want.shape == got.shape, key
            assert torch.equal(want, got), f"{key} differs"
        else:
            assert want == got, f"{key}: {want!r} != {got!r}"


def _model(seed: int):
    return build_titan_model("qwen3", seed=seed, dim=256)  # tied embeddings, like the qwen3 debug model


def _fsdp_parts(seed: int):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = _model(seed)
    mesh = init_device_mesh("cpu", (WORLD,))
    for block in model.layers.values():
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opts, scheds = build_training_parts(model)
    return model, opts, scheds


def _rank_main(rank: int, port: int, base: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        model, opts, scheds = _fsdp_parts(seed=0)
        train_steps(model, opts, scheds, n=2, seed=0)
        ts = TrainState(step=2)
        ts.losses = [2.0, 1.5]
        parts = dict(model_parts=[model], optimizers=opts, lr_schedulers=scheds, states={"train_state": ts})
        with Checkpointer(**parts, checkpoint_config=_config(), sd_adapter=_adapter(model), base_folder=base) as ckpt:
            ckpt.save(1)
        reference = _full_state(model, opts, scheds, ts)
        if rank == 0:
            torch.save(reference, os.path.join(base, "reference.pt"))

        # Back onto 2 FSDP ranks: other values, same structure.
        model2, opts2, scheds2 = _fsdp_parts(seed=7)
        train_steps(model2, opts2, scheds2, n=1, seed=7)
        ts2 = TrainState()
        with Checkpointer(model_parts=[model2], optimizers=opts2, lr_schedulers=scheds2, states={"train_state": ts2},
                          checkpoint_config=_config(), sd_adapter=_adapter(model2), base_folder=base) as ckpt:
            assert ckpt.load() is True and ckpt.loaded_step == 1
        _assert_same(reference, _full_state(model2, opts2, scheds2, ts2))
        weight = model2.state_dict()["tok_embeddings.weight"]
        assert weight.to_local().shape[0] * WORLD == weight.shape[0]
    finally:
        dist.barrier()
        dist.destroy_process_group()


def test_two_rank_fsdp_hf_save_loads_bit_exact_on_one_rank_and_in_transformers(tmp_path):
    mp.spawn(_rank_main, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    step_dir = tmp_path / "checkpoint" / "step-1"
    names = sorted(os.listdir(step_dir))
    shards = [n for n in names if n.endswith(".safetensors")]
    assert len(shards) >= 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors", names
    assert set(names) - set(shards) == {"config.json", "manifest.json", "model.safetensors.index.json", "training_state"}, names
    assert not [n for n in os.listdir(tmp_path / "checkpoint") if n.startswith(".")], "staging leftovers"

    model = _model(seed=5)
    opts, scheds = build_training_parts(model)
    train_steps(model, opts, scheds, n=1, seed=5)
    ts = TrainState()
    with Checkpointer(model_parts=[model], optimizers=opts, lr_schedulers=scheds, states={"train_state": ts},
                      checkpoint_config=_config(), sd_adapter=_adapter(model), base_folder=str(tmp_path)) as ckpt:
        assert ckpt.load() is True and ckpt.loaded_step == 1
    expected = torch.load(tmp_path / "reference.pt", weights_only=True)
    _assert_same(expected, _full_state(model, opts, scheds, ts))
    assert model.output.weight is model.tok_embeddings.weight

    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(step_dir))
    tokens = torch.randint(0, model.model_args.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(hf(tokens).logits, model(tokens), atol=1e-4, rtol=0)
