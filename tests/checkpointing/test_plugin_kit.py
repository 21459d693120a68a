"""The public plugin kit (``checkpointing.plugin``): re-exports only, and every plugin in this
repository (the toy one, the torch_checkpointing package) reaches this library through it and
``checkpointing`` alone, never through a private module. Checked on the source (AST), with the
checker tested against violations so it cannot pass vacuously."""

from __future__ import annotations

import ast
import importlib
import pathlib
import subprocess
import sys

import pytest

import checkpointing.plugin as kit

REPO = pathlib.Path(__file__).resolve().parents[2]
PLUGIN_SOURCES = [
    *sorted((REPO / "plugins").rglob("*.py")),
    *sorted((REPO / "tests" / "checkpointing" / "plugin_pkg").rglob("*.py")),
]
PUBLIC_MODULES = {"checkpointing", "checkpointing.plugin"}


def test_every_kit_name_is_the_object_of_its_home_module():
    assert len(kit.__all__) == len(set(kit.__all__)) <= 30, kit.__all__
    assert set(kit.__all__) == set(kit._HOMES)
    for name in kit.__all__:
        home = kit._HOMES[name]
        module, attr = home if isinstance(home, tuple) else (home, name)
        assert getattr(kit, name) is getattr(importlib.import_module(module), attr), name


def test_the_kit_defines_nothing_of_its_own():
    tree = ast.parse(pathlib.Path(kit.__file__).read_text())
    defined = [n.name for n in tree.body if isinstance(n, (ast.ClassDef, ast.FunctionDef)) and not n.name.startswith("__")]
    assert defined == [], f"checkpointing.plugin must re-export, not define: {defined}"


def test_importing_the_kit_imports_only_what_is_used():
    code = ("import sys, checkpointing.plugin as kit\nbefore = 'torch' in sys.modules\n"
            "kit.safe_join\nafter_safe_join = 'torch' in sys.modules\nkit.read_safetensors_header\n"
            "print(before, after_safe_join, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0 and out.stdout.split() == ["False", "False", "True"], out.stdout + out.stderr


def test_unknown_kit_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'Checkpointer'"):
        kit.Checkpointer  # noqa: B018  (the policy layer is not part of a backend's kit)


def private_imports(source: str, filename: str = "<src>") -> list[str]:
    """Imports of ``checkpointing.<anything but plugin>`` (plugins must not depend on internals)."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            found += [f"{where}: import {a.name}" for a in node.names
                      if a.name.startswith("checkpointing.") and a.name not in PUBLIC_MODULES]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] == "checkpointing" and node.module not in PUBLIC_MODULES:
                found.append(f"{where}: from {node.module} import ...")
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
            "import_module", "__import__"
        ):
            found += [f"{where}: dynamic import of {a.value}" for a in node.args if isinstance(a, ast.Constant)
                      and str(a.value).startswith("checkpointing.") and a.value not in PUBLIC_MODULES]
    return found


def test_plugins_use_only_the_public_api():
    assert any("titan_torch_checkpointing" in str(p) for p in PLUGIN_SOURCES), PLUGIN_SOURCES
    assert any("titan_toy_backend" in str(p) for p in PLUGIN_SOURCES), PLUGIN_SOURCES
    problems = [v for p in PLUGIN_SOURCES for v in private_imports(p.read_text(), str(p.relative_to(REPO)))]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("snippet", [
    "from checkpointing.commit import StepDirectory",
    "import checkpointing.backends.hf.safetensors_io",
    "from checkpointing.backend import BackendSpec",
    "importlib.import_module('checkpointing.safepath')",
])
def test_the_private_import_check_catches(snippet):
    assert private_imports(snippet)


@pytest.mark.parametrize("snippet", ["from checkpointing.plugin import StepDirectory", "from checkpointing import BackendSpec"])
def test_the_private_import_check_allows_the_public_api(snippet):
    assert private_imports(snippet) == []
