"""Module attributes imported on first use (PEP 562), for the package's two re-export lists.

``checkpointing`` and ``checkpointing.plugin`` re-export names from their home modules without
importing those modules (and torch, TorchTitan) up front: ``ckpt --help`` starts at once and a
program pays only for what it uses. Each keeps its own table of homes; this builds the module
``__getattr__``/``__dir__`` pair from it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

Home = str | tuple[str, str]
"""An absolute module name (the attribute has the same name there), or (module, attribute)."""


def lazy_exports(
    namespace: dict[str, Any], homes: Mapping[str, Home], exported: Sequence[str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for the module whose ``globals()`` is ``namespace``: a name in
    ``homes`` is imported from its home on first access and cached there; any other name is an
    AttributeError."""
    module = namespace["__name__"]

    def __getattr__(name: str) -> Any:
        home = homes.get(name)
        if home is None:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        source, attr = home if isinstance(home, tuple) else (home, name)
        value = getattr(importlib.import_module(source), attr)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(exported))

    return __getattr__, __dir__
