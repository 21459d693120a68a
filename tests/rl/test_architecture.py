"""src/rl consumes checkpointing's public API only and never branches on a backend name, so
that swapping the backend stays one TOML line. Checked on the source (AST), with the checker
itself tested against violations so it cannot pass vacuously."""

from __future__ import annotations

import ast
import pathlib

import pytest

RL_SRC = pathlib.Path(__file__).resolve().parents[2] / "src" / "rl"
BACKEND_NAMES = {"dcp", "hf", "memory", "local", "shm", "dist"}
PUBLIC_INTEGRATIONS = {"checkpointing.vllm"}
"""Public integration packages of the library (each with its own ``__all__``): rl may import
their public names like the package's, and nothing deeper."""


def violations(source: str, filename: str = "<src>") -> list[str]:
    import importlib

    import checkpointing

    public = {"checkpointing": set(checkpointing.__all__)}
    for name in PUBLIC_INTEGRATIONS:
        public[name] = set(importlib.import_module(name).__all__)
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("checkpointing."):
                    found.append(f"{where}: import {alias.name} (only `from checkpointing import ...`)")
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module in public:
                for alias in node.names:
                    if alias.name not in public[node.module]:
                        found.append(f"{where}: {node.module}.{alias.name} is not in {node.module}.__all__")
            elif node.module.startswith("checkpointing."):
                found.append(f"{where}: from {node.module} import ... (only the package's public API)")
        elif isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) in (
            "import_module",
            "__import__",
        ):
            for arg in node.args:
                if isinstance(arg, ast.Constant) and str(arg.value).startswith("checkpointing."):
                    found.append(f"{where}: dynamic import of {arg.value}")
        elif isinstance(node, ast.Compare):
            for operand in [node.left, *node.comparators]:
                for const in _constants(operand):
                    if const in BACKEND_NAMES:
                        found.append(f"{where}: compares against backend name {const!r}")
        elif isinstance(node, ast.match_case):
            for const in _constants(node.pattern):
                if const in BACKEND_NAMES:
                    found.append(f"{where}: matches on backend name {const!r}")
        elif isinstance(node, ast.Attribute) and node.attr == "backend_name":
            found.append(f"{where}: reads Checkpointer.backend_name")
    return found


def _constants(node: ast.AST):
    for sub in ast.walk(node):
        if isinstance(sub, ast.Constant) and isinstance(sub.value, str):
            yield sub.value


def test_rl_uses_only_the_public_api_and_never_branches_on_a_backend():
    files = sorted(RL_SRC.rglob("*.py"))
    assert len(files) >= 10, files
    problems = [v for f in files for v in violations(f.read_text(), str(f.relative_to(RL_SRC.parent)))]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    "snippet",
    [
        "import checkpointing.backends.dcp",
        "from checkpointing.backends.memory import MemoryBackend",
        "from checkpointing.config import validate_checkpoint_config",
        "from checkpointing import create_backend",
        "from checkpointing.vllm.engine import CheckpointerWeightTransferEngine",
        "from checkpointing.vllm import describe_error",
        "import checkpointing.vllm",
        "importlib.import_module('checkpointing.backends.hf')",
        "if cfg.weight_sync.backend == 'memory': pass",
        "x = 1 if backend in ('dcp', 'hf') else 2",
        "match name:\n    case 'shm': pass",
        "if ckpt.backend_name: pass",
    ],
)
def test_the_checker_catches_each_kind_of_violation(snippet):
    assert violations(snippet), snippet


def test_the_checker_accepts_the_allowed_forms():
    ok = (
        "from checkpointing import Checkpointer, ConfigError\nif engine == 'torch': pass\nx = {'backend': 'dcp'}\n"
        "from checkpointing.vllm import VLLMWeightSync"
    )
    assert violations(ok) == []
