"""The backends every contract and fault test runs against: every registered backend (plugins
included), with ``memory`` expanded into its transports."""

from __future__ import annotations

import dataclasses
import importlib.util
import zlib

import pytest

from checkpointing import CheckpointConfig, available_backends
from checkpointing.backends.memory import MemoryOptions

# keep_versions = 4: the memory backend holds only that many versions (its slots), and the contract
# tests watch the manager's interval/retention policy over up to four steps.
EXPANSIONS = {
    "memory": [
        ("memory-local", {"transport": "local", "keep_versions": 4}),
        ("memory-shm", {"transport": "shm", "keep_versions": 4}),
    ]
}


def backend_cases() -> list[str]:
    cases = []
    for name in available_backends():
        if name.startswith("_"):
            continue  # test-only throwaway backends
        cases += [case for case, _ in EXPANSIONS.get(name, [(name, {})])]
    return cases


def case_backend(case: str) -> str:
    return case.split("-", 1)[0] if case.startswith("memory-") else case


def make_config(case: str, channel: str, **overrides) -> CheckpointConfig:
    """A config for ``case`` that keeps each test isolated (its own memory channel)."""
    name = case_backend(case)
    if importlib.util.find_spec(f"checkpointing.backends.{name}") is None and name in ("dcp", "hf", "memory"):
        pytest.skip(f"backend module {name} not written yet")
    mem_opts = dict(dict(EXPANSIONS.get(name, [])).get(case, {}))
    memory = MemoryOptions(channel=channel, **mem_opts)
    base = dict(enable=True, backend=name, folder="checkpoint", interval=1, keep_latest_k=0, memory=memory)
    if name == "dist":
        base["dist"] = dist_options(channel)
    base.update(overrides)
    return CheckpointConfig(**base)


def dist_options(channel: str):
    """A dist world per channel: its store's port is derived from the name, so a publisher and
    a reader (or a forked child) that agree on the channel meet without being told a port.
    keep_versions = 4 for the same reason as memory's."""
    from checkpointing.backends.dist import DistOptions

    port = 21000 + zlib.crc32(channel.encode()) % 9000
    return DistOptions(init_method=f"tcp://127.0.0.1:{port}", keep_versions=4, timeout_s=10.0, join_timeout_s=30.0)


def with_options(cfg: CheckpointConfig, **changes) -> CheckpointConfig:
    return dataclasses.replace(cfg, **changes)
