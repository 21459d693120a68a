"""Fault-suite cases that fail because of a bug in a backend this suite does not own.

Each entry is a strict xfail: the test still runs and still asserts the promise; the day the
backend is fixed it XPASSes, strict mode turns that into a failure, and the entry must go.
Nothing here weakens a test; it only says whose bug a red case is.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest


@dataclass(frozen=True)
class KnownBug:
    test: str
    where: dict = field(default_factory=dict)
    """Parameter values that select the failing cases (a missing key matches any value)."""
    reason: str = ""


KNOWN: list[KnownBug] = []


def mark_known_bugs(request: pytest.FixtureRequest) -> None:
    node = request.node
    params = getattr(getattr(node, "callspec", None), "params", {})
    for bug in KNOWN:
        if node.originalname == bug.test and all(params.get(k) == v for k, v in bug.where.items()):
            node.add_marker(pytest.mark.xfail(strict=True, reason=bug.reason))
