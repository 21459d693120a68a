"""docs/reliability.md names a test for every promise; this keeps those names true, and keeps
every fault test accounted for in the document."""

from __future__ import annotations

import ast
import glob
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DOC = os.path.join(ROOT, "docs", "reliability.md")
REFERENCE = re.compile(r"(tests/[\w/]+\.py)::(test_\w+)")
NOT_PROMISES = {"test_toml_text_round_trips_the_generated_values"}  # checks the test's own generator


def _tests_in(path: str) -> set[str]:
    with open(path) as f:
        tree = ast.parse(f.read())
    return {node.name for node in tree.body if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")}


def _references() -> list[tuple[str, str]]:
    with open(DOC) as f:
        return REFERENCE.findall(f.read())


def test_every_test_named_in_reliability_md_exists():
    refs = _references()
    assert len(refs) > 20
    missing = [f"{path}::{name}" for path, name in refs if not os.path.isfile(os.path.join(ROOT, path)) or name not in _tests_in(os.path.join(ROOT, path))]
    assert not missing, f"docs/reliability.md names tests that do not exist: {missing}"


def test_every_fault_test_backs_a_promise_in_reliability_md():
    named = {(path, name) for path, name in _references()}
    unnamed = []
    for path in sorted(glob.glob(os.path.join(ROOT, "tests", "checkpointing", "test_faults_*.py"))):
        rel = os.path.relpath(path, ROOT)
        if rel.endswith("test_faults_docs.py"):
            continue
        unnamed += [f"{rel}::{t}" for t in sorted(_tests_in(path) - NOT_PROMISES) if (rel, t) not in named]
    assert not unnamed, f"fault tests that docs/reliability.md does not mention: {unnamed}"
